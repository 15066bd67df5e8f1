"""Benchmark files as the field ships them: VLMEvalKit TSV and a plain JSONL.

VLMEvalKit TSV (V* Bench, HR-Bench 4K/8K, MME-RealWorld as VLMEvalKit distributes them) has one row per question:
``index``, ``image`` (base64) or ``image_path``, ``question``, optional ``hint``, options in columns ``A``..``E``
(empty cells mean "no such option"), ``answer`` and ``category`` / ``l2-category``. To save space VLMEvalKit writes
an image only once: a row whose ``image`` cell is short holds the ``index`` of the row that carries the bytes. A
question about several images (MMMU, some MME-RealWorld rows) has a list in its ``image`` / ``image_path`` cell, as
VLMEvalKit writes it (``['<base64>', '<base64>']``).

JSONL has one object per line: ``{"image": PATH_OR_BASE64, "question": ..., "options"?: {"A": ...} or [...],
"answer": ..., "category"?: ..., "index"?: ...}``; ``"image"`` may be a list for a question about several images.
Relative image paths resolve against the file's folder. Extra keys (such as the ground-truth ``bbox`` of
``thyme bench synth``) are kept in :attr:`EvalItem.extra`.

Loading checks the structure of every row (columns, options, answers) and fails fast with the row named, before
any model time is spent. Images are decoded by :func:`materialize_image`, which writes base64 images once to a cache
folder so the sandbox can open them by path; the user's files are never modified.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from thyme.errors import ThymeError

logger = logging.getLogger(__name__)

OPTION_LETTERS = tuple(string.ascii_uppercase)
YES_NO_ANSWERS = ("yes", "no")
REQUIRED_COLUMNS = ("index", "question", "answer")
# VLMEvalKit stores an image once and lets later rows refer to it by index; a real base64 image is far longer.
_MAX_IMAGE_REFERENCE_CHARS = 64
# Cells pandas wrote for missing values when a TSV went through a DataFrame.
_EMPTY_CELLS = ("", "nan", "NaN", "None")
DATASET_SUFFIXES = (".tsv", ".jsonl")
_MAX_PATH_CHARS = 4096


class DatasetError(ThymeError, ValueError):
    """A benchmark file or one of its rows cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question.

    Args:
        index: the row's id, unique in its dataset (VLMEvalKit ``index``); predictions are keyed by it.
        question: the raw question, before the per-type formatting of reference section 1.2.
        answer: the ground truth: an option letter for multiple choice, else the expected text.
        options: option letter -> option text, in letter order; empty when the question is not multiple choice.
        image_path: the image file, when the dataset gives a path.
        image_b64: the base64 image, when the dataset embeds it (see :func:`materialize_image`).
        category: the benchmark split (``FSP``, ``direct_attributes``, ``Perception``...), or None.
        l2_category: the second-level category (MME-RealWorld), or None.
        hint: VLMEvalKit's optional hint shown before the question, or None.
        extra_answers: further accepted answers for short-answer questions (JSONL lists), else empty.
        extra: every other field of the row, kept for the report (e.g. ground-truth boxes).
        more_images: further images of a multi-image question, in order: a ``Path`` for a file, a ``str`` for
            base64 bytes (see :func:`materialize_images`).
    """

    index: str
    question: str
    answer: str
    options: dict[str, str] = field(default_factory=dict)
    image_path: Path | None = None
    image_b64: str | None = None
    category: str | None = None
    l2_category: str | None = None
    hint: str | None = None
    extra_answers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    more_images: tuple[Path | str, ...] = ()

    @property
    def question_type(self) -> str:
        """``"mcq"`` when options exist, ``"yes_no"`` when the answer is yes/no, else ``"vqa"`` (short answer)."""
        if self.options:
            return "mcq"
        if self.answer.strip().lower() in YES_NO_ANSWERS:
            return "yes_no"
        return "vqa"


def find_dataset_files(path: str | Path) -> list[Path]:
    """Returns the benchmark file(s) at ``path``: the file itself, or every ``*.tsv``/``*.jsonl`` in a folder.

    Raises:
        DatasetError: nothing usable exists at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATASET_SUFFIXES and p.is_file())
        if files:
            return files
        raise DatasetError(f"{path} holds no .tsv or .jsonl file: pass a benchmark file or a folder of them")
    raise DatasetError(f"{path} does not exist: pass a VLMEvalKit .tsv or a .jsonl benchmark file")


def load_dataset(path: str | Path) -> list[EvalItem]:
    """Reads a benchmark file (``.tsv`` or ``.jsonl``) or a folder of them into items, checking every row.

    In a folder, indices are prefixed with the file's stem so that two benchmarks never collide.

    Raises:
        DatasetError: an unknown suffix, a missing column, a bad option/answer or a duplicate index, with the row.
    """
    files = find_dataset_files(path)
    items: list[EvalItem] = []
    for file in files:
        loaded = _load_file(file)
        if len(files) > 1:
            loaded = [_with_prefix(item, file.stem) for item in loaded]
        items.extend(loaded)
    _check_unique(items, Path(path))
    logger.info("loaded %d items from %s", len(items), path)
    return items


