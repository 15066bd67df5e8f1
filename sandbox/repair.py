"""Source repairs that the released Thyme weights were trained with (thyme-reference.md 2.2), minus their bugs.

The weights write code against a fake world: the image lives at whatever path they remember (``/eval/17127.jpg``),
results go to ``/mnt/data/temp_processed_images/``, OpenCV is sometimes spelled ``cv``, and crop boxes are often a
few pixels wide or past the border. The original sandbox patched the source before running it, and the model's
boxes only make sense with that patching (the README example's 110x40 plate crop is grown to 110x64). Each repair
here is one function, switchable through :class:`RepairConfig`, and says what it changed so the change can be
logged and shown. Bugs of the original that are fixed (reference 2.2 and 8.4):

- the first-line indentation "fix" broke code that starts with a block statement: here it only runs when the
  code does not parse as written;
- crop clamping ignored negative literals, lists, prefixed names (``stop_sign_x1``), slices (dead on Python >= 3.9)
  and ``img.crop((...))`` calls: all handled;
- the ``/mnt/data/...`` alias was a blind text replace that also hit comments: here it rewrites string literals, and
  the facades map the alias at run time for paths built from pieces.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

OUTPUT_ALIAS = "/mnt/data/temp_processed_images/"
"""The directory the weights were trained to save into; it stands for the session's scratch dir."""

MIN_CROP_PX = 64
"""Minimum crop size per axis the original enforced; the weights' crop boxes assume it (reference 2.2 step 5)."""

OPENCV_ALIASES = frozenset({"cv", "cv3", "cv4", "CV"})
COORD_NAMES = ("x1", "y1", "x2", "y2", "left", "top", "right", "bottom")
BOX_NAMES = frozenset(
    {"crop_box", "bbox", "box", "coordinates", "coords", "crop_coords", "left_crop_coords", "right_crop_coords",
     "top_crop_coords", "bottom_crop_coords"}
)
_PRECISION_SPEC = re.compile(r":\.(\d)f\}")


@dataclass(frozen=True)
class RepairConfig:
    """Which source repairs run before the code is compiled. All default to what the weights expect.

    Args:
        indentation (`bool`, defaults to `True`): dedent code whose first line is indented differently from the
            rest, only when the code does not parse as written.
        image_path_literal (`bool`, defaults to `True`): ``image_path = "<literal>"`` naming a file the session
            does not have is pointed at the session's (first) input image.
        output_alias (`bool`, defaults to `True`): ``/mnt/data/temp_processed_images/`` in string literals becomes
            the session's scratch dir.
        opencv_alias (`bool`, defaults to `True`): ``cv.x``/``cv3.x``/``cv4.x``/``CV.x`` become ``cv2.x``.
        crop_clamp (`bool`, defaults to `True`): literal crop boxes are sorted, clamped to the image and grown to at
            least 64 px per axis.
        precision_8f (`bool`, defaults to `False`): the original rewrote every ``:.Nf}`` to ``:.8f}`` (RL feedback
            was printed that way). Off by default because it changes what the code prints.
    """

    indentation: bool = True
    image_path_literal: bool = True
    output_alias: bool = True
    opencv_alias: bool = True
    crop_clamp: bool = True
    precision_8f: bool = False


@dataclass(frozen=True)
class RepairContext:
    """What the repairs need to know about the session.

    Args:
        input_path (`str`): the path ``image_path`` literals are repaired to.
        image_size (`tuple[int, int]` or `None`): (width, height) of the first input; ``None`` skips clamping.
        scratch_dir (`str`): the directory the output alias stands for.
        is_known_file (`Callable[[str], bool]`): whether a literal path is a file the session can read.
    """

    input_path: str
    image_size: tuple[int, int] | None
    scratch_dir: str
    is_known_file: Callable[[str], bool]


