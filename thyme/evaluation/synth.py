"""A V*-style high-resolution benchmark generated offline: small targets in large cluttered images.

V* Bench and HR-Bench ask about objects that cover a tiny share of a large photo, which is where cropping and zooming
pay off (reference sections 4 and 5). This generator builds the same situation without downloads, for smoke tests
and RL experiments: every image holds four small targets (filled shapes in saturated colours, a white sign with a
word, a coloured tag with a number) among clutter drawn only in muted colours and other shapes, so each question has
exactly one right answer. Each row records its answer and the ground-truth box(es) of the target(s) it asks about.

Four question kinds, cycled over the rows (their names are the rows' ``category``):

- ``color``: "What is the color of the small <shape>?" (multiple choice, as V*'s direct attributes);
- ``position``: "Is the <colour> <shape> on the left or right side of the <colour> <shape>?" (multiple choice, as V*'s
  relative position);
- ``text``: "What word is written on the small white sign?" (short answer);
- ``digits``: "What number is written on the <colour> tag?" (short answer).

Everything follows from ``seed``: the same arguments give byte-identical images and rows.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

SYNTH_FILE = "synth.jsonl"
CATEGORIES = ("color", "position", "text", "digits")
COLORS = {
    "red": (220, 30, 30), "green": (20, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 180), "orange": (250, 130, 10),
}  # fmt: skip
SHAPES = ("circle", "triangle", "diamond", "star")
WORDS = ("MAPLE", "RIVER", "STONE", "CLOUD", "EMBER", "TIGER", "OCEAN", "LEMON", "NORTH", "PIXEL", "CEDAR", "ORBIT")
ASPECT = 0.75  # height / width, a typical photo
MIN_SIZE = 256
# Targets are 1.2-2.4 % of the image width (about 50-100 px at 4096), i.e. well under V*'s "< 5 % of the image".
TARGET_FRACTION = (0.012, 0.024)
MIN_TARGET_PX = 14
CLUTTER_PER_MEGAPIXEL = 25
JPEG_QUALITY = 92
_PLACEMENT_TRIES = 500


@dataclass(frozen=True)
class _Target:
    kind: str  # a shape name, "sign" or "tag"
    color: str
    box: tuple[int, int, int, int]
    text: str = ""


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], margin: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def _place(
    rng: random.Random, size: tuple[int, int], w: int, h: int, taken: list, away_x: int | None = None
) -> tuple[int, int, int, int]:
    """Picks a free box; with ``away_x``, one whose left edge is at least two widths from that x (left/right
    questions need an unambiguous answer)."""
    width, height = size
    for _ in range(_PLACEMENT_TRIES):
        x, y = rng.randrange(w, width - 2 * w), rng.randrange(h, height - 2 * h)
        box = (x, y, x + w, y + h)
        if away_x is not None and abs(x - away_x) < 2 * w:
            continue
        if not _overlaps(box, taken, margin=max(w, h)):
            taken.append(box)
            return box
    raise RuntimeError(f"could not place a {w}x{h} target in a {width}x{height} image; use a larger --size")


def _muted(rng: random.Random) -> tuple[int, int, int]:
    # Low saturation keeps clutter from ever looking like one of the saturated target colours.
    base = rng.randrange(60, 200)
    return tuple(min(255, max(0, base + rng.randrange(-18, 19))) for _ in range(3))  # type: ignore[return-value]


def _draw_background(rng: random.Random, size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    noise = np.random.default_rng(seed).integers(0, 40, size=(height // 8 + 1, width // 8 + 1, 1), dtype=np.uint8)
    base = np.repeat(np.repeat(noise, 8, axis=0), 8, axis=1)[:height, :width]
    gradient = np.linspace(110, 170, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + base, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    unit = max(4, width // 200)
    for _ in range(int(CLUTTER_PER_MEGAPIXEL * width * height / 1e6) + 20):
        x, y = rng.randrange(width), rng.randrange(height)
        kind = rng.randrange(4)
        extent = rng.randrange(unit, unit * 12)
        if kind == 0:
            draw.rectangle((x, y, x + extent * 3, y + extent * 2), fill=_muted(rng))
        elif kind == 1:
            draw.line(
                (x, y, x + rng.randrange(-extent * 6, extent * 6), y + extent * 4),
                fill=_muted(rng),
                width=max(1, unit // 2),
            )
        elif kind == 2:
            draw.ellipse((x, y, x + extent * 2, y + extent), outline=_muted(rng), width=max(1, unit // 3))
        else:
            letters = "".join(rng.choice("bcdfghjkmnpqrstvwxz") for _ in range(rng.randrange(2, 5)))
            draw.text((x, y), letters, fill=_muted(rng), font=ImageFont.load_default(size=max(8, extent)))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # star: ten points alternating outer and inner radius
        points = [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
        draw.polygon(points, fill=fill)


def _draw_label(draw: ImageDraw.ImageDraw, box: tuple, text: str, fill: tuple, ink: tuple) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=fill, outline=(20, 20, 20), width=max(1, (y1 - y0) // 12))
    font = ImageFont.load_default(size=max(8, int((y1 - y0) * 0.62)))
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=ink, font=font, anchor="mm")


def _draw_targets(image: Image.Image, rng: random.Random, unit: int) -> list[_Target]:
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int, int]] = []
    colors = rng.sample(sorted(COLORS), 3)
    targets: list[_Target] = []
    for shape, color in zip(rng.sample(SHAPES, 2), colors[:2], strict=True):
        box = _place(rng, image.size, unit, unit, taken, away_x=targets[0].box[0] if targets else None)
        _draw_shape(draw, shape, box, COLORS[color])
        targets.append(_Target(shape, color, box))
    word = rng.choice(WORDS)
    sign = _place(rng, image.size, int(unit * 3.2), unit, taken)
    _draw_label(draw, sign, word, (250, 250, 250), (10, 10, 10))
    targets.append(_Target("sign", "white", sign, word))
    number = str(rng.randrange(10, 1000))
    tag = _place(rng, image.size, int(unit * 2.4), unit, taken)
    _draw_label(draw, tag, number, COLORS[colors[2]], (255, 255, 255))
    targets.append(_Target("tag", colors[2], tag, number))
    return targets


def _question(category: str, targets: list[_Target], rng: random.Random) -> dict:
    first, second, sign, tag = targets
    if category == "color":
        choices = [first.color, *rng.sample([c for c in sorted(COLORS) if c != first.color], 3)]
        rng.shuffle(choices)
        return {
            "question": f"What is the color of the small {first.kind}?",
            "options": choices,
            "answer": "ABCD"[choices.index(first.color)],
            "bbox": [list(first.box)],
        }
    if category == "position":
        left = (first.box[0] + first.box[2]) < (second.box[0] + second.box[2])
        return {
            "question": f"Is the {first.color} {first.kind} on the left or right side of the "
            f"{second.color} {second.kind}?",
            "options": ["left", "right"],
            "answer": "A" if left else "B",
            "bbox": [list(first.box), list(second.box)],
        }
    if category == "text":
        return {
            "question": "What word is written on the small white sign?",
            "answer": sign.text.lower(),
            "bbox": [list(sign.box)],
        }
    return {"question": f"What number is written on the {tag.color} tag?", "answer": tag.text, "bbox": [list(tag.box)]}


def generate_synth(
    out_dir: str | Path, n: int, size: int = 4096, seed: int = 0, progress: Callable[[], None] | None = None
) -> Path:
    """Writes ``n`` synthetic high-resolution questions to ``out_dir`` (``synth.jsonl`` plus ``images/``).

    Args:
        out_dir: the folder to write; created if missing. Existing files of the same names are overwritten.
        n: how many rows (one image each).
        size: image width in pixels (height is ``0.75 * size``); 4096 matches HR-Bench 4K.
        seed: everything random follows from it.
        progress: called after each image is written (a 4096-px image takes about a tenth of a second).

    Returns:
        The path of the JSONL file, readable by :func:`thyme.evaluation.datasets.load_dataset`.

    Raises:
        ValueError: ``n < 1`` or ``size`` below 256 pixels.
    """
    if n < 1:
        raise ValueError(f"n ({n}) must be at least 1")
    if size < MIN_SIZE:
        raise ValueError(f"size ({size}) must be at least {MIN_SIZE} pixels: targets would not fit")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dims = (size, int(size * ASPECT))
    rows = []
    for index in range(n):
        rng = random.Random(seed * 1_000_003 + index)
        unit = max(MIN_TARGET_PX, int(size * rng.uniform(*TARGET_FRACTION)))
        image = _draw_background(rng, dims, seed * 1_000_003 + index)
        targets = _draw_targets(image, rng, unit)
        name = f"images/synth_{index:05d}.jpg"
        image.save(out / name, quality=JPEG_QUALITY)
        if progress is not None:
            progress()
        category = CATEGORIES[index % len(CATEGORIES)]
        rows.append({"index": str(index), "image": name, "category": category, **_question(category, targets, rng)})
    path = out / SYNTH_FILE
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    logger.info("wrote %d synthetic rows (%dx%d) to %s", n, *dims, path)
    return path