def _with_prefix(item: EvalItem, prefix: str) -> EvalItem:
    fields = dict(item.__dict__)
    fields["index"] = f"{prefix}/{item.index}"
    return EvalItem(**fields)


def _check_unique(items: list[EvalItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.index in seen:
            raise DatasetError(f"{path}: index {item.index!r} appears twice; every row needs its own index")
        seen.add(item.index)


def _load_file(path: Path) -> list[EvalItem]:
    if path.suffix == ".tsv":
        return _load_tsv(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    raise DatasetError(f"{path}: unknown benchmark format {path.suffix!r}; use a VLMEvalKit .tsv or a .jsonl file")


def _cell(row: dict[str, str | None], name: str) -> str | None:
    value = row.get(name)
    if value is None or value.strip() in _EMPTY_CELLS:
        return None
    return value


def _load_tsv(path: Path) -> list[EvalItem]:
    # Embedded 8K images are tens of MB per cell, far beyond csv's default 128 KB field limit.
    csv.field_size_limit(sys.maxsize)
    # utf-8-sig: a TSV saved by a spreadsheet starts with a byte-order mark that would rename the first column.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        # pandas (which writes VLMEvalKit's TSVs) quotes cells holding tabs, quotes or newlines: parse its quoting.
        reader = csv.DictReader(handle, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if "image" not in columns and "image_path" not in columns:
            missing.append("image or image_path")
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)}; a VLMEvalKit TSV needs index, image (base64) or "
                f"image_path, question, answer (found: {', '.join(columns) or 'no header'})"
            )
        # line_num is the file line where a row ends (a quoted cell may span lines): what an editor shows.
        numbered = [(reader.line_num, row) for row in reader]
    by_index = {row["index"]: row for _, row in numbered}
    return [_tsv_item(path, line, row, by_index) for line, row in numbered]


def _tsv_item(path: Path, line: int, row: dict[str, str | None], by_index: dict[str, dict]) -> EvalItem:
    where = f"{path}:{line} (index {row.get('index')!r})"
    for name in REQUIRED_COLUMNS:
        if _cell(row, name) is None:
            raise DatasetError(f"{where}: the {name!r} cell is empty; fill it or drop the row")
    image_b64 = _cell(row, "image")
    image_path = _cell(row, "image_path")
    is_reference = image_b64 is not None and len(image_b64) <= _MAX_IMAGE_REFERENCE_CHARS
    if is_reference and not image_b64.lstrip().startswith("["):
        target = by_index.get(image_b64.strip())
        if target is None or _cell(target, "image") is None:
            raise DatasetError(f"{where}: image cell {image_b64!r} is neither base64 nor the index of a row with one")
        image_b64 = _cell(target, "image")
    more: list[Path | str] = []
    b64_list, path_list = _cell_list(where, image_b64), _cell_list(where, image_path)
    if b64_list or path_list:  # several images: base64 wins over paths, as for one image
        more = list(b64_list) if b64_list else [_resolve(path, p) for p in path_list]
        image_b64, image_path = (str(more[0]), None) if b64_list else (None, str(more[0]))
        more = more[1:]
    if image_b64 is None and image_path is None:
        raise DatasetError(f"{where}: both 'image' and 'image_path' are empty; give the image as base64 or a path")
    options = {letter: str(_cell(row, letter)) for letter in OPTION_LETTERS if _cell(row, letter) is not None}
    return _make_item(
        where,
        index=str(row["index"]).strip(),
        question=str(row["question"]),
        answer=str(row["answer"]).strip(),
        options=options,
        image_path=_resolve(path, image_path) if image_b64 is None and image_path else None,
        image_b64=image_b64,
        category=_cell(row, "category"),
        l2_category=_cell(row, "l2-category") or _cell(row, "l2_category"),
        hint=_cell(row, "hint"),
        more_images=tuple(more),
    )


def _cell_list(where: str, value: str | None) -> list[str]:
    """The images of a multi-image cell (a JSON or Python list literal of strings), or [] for a single image."""
    if value is None or not value.lstrip().startswith("["):
        return []
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        try:
            items = ast.literal_eval(value.strip())  # VLMEvalKit writes Python reprs: ['...', '...']
        except (ValueError, SyntaxError) as exc:
            raise DatasetError(f"{where}: the image cell starts with '[' but is not a list of images ({exc})") from exc
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise DatasetError(f"{where}: a multi-image cell must be a non-empty list of base64 strings or paths")
    return items


def _resolve(dataset: Path, image: str) -> Path:
    candidate = Path(image).expanduser()
    return candidate if candidate.is_absolute() else dataset.parent / candidate


def _make_item(where: str, **fields: Any) -> EvalItem:
    options: dict[str, str] = fields["options"]
    if options:
        letters = list(options)
        if letters != list(OPTION_LETTERS[: len(letters)]):
            raise DatasetError(f"{where}: options {letters} skip a letter; options must be A, B, C... in order")
        fields["answer"] = _answer_letter(where, fields["answer"], options)
    return EvalItem(**fields)


def _answer_letter(where: str, answer: str, options: dict[str, str]) -> str:
    """Maps a multiple-choice answer to its letter: the letter itself, or the text of exactly one option."""
    if answer.upper() in options and len(answer) == 1:
        return answer.upper()
    matches = [letter for letter, text in options.items() if text.strip().lower() == answer.strip().lower()]
    if len(matches) == 1:
        return matches[0]
    raise DatasetError(
        f"{where}: answer {answer!r} is neither an option letter ({', '.join(options)}) nor the text of one option"
    )


def _load_jsonl(path: Path) -> list[EvalItem]:
    items = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            items.append(_jsonl_item(path, where, row, default_index=str(len(items))))
    return items


_JSONL_KEYS = ("index", "image", "question", "options", "answer", "category", "l2-category", "hint")


def _jsonl_item(path: Path, where: str, row: dict[str, Any], default_index: str) -> EvalItem:
    missing = [key for key in ("image", "question", "answer") if row.get(key) in (None, "", [])]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}; each line needs image, question, answer")
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    raw_images = row["image"] if isinstance(row["image"], list) else [row["image"]]
    if not all(isinstance(image, str) and image for image in raw_images):
        raise DatasetError(f"{where}: 'image' must be a path or base64 string, or a list of them")
    images = [_jsonl_image(path, image) for image in raw_images]
    first = images[0]
    return _make_item(
        where,
        index=str(row.get("index", default_index)),
        question=str(row["question"]),
        answer=str(answers[0]).strip(),
        options=_jsonl_options(where, row.get("options")),
        image_path=first if isinstance(first, Path) else None,
        image_b64=first if isinstance(first, str) else None,
        category=_optional_str(row.get("category")),
        l2_category=_optional_str(row.get("l2-category")),
        hint=_optional_str(row.get("hint")),
        extra_answers=tuple(str(a).strip() for a in answers[1:]),
        extra={k: v for k, v in row.items() if k not in _JSONL_KEYS},
        more_images=tuple(images[1:]),
    )