def repair_source(code: str, config: RepairConfig, context: RepairContext) -> tuple[str, list[str]]:
    """Applies the enabled repairs to ``code``.

    Args:
        code (`str`): the code block as the model wrote it.
        config (`RepairConfig`): which repairs run.
        context (`RepairContext`): the session facts the repairs use.

    Returns:
        `tuple[str, list[str]]`: the code to compile and one line per change made. Code that does not parse comes
        back unchanged (apart from indentation), so that compiling it reports the model's own syntax error.
    """
    notes: list[str] = []
    if config.indentation:
        code = repair_indentation(code, notes)
    if config.precision_8f:
        code, count = _PRECISION_SPEC.subn(":.8f}", code)
        if count:
            notes.append(f"format precision set to 8 decimals in {count} place(s)")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code, notes
    before = len(notes)
    transformers: list[ast.NodeTransformer] = []
    if config.output_alias:
        transformers.append(_OutputAlias(context.scratch_dir, notes))
    if config.image_path_literal:
        transformers.append(_ImagePathLiteral(context, notes))
    if config.opencv_alias:
        transformers.append(_OpenCVAlias(notes))
    if config.crop_clamp and context.image_size is not None:
        transformers.append(_CropClamp(context.image_size, notes))
    for transformer in transformers:
        tree = transformer.visit(tree)
    if len(notes) == before:
        return code, notes
    return ast.unparse(ast.fix_missing_locations(tree)), notes


def repair_indentation(code: str, notes: list[str]) -> str:
    """Fixes code pasted with a stray indentation, but only if it does not parse as written.

    The original aligned the first line to the second unconditionally, which broke ``for ...:`` at column 0
    followed by its indented body (reference 2.2 step 3). Here valid code is never touched.
    """
    code = code.strip("\n")
    if _parses(code):
        return code
    dedented = textwrap.dedent(code)
    if _parses(dedented):
        notes.append("removed common indentation")
        return dedented
    lines = [line for line in dedented.splitlines()]
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    if len(nonempty) >= 2 and not lines[nonempty[0]].rstrip().endswith(":"):
        second = lines[nonempty[1]]
        indent = second[: len(second) - len(second.lstrip())]
        lines[nonempty[0]] = indent + lines[nonempty[0]].lstrip()
        aligned = textwrap.dedent("\n".join(lines))
        if _parses(aligned):
            notes.append("aligned the first line with the second")
            return aligned
    return code


def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Clamps an (x1, y1, x2, y2) box to the image and grows each side to at least ``MIN_CROP_PX``.

    Each axis is sorted, clamped to [0, size], grown right/down to the minimum and shifted left/up at the border;
    an image smaller than the minimum gives its full extent. This is the original's rule (the weights' boxes
    assume it), applied to every form it was meant for.
    """
    x1, x2 = _clamp_axis(box[0], box[2], width)
    y1, y2 = _clamp_axis(box[1], box[3], height)
    return x1, y1, x2, y2


def _clamp_axis(a: float, b: float, size: int) -> tuple[int, int]:
    low, high = sorted((float(a), float(b)))
    low, high = min(max(low, 0.0), size), min(max(high, 0.0), size)
    if size <= MIN_CROP_PX:
        return 0, size
    if high - low < MIN_CROP_PX:
        high = low + MIN_CROP_PX
        if high > size:
            high, low = size, size - MIN_CROP_PX
    return int(round(low)), int(round(high))


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def _number(node: ast.expr) -> float | None:
    """The value of a numeric literal, including a negated one (the original missed ``-10``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _number(node.operand)
        if inner is not None:
            return -inner if isinstance(node.op, ast.USub) else inner
    return None


def _four_numbers(node: ast.expr) -> list[float] | None:
    if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) == 4:
        values = [_number(elt) for elt in node.elts]
        if all(v is not None for v in values):
            return [v for v in values if v is not None]
    return None


def _is_coord_name(name: str) -> bool:
    return any(name == coord or name.endswith("_" + coord) for coord in COORD_NAMES)


def _is_box_name(name: str) -> bool:
    return name in BOX_NAMES or any(name.endswith("_" + box) for box in BOX_NAMES)


