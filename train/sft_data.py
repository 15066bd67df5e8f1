"""The Thyme-SFT data form: rows of ``image`` / ``question`` / ``response``, their local paths and their conversations.

The released SFT data (HF ``Kwai-Keye/Thyme-SFT``; thyme-reference.md section 4) has one row per sample:

- ``image``: the original image first, then the processed image(s) the response refers to (base64 in the release);
- ``question``: the whole Thyme user text, starting with ``<image>\\n`` and holding a ``User Image Path`` line that
  points at the authors' machine (``/mllm_hdd/yfzhang/data/...``);
- ``response``: ``<think>... <code>...</code><sandbox_output><image></sandbox_output>... </think>
  <answer>...</answer>``, where each ``<image>`` is the next entry of ``image``.

The original left the path fix to its users (README 2.3, reference issue #7): the path in the question and every copy
of it inside the response (prose and code) must name the local file, or the model learns to write code against a
file that does not exist. :func:`rewrite_row_paths` does that on one row, :func:`convert_row` also writes the images
of a released row to disk, and :func:`row_to_trajectory` turns a local row into the :class:`~thyme.trajectory.
Trajectory` every other part of Thyme renders from. ``thyme data convert`` is the command around them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thyme.errors import ConfigError, ImageError, ProtocolError
from thyme.prompts import FALLBACK_SYSTEM_PROMPT, SYSTEM_PROMPT, user_prompt, user_text_item
from thyme.protocol import IMAGE_PLACEHOLDER
from thyme.trajectory import Trajectory, parse_assistant_content

logger = logging.getLogger(__name__)

SFT_COLUMNS = ("image", "question", "response")

# The "User Image Path" line, derived from the official user template itself so that its spelling lives only in
# thyme.prompts: render the template with a probe path and keep what surrounds the probe on its line.
_PROBE = "\x00thyme-path-probe\x00"
_PROBE_LINE = next(line for line in user_prompt("q", _PROBE, 1, 1).splitlines() if _PROBE in line)
_PATH_PREFIX, _PATH_SUFFIX = _PROBE_LINE.split(_PROBE)
USER_IMAGE_PATH_RE = re.compile("^" + re.escape(_PATH_PREFIX) + "(.*)" + re.escape(_PATH_SUFFIX) + "$", re.MULTILINE)

# Image formats kept byte for byte when converting; anything else Pillow reads is re-encoded as PNG (lossless).
_KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}
_DATA_URI_RE = re.compile(r"^data:image/[\w.+-]+;base64,")
_PARQUET_BATCH_ROWS = 64


def question_image_path(question: str) -> str | None:
    """The path named on the question's ``User Image Path`` line, or None when the question has no such line.

    Example:
        >>> from thyme.prompts import user_prompt
        >>> question_image_path(user_prompt("Why?", "/mllm_hdd/yfzhang/data/a.jpg", 4, 3))
        '/mllm_hdd/yfzhang/data/a.jpg'
    """
    match = USER_IMAGE_PATH_RE.search(question)
    return match.group(1) if match else None


def rewrite_row_paths(row: Mapping[str, Any], image_paths: Sequence[str]) -> dict[str, Any]:
    """Points a row at local image files: ``image`` becomes ``image_paths``, and the question's image path (on the
    ``User Image Path`` line and wherever the question or response repeats it, code included) becomes
    ``image_paths[0]``.

    Besides the exact old path, quoted absolute paths in the response that end in the old file's name are rewritten
    too (the same file written from another mount point). ``/mnt/data/temp_processed_images/`` is left alone: it is
    the sandbox's output alias the weights were trained with, not a path on the authors' machine.

    Args:
        row (`Mapping`): a Thyme-SFT row (``image``, ``question``, ``response``); not modified.
        image_paths (`Sequence[str]`): the local files, in the order of ``row["image"]``.

    Returns:
        `dict`: a new row; other keys are copied unchanged.

    Raises:
        ProtocolError: ``image_paths`` has a different length than ``row["image"]``.
    """
    if len(image_paths) != len(row["image"]):
        raise ProtocolError(
            f"{len(image_paths)} local image path(s) given for a row with {len(row['image'])} image(s): pass one path "
            "per entry of the row's image list, original first"
        )
    new = dict(row)
    new["image"] = [str(path) for path in image_paths]
    old = question_image_path(row["question"])
    if not image_paths or old is None:
        return new
    local = str(image_paths[0])
    question = USER_IMAGE_PATH_RE.sub(lambda _: _PATH_PREFIX + local + _PATH_SUFFIX, row["question"], count=1)
    new["question"] = question.replace(old, local) if old else question
    response = row["response"].replace(old, local) if old else row["response"]
    basename = old.rstrip("/").rsplit("/", 1)[-1]
    if basename:
        # A quoted absolute path to the same file name, e.g. the code's image_path = "/other/mount/17127.jpg".
        same_file = re.compile(r"""(["'])/[^"'\s]*/""" + re.escape(basename) + r"\1")
        response = same_file.sub(lambda m: m.group(1) + local + m.group(1), response)
    new["response"] = response
    return new


def row_to_trajectory(row: Mapping[str, Any], *, use_system_prompt: bool = True) -> Trajectory:
    """Builds the conversation of one local SFT row: system, user (input image(s) + question), assistant (response
    with its sandbox images).

    The response's ``<image>`` placeholders take the LAST entries of ``row["image"]`` in order; the entries before
    them are the user's input images. The question's leading ``<image>`` is replaced by the image block, so the user
    text starts with ``\\n`` as in training (reference 1.2).

    Args:
        row (`Mapping`): ``image`` (list of local paths), ``question``, ``response``.
        use_system_prompt (`bool`, defaults to `True`): the official Thyme system prompt (SFT stage 1 passed
            ``--system prompt.txt``); False uses Qwen's default "You are a helpful assistant.", as stage 2 did.

    Returns:
        `Trajectory`: render it with ``to_messages()``.

    Raises:
        ProtocolError: a column is missing, the placeholders do not match the image list, or a sandbox block is
            unbalanced.
    """
    missing = [column for column in SFT_COLUMNS if column not in row]
    if missing:
        raise ProtocolError(f"SFT row lacks column(s) {missing}: rows need {list(SFT_COLUMNS)}")
    images = [str(path) for path in (row["image"] or [])]
    question, response = str(row["question"]), str(row["response"])
    in_response = response.count(IMAGE_PLACEHOLDER)
    in_question = question.count(IMAGE_PLACEHOLDER)
    user_count = len(images) - in_response
    if user_count < 0 or (in_question and in_question != user_count):
        raise ProtocolError(
            f"SFT row has {len(images)} image(s) but {in_question} <image> placeholder(s) in the question and "
            f"{in_response} in the response: the image list must hold the input image(s) first, then one image per "
            "response placeholder"
        )
    if in_question == 1:
        user_text = user_text_item(question)
    else:
        user_text = question.replace(IMAGE_PLACEHOLDER, "")
    segments = parse_assistant_content(response, images=images[user_count:])
    system = SYSTEM_PROMPT if use_system_prompt else FALLBACK_SYSTEM_PROMPT
    return Trajectory(system, user_text, images[:user_count], segments, question=question)


def decode_image(value: Any) -> bytes:
    """The encoded bytes of one released image entry: base64 text (optionally a ``data:`` URI), raw bytes, or a
    ``{"bytes": ...}`` dict as the HF ``Image`` feature stores it.

    Raises:
        ImageError: the entry is none of these or not valid base64.
    """
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(_DATA_URI_RE.sub("", value.strip()), validate=True)
        except binascii.Error as exc:
            raise ImageError(f"image entry is neither an existing file nor valid base64 ({exc})") from exc
    raise ImageError(
        f"image entry of type {type(value).__name__} is not base64 text, bytes or a {{'bytes': ...}} dict"
    )


def write_image(data: bytes, stem: Path) -> Path:
    """Writes encoded image bytes to ``stem`` + the format's extension (folders created), byte for byte where the
    format is common (no re-encoding loss), else as PNG.

    Raises:
        ImageError: Pillow cannot read the bytes.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
            image.load()
            suffix = _KEPT_FORMATS.get(image_format)
            path = stem.parent / (stem.name + (suffix or ".png"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if suffix is None:
                image.save(path, format="PNG")
                return path
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"image bytes cannot be decoded ({exc}); the entry is corrupt") from exc
    path.write_bytes(data)
    return path


def convert_row(row: Mapping[str, Any], image_dir: Path, row_id: str) -> dict[str, Any]:
    """Turns one released (or README-converted) row into a local row: images on disk, paths rewritten.

    An ``image`` entry that names an existing file is used in place (rows already converted by the original README
    script only need the path fix); any other entry is decoded and written under ``image_dir/row_id/``. The input
    image keeps the file name from the question's path, so the prompt still names a recognisable file.

    Args:
        row (`Mapping`): ``image``, ``question``, ``response`` (extra keys are kept).
        image_dir (`Path`): where decoded images go; must be absolute for the prompt's path to be usable.
        row_id (`str`): a unique, file-name-safe id of the row.

    Returns:
        `dict`: the local row, ready for :func:`row_to_trajectory`.

    Raises:
        ImageError: an image cannot be decoded.
        ProtocolError: the row lacks a column.
    """
    missing = [column for column in SFT_COLUMNS if column not in row]
    if missing:
        raise ProtocolError(
            f"row {row_id} lacks column(s) {missing}: released Thyme-SFT rows have {list(SFT_COLUMNS)}"
        )
    old_path = question_image_path(str(row["question"]))
    first_name = Path(old_path).stem if old_path else "image"
    paths: list[str] = []
    for index, entry in enumerate(row["image"] or []):
        if isinstance(entry, str) and not _DATA_URI_RE.match(entry) and len(entry) < 4096 and Path(entry).is_file():
            paths.append(str(Path(entry).resolve()))
            continue
        name = first_name if index == 0 else f"processed_{index}"
        paths.append(str(write_image(decode_image(entry), image_dir / row_id / name)))
    return rewrite_row_paths(row, paths)


@dataclass
class ConversionReport:
    """What :func:`convert_files` did: rows written, images written, and the rows it skipped with the reason."""

    output: Path
    rows: int = 0
    images: int = 0
    skipped: list[str] = field(default_factory=list)


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Yields the rows of a ``.parquet`` (the HF release), ``.jsonl`` or ``.json`` file, one at a time (the released
    splits hold hundreds of thousands of base64 images, so nothing is read whole).

    Raises:
        ConfigError: the suffix is none of these, the file cannot be parsed, or a JSON line is malformed (its number
            is named).
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"{path}: not a readable parquet file ({exc})") from exc
        for batch in batches:
            yield from batch.to_pylist()
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        yield from data if isinstance(data, list) else [data]
        return
    if path.suffix != ".jsonl":
        raise ConfigError(f"{path}: unknown data file type {path.suffix!r}; expected .parquet, .jsonl or .json")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc


def convert_files(
    inputs: Sequence[Path], output: Path, *, limit: int | None = None, overwrite: bool = False
) -> ConversionReport:
    """Converts released Thyme-SFT files into one local JSONL (``output``) plus image files beside it
    (``<output stem>_images/<row id>/``), with every path rewritten (:func:`convert_row`).

    A row that cannot be converted (corrupt image, missing column) is skipped and reported, not fatal: one bad row
    in a 500K-row split should not cost the rest.

    Args:
        inputs (`Sequence[Path]`): ``.parquet`` / ``.jsonl`` / ``.json`` files, read in order.
        output (`Path`): the JSONL file to write.
        limit (`int`, *optional*): stop after this many rows written (a quick look at the data).
        overwrite (`bool`, defaults to `False`): replace an existing ``output``.

    Returns:
        `ConversionReport`: counts and skipped rows.

    Raises:
        ConfigError: an input does not exist or has an unknown type, or ``output`` exists and ``overwrite`` is off.
    """
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:
        raise ConfigError(f"input file(s) not found: {', '.join(missing)}")
    output = output.absolute()
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists: choose another output or pass --overwrite")
    image_dir = output.with_name(output.stem + "_images")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(output)
    # Rows go to a side file renamed into place at the end, so a run stopped by a bad input leaves no half-written
    # OUTPUT that a re-run would then refuse to overwrite.
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", encoding="utf-8") as sink:
        for path in inputs:
            _convert_file(path, sink, image_dir, report, limit)
    partial.replace(output)
    return report


def _convert_file(path: Path, sink: Any, image_dir: Path, report: ConversionReport, limit: int | None) -> None:
    for index, row in enumerate(iter_rows(path)):
        if limit is not None and report.rows >= limit:
            return
        row_id = f"{path.stem}-{index:07d}"
        try:
            local = convert_row(row, image_dir, row_id)
        except (ImageError, ProtocolError) as exc:
            report.skipped.append(f"{path.name} row {index}: {exc}")
            logger.info("skipping %s row %d: %s", path.name, index, exc)
            continue
        sink.write(json.dumps(local, ensure_ascii=False) + "\n")
        report.rows += 1
        report.images += len(local["image"])


__all__ = [
    "SFT_COLUMNS",
    "ConversionReport",
    "convert_files",
    "iter_rows",
    "USER_IMAGE_PATH_RE",
    "convert_row",
    "decode_image",
    "question_image_path",
    "rewrite_row_paths",
    "row_to_trajectory",
    "write_image",
]
