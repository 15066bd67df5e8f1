"""Reading benchmark files: VLMEvalKit TSV with base64 images, JSONL, and the errors bad rows get."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from thyme.evaluation.datasets import DatasetError, load_dataset, materialize_image

HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category"]


def _b64_image(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def test_tsv_reads_base64_images_options_and_categories(tmp_path: Path) -> None:
    red = _b64_image((255, 0, 0))
    tsv = _write_tsv(
        tmp_path / "HRBench4K.tsv",
        HEADER,
        [
            ["0", red, "What color is the car?", "nan", "red", "blue", "green", "", "A", "FSP", "attr"],
            # VLMEvalKit stores an image once; a short cell is the index of the row that has it.
            ["1", "0", "Is the car on the left?", "", "yes side", "no side", "", "", "B", "FCP", "pos"],
        ],
    )
    items = load_dataset(tsv)
    assert [i.index for i in items] == ["0", "1"]
    first, second = items
    assert first.options == {"A": "red", "B": "blue", "C": "green"}  # empty D cell: no option D
    assert (first.answer, first.category, first.l2_category, first.hint) == ("A", "FSP", "attr", None)
    assert first.question_type == "mcq"
    path = materialize_image(first, tmp_path / "cache")
    with Image.open(path) as image:
        assert image.size == (40, 30)
        assert image.getpixel((20, 15))[0] > 200  # the decoded pixels, not just a file
    assert materialize_image(second, tmp_path / "cache") == path  # same bytes, one cached file
    assert second.options == {"A": "yes side", "B": "no side"}


def test_tsv_answer_given_as_option_text_maps_to_its_letter(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "d.tsv", HEADER, [["7", _b64_image((0, 0, 0)), "q", "", "cat", "dog", "", "", "dog", "", ""]]
    )
    assert load_dataset(tsv)[0].answer == "B"


def test_tsv_with_a_byte_order_mark_keeps_its_index_column(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "d.tsv", HEADER, [["3", _b64_image((0, 0, 0)), "q", "", "x", "y", "", "", "A", "", ""]]
    )
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())  # as spreadsheet programs save "UTF-8 with BOM"
    assert load_dataset(tsv)[0].index == "3"


def test_tsv_with_image_path_column_resolves_relative_to_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    tsv = _write_tsv(tmp_path / "d.tsv", ["index", "image_path", "question", "answer"], [["1", "a.png", "q", "Yes"]])
    item = load_dataset(tsv)[0]
    assert item.image_path == tmp_path / "a.png"
    assert item.question_type == "yes_no"
    assert materialize_image(item, tmp_path / "cache") == tmp_path / "a.png"
    assert not (tmp_path / "cache").exists()  # nothing copied for a path


def test_tsv_missing_column_is_named(tmp_path: Path) -> None:
    tsv = _write_tsv(tmp_path / "d.tsv", ["index", "image", "question"], [["1", _b64_image((1, 2, 3)), "q"]])
    with pytest.raises(DatasetError, match=r"d\.tsv: missing column\(s\) answer;"):
        load_dataset(tsv)


def test_tsv_empty_answer_names_the_row(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "d.tsv", HEADER, [["42", _b64_image((0, 0, 0)), "q", "", "x", "y", "", "", "", "", ""]]
    )
    with pytest.raises(DatasetError, match=r"d\.tsv:2 \(index '42'\): the 'answer' cell is empty"):
        load_dataset(tsv)


def test_undecodable_image_names_the_row(tmp_path: Path) -> None:
    not_an_image = base64.b64encode(b"definitely not an image" * 10).decode()
    tsv = _write_tsv(tmp_path / "d.tsv", HEADER, [["9", not_an_image, "q", "", "x", "y", "", "", "A", "", ""]])
    item = load_dataset(tsv)[0]
    with pytest.raises(DatasetError, match=r"row index '9': the base64 data is not an image Pillow can read"):
        materialize_image(item, tmp_path / "cache")
    broken = load_dataset(
        _write_tsv(tmp_path / "e.tsv", HEADER, [["3", "%%%" * 40, "q", "", "x", "y", "", "", "A", "", ""]])
    )
    with pytest.raises(DatasetError, match=r"row index '3': the image is neither an existing file nor valid base64"):
        materialize_image(broken[0], tmp_path / "cache")


def test_mcq_answer_that_is_no_option_is_an_error(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "d.tsv", HEADER, [["1", _b64_image((0, 0, 0)), "q", "", "x", "y", "", "", "C", "", ""]]
    )
    with pytest.raises(DatasetError, match=r"answer 'C' is neither an option letter \(A, B\) nor the text of one"):
        load_dataset(tsv)


def test_jsonl_rows_paths_lists_and_extra_fields(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    rows = [
        {"image": "x.jpg", "question": "Color?", "options": ["red", "blue"], "answer": "blue", "category": "color",
         "bbox": [[1, 2, 3, 4]]},
        {"image": "x.jpg", "question": "Word?", "answer": ["maple", "maple leaf"]},
        {"index": "z", "image": _b64_image((0, 9, 0)), "question": "Seen?", "options": {"A": "y", "B": "n"},
         "answer": "A"},
    ]  # fmt: skip
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    first, second, third = load_dataset(path)
    assert (first.index, first.answer, first.options, first.extra) == (
        "0", "B", {"A": "red", "B": "blue"}, {"bbox": [[1, 2, 3, 4]]}
    )  # fmt: skip
    assert (second.question_type, second.answer, second.extra_answers) == ("vqa", "maple", ("maple leaf",))
    assert third.index == "z" and third.image_b64 is not None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "x.jpg", "question": "q"}', r"set\.jsonl:1: missing key\(s\) answer"),
        ("not json", r"set\.jsonl:1: not valid JSON"),
        ('["a list"]', r"set\.jsonl:1: expected a JSON object, got list"),
        ('{"image": "x.jpg", "question": "q", "answer": "A", "options": 3}', r"'options' must be a list"),
    ],
)
def test_jsonl_bad_rows(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_duplicate_index_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    row = json.dumps({"index": "1", "image": "x.jpg", "question": "q", "answer": "a"})
    path.write_text(f"{row}\n{row}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="index '1' appears twice"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.tsv")
    item = load_dataset(
        _write_tsv(tmp_path / "p.tsv", ["index", "image_path", "question", "answer"], [["1", "gone.png", "q", "a"]])
    )[0]
    with pytest.raises(DatasetError, match=r"row index '1': image file .*gone\.png does not exist"):
        materialize_image(item, tmp_path / "cache")


def test_folder_loads_every_file_with_prefixed_indices(tmp_path: Path) -> None:
    for name in ("vstar", "hr"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": "x.jpg", "question": "q", "answer": "a"}) + "\n")
    assert [i.index for i in load_dataset(tmp_path)] == ["hr/0", "vstar/0"]


def test_tsv_written_by_pandas_keeps_quotes_and_newlines(tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    question = 'What does the "EXIT" sign say?\nLook closely.'
    frame = pandas.DataFrame(
        [{"index": 5, "image": _b64_image((9, 9, 9)), "question": question, "A": 'say "hi"', "B": "no", "answer": "A"}]
    )
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)  # how VLMEvalKit writes its TSVs
    (item,) = load_dataset(tmp_path / "d.tsv")
    assert (item.index, item.question, item.options) == ("5", question, {"A": 'say "hi"', "B": "no"})