def _jsonl_image(dataset: Path, image: str) -> Path | str:
    """A resolved path, or the base64 text: base64 has no '.', so an image suffix (or an existing file) tells a path
    from embedded bytes."""
    is_path = len(image) < _MAX_PATH_CHARS and (
        Path(image).suffix.lower() in Image.registered_extensions() or _resolve(dataset, image).is_file()
    )
    return _resolve(dataset, image) if is_path else image


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _jsonl_options(where: str, options: Any) -> dict[str, str]:
    if options in (None, [], {}):
        return {}
    if isinstance(options, list):
        return {OPTION_LETTERS[i]: str(text) for i, text in enumerate(options)}
    if isinstance(options, dict):
        return {str(letter).upper(): str(text) for letter, text in options.items()}
    raise DatasetError(f"{where}: 'options' must be a list of texts or a {{letter: text}} object")


def materialize_images(item: EvalItem, cache_dir: Path) -> list[Path]:
    """Every image of the item as a path (see :func:`materialize_image`), the first one first.

    Raises:
        DatasetError: an image path does not exist or embedded bytes are not an image.
    """
    paths = [materialize_image(item, cache_dir)]
    for number, image in enumerate(item.more_images, start=2):
        single = EvalItem(f"{item.index} (image {number})", item.question, item.answer,
                          image_path=image if isinstance(image, Path) else None,
                          image_b64=image if isinstance(image, str) else None)  # fmt: skip
        paths.append(materialize_image(single, cache_dir))
    return paths


def materialize_image(item: EvalItem, cache_dir: Path) -> Path:
    """Returns a path to the item's image, decoding an embedded base64 image into ``cache_dir`` once.

    The file name is the hash of the bytes, so rows sharing an image share one file and a resumed run reuses it.

    Raises:
        DatasetError: the path does not exist, or the bytes are not base64 or not an image Pillow can open.
    """
    where = f"row index {item.index!r}"
    if item.image_b64 is None:
        if item.image_path is None or not item.image_path.is_file():
            raise DatasetError(f"{where}: image file {item.image_path} does not exist")
        return item.image_path
    try:
        data = base64.b64decode(item.image_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DatasetError(f"{where}: the image is neither an existing file nor valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = "." + (image.format or "png").lower().replace("jpeg", "jpg")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: the base64 data is not an image Pillow can read ({exc})") from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not target.exists():
        partial = target.with_suffix(target.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(target)
    return target
