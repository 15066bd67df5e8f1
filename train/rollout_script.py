"""Recorded model text for RL dry runs and tests: one trajectory for every rollout, or several per prompt.

A random tiny model never writes code, so the trainer can replay recorded text while the policy scores it and
trains on it (``rollout_script``). With ONE trajectory every rollout of a group gets the same reward, the advantages
are zero and nothing is learned; a file with several trajectories per prompt (right and wrong answers, with and
without a crop) gives rewards that differ inside a group, so a CPU run really moves the weights. Formats:

- any script :func:`thyme.backends.scripted.load_script` reads (a list of segments, ``{"segments": [...]}``, a saved
  trajectory): every rollout replays it;
- ``{"trajectories": {"<item id>": [[segment, ...], ...], ...}}``: per prompt (the item id is the image's file
  stem), a list of trajectories, each a list of segments. The k-th rollout of a prompt in a batch replays
  trajectory ``k mod n``, so a group of G >= n rollouts holds every recorded trajectory
  (``train/examples/data/rl_script.json``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from thyme.backends.scripted import load_script
from thyme.errors import ConfigError


class RolloutScript:
    """The recorded trajectories of a script file, handed out per rollout.

    Args:
        path: the JSON file (formats in the module docstring).

    Raises:
        ConfigError: the file cannot be read, or a trajectory list is empty or not made of text segments.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read rollout script {path}: {exc}") from exc
        self._shared: list[str] | None = None
        self._by_item: dict[str, list[list[str]]] = {}
        if isinstance(data, dict) and "trajectories" in data:
            self._by_item = _trajectories(data["trajectories"], self.path)
        else:
            self._shared = load_script(self.path)

    def assign(self, item_ids: Sequence[str]) -> list[list[str]]:
        """The segments each rollout of a batch replays (the k-th rollout of an item gets trajectory ``k mod n``).

        Raises:
            ConfigError: the script has no trajectories for one of the items.
        """
        if self._shared is not None:
            return [list(self._shared) for _ in item_ids]
        seen: Counter[str] = Counter()
        assigned = []
        for item in item_ids:
            if item not in self._by_item:
                raise ConfigError(
                    f"rollout script {self.path} has no trajectories for item {item!r} (the image's file stem); "
                    f"it has {sorted(self._by_item)}"
                )
            options = self._by_item[item]
            assigned.append(list(options[seen[item] % len(options)]))
            seen[item] += 1
        return assigned


def _trajectories(raw: object, path: Path) -> dict[str, list[list[str]]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"rollout script {path}: 'trajectories' must map item ids to lists of trajectories")
    result = {}
    for item, trajectories in raw.items():
        valid = (
            isinstance(trajectories, list)
            and trajectories
            and all(isinstance(t, list) and t and all(isinstance(s, str) for s in t) for t in trajectories)
        )
        if not valid:
            raise ConfigError(
                f"rollout script {path}: trajectories of {item!r} must be a non-empty list of lists of text segments"
            )
        result[str(item)] = trajectories
    return result


__all__ = ["RolloutScript"]
