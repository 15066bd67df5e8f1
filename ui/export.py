"""Packs a demo conversation into one zip a user can download: each trajectory's JSON plus every image it refers to.

A trajectory's JSON names images by absolute paths on the server (the upload, the sandbox's scratch dir), which mean
nothing on the user's machine and vanish when the sandbox session closes. The zip therefore carries copies of the
images and a JSON whose paths are rewritten to the copies, relative to the zip root, so
``Trajectory.load("trajectory_1.json")`` inside the unpacked folder finds them. The trajectory object itself is never
modified (a copy of its dict is rewritten).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from thyme.trajectory import Trajectory

INPUT_DIR = "input"
SANDBOX_DIR = "sandbox"
JSON_NAME = "trajectory_{index}.json"


def _archive_name(path: str, folder: str, used: dict[str, str]) -> str:
    """Returns the zip member name for ``path``: ``folder/<file name>``, made unique; one name per distinct path."""
    if path in used:
        return used[path]
    name = Path(path).name
    candidate, counter = f"{folder}/{name}", 1
    taken = set(used.values())
    while candidate in taken:
        counter += 1
        candidate = f"{folder}/{Path(name).stem}_{counter}{Path(name).suffix}"
    used[path] = candidate
    return candidate


def write_conversation_zip(trajectories: Sequence[Trajectory], destination: str | Path) -> Path:
    """Writes ``trajectory_<n>.json`` for each trajectory (1-based, conversation order) and the images they use.

    Args:
        trajectories (`Sequence[Trajectory]`): the conversation's trajectories, oldest first.
        destination (`str | Path`): the zip file to write (its folder must exist).

    Returns:
        `Path`: ``destination``.

    Raises:
        FileNotFoundError: an image the trajectory refers to is no longer on disk.
    """
    destination = Path(destination)
    names: dict[str, str] = {}
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, trajectory in enumerate(trajectories, start=1):
            data = trajectory.to_dict()
            data["image_paths"] = [_archive_name(p, INPUT_DIR, names) for p in data["image_paths"]]
            for segment in data["segments"]:
                if segment["type"] == "sandbox_output":
                    segment["images"] = [_archive_name(p, SANDBOX_DIR, names) for p in segment["images"]]
            archive.writestr(JSON_NAME.format(index=index), json.dumps(data, ensure_ascii=False, indent=2))
        for path, name in names.items():
            archive.write(path, name)
    return destination


__all__ = ["write_conversation_zip"]
