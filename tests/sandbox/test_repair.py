"""The source repairs the weights expect, with the original's bugs fixed, each switchable (no worker needed)."""

from __future__ import annotations

import ast

import pytest

from thyme.sandbox.repair import RepairConfig, RepairContext, clamp_box, repair_source

INPUT = "/s/inputs/17127.jpg"
SCRATCH = "/s/scratch"


def _repair(code: str, config: RepairConfig | None = None, size: tuple[int, int] | None = (2496, 1392)) -> str:
    context = RepairContext(input_path=INPUT, image_size=size, scratch_dir=SCRATCH,
                            is_known_file=lambda path: path in (INPUT, SCRATCH + "/prev.png"))
    return repair_source(code, config or RepairConfig(), context)[0]


def _values(code: str, name: str) -> object:
    namespace: dict[str, object] = {}
    exec(code, namespace)  # noqa: S102 - repaired test snippets without calls
    return namespace[name]


@pytest.mark.parametrize(
    ("box", "size", "expected"),
    [
        ((1250, 1030, 1360, 1070), (2496, 1392), (1250, 1030, 1360, 1094)),  # README: 40 px grown to 64 down
        ((10, 20, 5, 30), (200, 100), (5, 20, 69, 84)),  # unsorted x, both axes grown
        ((-10, -5, 50, 40), (200, 100), (0, 0, 64, 64)),  # negatives clamped (the original let PIL pad)
        ((190, 90, 199, 99), (200, 100), (136, 36, 200, 100)),  # at the border: shifted left/up
        ((0, 0, 10, 10), (50, 40), (0, 0, 50, 40)),  # image smaller than 64 px: full extent
        ((10.6, 0, 200.2, 90), (300, 100), (11, 0, 200, 90)),  # floats rounded
    ],
)
def test_clamp_box_applies_64px_minimum_and_bounds(box, size, expected) -> None:
    assert clamp_box(box, *size) == expected


def test_crop_clamp_handles_tuples_lists_negatives_prefixed_names_slices_and_crop_calls() -> None:
    code = "\n".join([
        "x1, y1, x2, y2 = 1250, 1030, 1360, 1070",
        "bbox = [-10, -5, 30, 30]",
        "sign_x1, sign_y1, sign_x2, sign_y2 = (5, 5, 20, 20)",
        "region_box = (2490, 1390, 2500, 1400)",
        "s = slice(0)",
    ])
    repaired = _repair(code)
    assert _values(repaired, "y2") == 1094
    assert _values(repaired, "bbox") == [0, 0, 64, 64]  # a list stays a list
    assert _values(repaired, "sign_y2") == 69
    assert _values(repaired, "region_box") == (2432, 1328, 2496, 1392)
    sliced = _repair("crop = image[1030:1070, 1250:1360]")
    assert "image[1030:1094, 1250:1360]" in sliced  # the original's slice branch was dead on Python >= 3.9
    called = _repair("c = img.crop((1250, 1030, 1360, 1070))")
    assert "img.crop((1250, 1030, 1360, 1094))" in called


def test_crop_clamp_leaves_non_box_names_and_switch_off_alone() -> None:
    code = "a, b, c, d = 1, 2, 3, 4\nsize = (1, 2, 3, 4)"
    assert _repair(code) == code
    off = _repair("x1, y1, x2, y2 = 1250, 1030, 1360, 1070", RepairConfig(crop_clamp=False))
    assert "1070" in off
    assert "1070" in _repair("x1, y1, x2, y2 = 1250, 1030, 1360, 1070", size=None)  # unknown size: no clamp


def test_block_first_code_is_left_as_written() -> None:
    code = "for i in range(3):\n    print(i)\n    total = i"
    assert _repair(code) == code  # the original's first-line alignment turned this into a SyntaxError


def test_indentation_repair_only_for_code_that_does_not_parse() -> None:
    assert _repair("    import cv2\n    x = 1") == "import cv2\nx = 1"
    aligned = _repair("import cv2\n    x = 1\n    y = 2")
    ast.parse(aligned)
    assert aligned.splitlines()[0] == "import cv2"
    broken = "import cv2\n    x = 1"
    assert _repair(broken, RepairConfig(indentation=False)) == broken


def test_image_path_literal_points_to_input_unless_the_file_is_known() -> None:
    assert _values(_repair('image_path = "/eval/17127.jpg"'), "image_path") == INPUT
    kept = _repair(f'image_path = "{SCRATCH}/prev.png"')
    assert _values(kept, "image_path") == SCRATCH + "/prev.png"
    off = _repair('image_path = "/eval/17127.jpg"', RepairConfig(image_path_literal=False))
    assert _values(off, "image_path") == "/eval/17127.jpg"


def test_output_alias_rewrites_string_literals_and_fstrings() -> None:
    code = 'p = "/mnt/data/temp_processed_images/a.jpg"\nq = f"/mnt/data/temp_processed_images/{p}"'
    repaired = _repair(code)
    assert _values(repaired, "p") == SCRATCH + "/a.jpg"
    assert "/mnt/data" not in repaired
    assert "/mnt/data" in _repair(code, RepairConfig(output_alias=False))


def test_opencv_aliases_become_cv2() -> None:
    repaired = _repair("img = cv.imread(image_path)\ng = cv3.cvtColor(img, CV.COLOR_BGR2GRAY)")
    assert "cv2.imread" in repaired and "cv2.cvtColor" in repaired and "cv2.COLOR_BGR2GRAY" in repaired
    assert "cv.imread" in _repair("img = cv.imread(image_path)", RepairConfig(opencv_alias=False))


def test_precision_rewrite_is_opt_in() -> None:
    code = 'print(f"{x:.2f}")'
    assert _repair(code) == code
    assert ":.8f}" in _repair(code, RepairConfig(precision_8f=True))


def test_syntax_error_code_comes_back_unchanged() -> None:
    code = "def f(:\n  pass"
    assert _repair(code) == code