class _OutputAlias(ast.NodeTransformer):
    def __init__(self, scratch_dir: str, notes: list[str]) -> None:
        self.target = scratch_dir.rstrip("/") + "/"
        self.notes = notes

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if isinstance(node.value, str) and OUTPUT_ALIAS.rstrip("/") in node.value:
            new = node.value.replace(OUTPUT_ALIAS, self.target).replace(OUTPUT_ALIAS.rstrip("/"), self.target[:-1])
            self.notes.append(f"output path {node.value!r} -> {new!r}")
            return ast.copy_location(ast.Constant(new), node)
        return node


class _ImagePathLiteral(ast.NodeTransformer):
    def __init__(self, context: RepairContext, notes: list[str]) -> None:
        self.context = context
        self.notes = notes

    def visit_Assign(self, node: ast.Assign) -> ast.Assign:
        target = node.targets[0] if len(node.targets) == 1 else None
        value = node.value
        if (
            isinstance(target, ast.Name)
            and target.id == "image_path"
            and isinstance(value, ast.Constant)
            and isinstance(value.value, str)
            and not self.context.is_known_file(value.value)
        ):
            self.notes.append(f"image_path {value.value!r} -> {self.context.input_path!r}")
            node.value = ast.copy_location(ast.Constant(self.context.input_path), value)
        return node


class _OpenCVAlias(ast.NodeTransformer):
    def __init__(self, notes: list[str]) -> None:
        self.notes = notes

    def visit_Attribute(self, node: ast.Attribute) -> ast.Attribute:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id in OPENCV_ALIASES:
            self.notes.append(f"{node.value.id}.{node.attr} -> cv2.{node.attr}")
            node.value = ast.copy_location(ast.Name("cv2", ast.Load()), node.value)
        return node


class _CropClamp(ast.NodeTransformer):
    def __init__(self, image_size: tuple[int, int], notes: list[str]) -> None:
        self.width, self.height = image_size
        self.notes = notes

    def _clamped(self, values: list[float], like: ast.expr, what: str) -> ast.expr:
        box = clamp_box(values, self.width, self.height)
        if list(box) != values:
            self.notes.append(f"crop {what} {tuple(_tidy(v) for v in values)} clamped to {box}")
        elts: list[ast.expr] = [ast.Constant(v) for v in box]
        new: ast.expr = ast.List(elts, ast.Load()) if isinstance(like, ast.List) else ast.Tuple(elts, ast.Load())
        return ast.copy_location(new, like)

    def visit_Assign(self, node: ast.Assign) -> ast.Assign:
        self.generic_visit(node)
        values = _four_numbers(node.value)
        if values is None or len(node.targets) != 1:
            return node
        target = node.targets[0]
        if isinstance(target, (ast.Tuple, ast.List)) and len(target.elts) == 4:
            names = [elt.id for elt in target.elts if isinstance(elt, ast.Name)]
            if len(names) == 4 and any(_is_coord_name(name) for name in names):
                node.value = self._clamped(values, node.value, ", ".join(names))
        elif isinstance(target, ast.Name) and _is_box_name(target.id):
            node.value = self._clamped(values, node.value, target.id)
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "crop" and len(node.args) == 1:
            values = _four_numbers(node.args[0])
            if values is not None:
                node.args[0] = self._clamped(values, node.args[0], "box")
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.Subscript:
        self.generic_visit(node)
        index = node.slice
        if not (isinstance(index, ast.Tuple) and len(index.elts) >= 2):
            return node
        rows, cols = index.elts[0], index.elts[1]
        if not all(isinstance(s, ast.Slice) and s.step is None for s in (rows, cols)):
            return node
        assert isinstance(rows, ast.Slice) and isinstance(cols, ast.Slice)
        bounds = [_number(b) if b is not None else None for b in (cols.lower, rows.lower, cols.upper, rows.upper)]
        if any(b is None for b in bounds):
            return node
        values = [b for b in bounds if b is not None]
        x1, y1, x2, y2 = clamp_box(values, self.width, self.height)
        if [x1, y1, x2, y2] != values:
            self.notes.append(f"crop slice {tuple(_tidy(v) for v in values)} clamped to {(x1, y1, x2, y2)}")
            rows.lower, rows.upper = ast.Constant(y1), ast.Constant(y2)
            cols.lower, cols.upper = ast.Constant(x1), ast.Constant(x2)
        return node


def _tidy(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
