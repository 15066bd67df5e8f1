"""RL datasets: the released Thyme-RL JSON format and a plain ``{image, question, answer}`` form, as TRL rows.

Two input shapes are accepted (thyme-reference.md section 4):

- **Thyme-RL** (swift's GRPO format, HF ``Kwai-Keye/Thyme-RL``): ``messages`` = [system, user ``"<image>\\n..."``],
  ``images`` = [path or ``{"path": ...}``], ``solution`` (the reference answer, used by the rewards) and ``question``
  (the raw question, used by the judge prompts).
- **plain**: ``image``, ``question``, ``answer``; the official system prompt and user template are applied.

Both become rows with TRL's conversational ``prompt`` (string contents; TRL inserts the image block itself), an
``image`` column holding the ABSOLUTE image path, ``question`` / ``solution`` for the rewards, and
``prompt_question``: the question as the user turn shows it (options included). The rollout loop renders it into
the official system prompt and user template with the path the sandbox gives the model, so a ``User Image Path``
line of released data, which points at the authors' machine (README section 2.3, issue #7), is dropped; a row's own
system message is kept in ``prompt`` only, which TRL logs. Every image path is checked before training starts, and
one error lists all the missing ones.

Files: ``.jsonl`` (one row per line), ``.json`` (a list of rows, or one row), a directory of such files, or the name
of a ``datasets`` dataset (loaded with :func:`datasets.load_dataset`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from thyme.errors import ConfigError
from thyme.prompts import SYSTEM_PROMPT, user_prompt, user_text_item

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl")
# Where the official user template starts after the question (thyme.prompts.user_prompt).
_TEMPLATE_TAIL = "\n\n### User Image Path:**"
# How many missing paths the error names before it only counts the rest.
MAX_LISTED_MISSING = 20


def _read_located_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one file, each with where it is (``FILE:LINE`` for JSONL, ``FILE row N`` for a JSON list), so
    that every later error names the line an editor shows."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON "
                    "object"
                ) from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{number}", row))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); a .json file holds a list of "
            "rows or one row"
        ) from exc
    data = data if isinstance(data, list) else [data]
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ConfigError(f"{path} row {index}: expected a JSON object, got {type(row).__name__}")
    return [(f"{path} row {index}", row) for index, row in enumerate(data)]


def read_located_rows(
    source: str | Path, split: str = "train"
) -> tuple[list[tuple[str, dict[str, Any]]], Path | None]:
    """Like :func:`read_rows`, with each row's location (``FILE:LINE``) for error messages."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise ConfigError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in this folder")
        return [located for file in files for located in _read_located_rows(file)], path
    if path.is_file():
        return _read_located_rows(path), path.parent
    if path.suffix in DATA_SUFFIXES:
        raise ConfigError(f"dataset file {path} does not exist")
    from datasets import load_dataset

    rows = load_dataset(str(source), split=split)
    return [(f"{source} row {index}", dict(row)) for index, row in enumerate(rows)], None


def read_rows(source: str | Path, split: str = "train") -> tuple[list[dict[str, Any]], Path | None]:
    """Reads raw rows from a file, a directory of files, or a ``datasets`` name.

    Returns:
        `tuple[list[dict], Path | None]`: the rows and the folder relative image paths are resolved against
        (None for a hub dataset).

    Raises:
        ConfigError: the path holds no data file, or a file is not JSON (the error names the line).
    """
    located, folder = read_located_rows(source, split)
    return [row for _, row in located], folder


def _image_of(row: dict[str, Any], where: str) -> str:
    images = row.get("images")
    if images:
        first = images[0]
        return str(first["path"] if isinstance(first, dict) else first)
    if row.get("image"):
        image = row["image"]
        return str(image[0] if isinstance(image, list) else image)
    raise ConfigError(f"{where}: no image (expected an 'images' list or an 'image' path)")


def _message_text(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(c.get("text") or "" for c in content)


def _resolve(image: str, root: Path | None) -> str:
    path = Path(image).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return str(path.absolute())


def to_trl_row(row: dict[str, Any], where: str, root: Path | None) -> dict[str, Any]:
    """Converts one raw row (Thyme-RL or plain) into a TRL row.

    Raises:
        ConfigError: the row has neither form, or lacks the reference answer.
    """
    image = _resolve(_image_of(row, where), root)
    if "messages" in row:
        messages = row["messages"]
        system = next((_message_text(m) for m in messages if m["role"] == "system"), SYSTEM_PROMPT)
        user = next((_message_text(m) for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ConfigError(f"{where}: 'messages' has no user message")
        user_text = user_text_item(user)
        prompt_question = user_text.split(_TEMPLATE_TAIL, 1)[0].strip()
        question = str(row.get("question") or prompt_question)
        solution = row.get("solution")
    else:
        if "question" not in row:
            raise ConfigError(f"{where}: expected Thyme-RL 'messages' or a plain row with 'question'")
        question = prompt_question = str(row["question"])
        system, user_text = SYSTEM_PROMPT, ""
        solution = row.get("answer", row.get("solution"))
    if solution is None:
        raise ConfigError(f"{where}: no reference answer ('solution' or 'answer')")
    prompt_text = user_text or user_text_item(user_prompt(question, image, *_size_or_none(image)))
    return {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": prompt_text}],
        "image": image,
        "question": question,
        "prompt_question": prompt_question,
        "solution": str(solution),
    }


def _size_or_none(image: str) -> tuple[int | None, int | None]:
    """The original size for the displayed prompt, from the header only (the rollout validates the full file)."""
    try:
        with Image.open(image) as img:
            return img.size
    except OSError:
        return None, None


def check_images(rows: list[dict[str, Any]]) -> None:
    """Raises one error naming every row whose image file is missing, before any training step runs.

    Raises:
        ConfigError: at least one image path does not exist.
    """
    missing = [row["image"] for row in rows if not Path(row["image"]).is_file()]
    if not missing:
        return
    listed = "\n  ".join(missing[:MAX_LISTED_MISSING])
    more = f"\n  ... and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
    raise ConfigError(
        f"{len(missing)} of {len(rows)} dataset images do not exist:\n  {listed}{more}\n"
        "fix the paths, or set image_root to the folder relative paths are resolved against"
    )


def load_rl_dataset(
    source: str | Path, *, split: str = "train", image_root: str | Path | None = None
) -> Any:  # datasets.Dataset (imported lazily)
    """Loads an RL dataset as a ``datasets.Dataset`` of TRL rows, with every image path checked.

    Args:
        source: a ``.json``/``.jsonl`` file, a folder of them, or a ``datasets`` name.
        split: the split of a ``datasets`` name.
        image_root: the folder relative image paths are resolved against (default: the data file's folder).

    Returns:
        `datasets.Dataset`: columns ``prompt``, ``image``, ``question``, ``prompt_question``, ``solution``.

    Raises:
        ConfigError: a row is malformed (its number is named) or images are missing (all are listed).
    """
    from datasets import Dataset

    located, folder = read_located_rows(source, split)
    root = Path(image_root) if image_root is not None else folder
    if not located:
        raise ConfigError(f"{source}: the dataset is empty")
    rows = [to_trl_row(row, where, root) for where, row in located]
    check_images(rows)
    logger.info("loaded %d RL rows from %s", len(rows), source)
    return Dataset.from_list(rows)
