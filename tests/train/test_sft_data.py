"""Thyme-SFT rows: path rewriting of released rows (issue #7), image mapping, and ``thyme data convert``."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.sft_rows import sft_response
from thyme.errors import ConfigError, ImageError, ProtocolError
from thyme.prompts import SYSTEM_PROMPT, user_prompt
from thyme.train.sft_data import (
    convert_files,
    decode_image,
    question_image_path,
    rewrite_row_paths,
    row_to_trajectory,
)

AUTHORS_PATH = "/mllm_hdd/yfzhang/data/vstar/direct_attributes/sa_17127.jpg"


def _released_row(images: list) -> dict:
    """A row shaped like the released data: the authors' path in the question and, twice, in the code."""
    response = (
        "<think>Crop the plate. <code>\n```python\nimport cv2\n"
        f'image_path = "{AUTHORS_PATH}"\nimg = cv2.imread("/mnt/other_mount/sa_17127.jpg")\n'
        'cv2.imwrite("/mnt/data/temp_processed_images/crop.jpg", img)\n```\n</code>'
        "<sandbox_output><image></sandbox_output>The plate reads S QT 911.</think> <answer>C</answer>"
    )
    return {"image": images, "question": user_prompt("Which plate?", AUTHORS_PATH, 2048, 1536), "response": response}


def _b64(size: tuple[int, int], image_format: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def test_rewrite_row_paths_points_question_and_code_at_local_files() -> None:
    row = _released_row(["b64-0", "b64-1"])
    local = ["/data/thyme/sa_17127.jpg", "/data/thyme/crop.png"]
    new = rewrite_row_paths(row, local)
    assert question_image_path(new["question"]) == "/data/thyme/sa_17127.jpg"
    assert "/mllm_hdd" not in new["question"] and "/mllm_hdd" not in new["response"]
    assert 'image_path = "/data/thyme/sa_17127.jpg"' in new["response"]
    assert 'cv2.imread("/data/thyme/sa_17127.jpg")' in new["response"]
    # The sandbox's output alias is part of the protocol and stays as trained.
    assert '"/mnt/data/temp_processed_images/crop.jpg"' in new["response"]
    assert new["image"] == local
    assert "2048x1536" in new["question"]
    assert row["question"].count(AUTHORS_PATH) == 1 and row["image"] == ["b64-0", "b64-1"]  # input untouched


def test_rewrite_row_paths_needs_one_path_per_image() -> None:
    with pytest.raises(ProtocolError, match=r"1 local image path\(s\) given for a row with 2 image\(s\)"):
        rewrite_row_paths(_released_row(["a", "b"]), ["/x.jpg"])


def test_row_to_trajectory_maps_placeholders_to_the_image_list_in_order() -> None:
    row = {"image": ["/in.png", "/c1.png", "/c2.png"], "question": user_prompt("Q?", "/in.png", 4, 3)}
    row["response"] = sft_response()
    messages = row_to_trajectory(row).to_messages()
    assert messages[0]["content"][0]["text"] == SYSTEM_PROMPT
    assert messages[1]["content"][0] == {"type": "image", "image": "/in.png"}
    assert messages[1]["content"][1]["text"].startswith("\nQ?\n")  # <image> became the vision block
    assistant_images = [item["image"] for item in messages[2]["content"] if item["type"] == "image"]
    assert assistant_images == ["/c1.png", "/c2.png"]
    plain = row_to_trajectory(row, use_system_prompt=False).to_messages()
    assert plain[0]["content"][0]["text"] == "You are a helpful assistant."


def test_row_to_trajectory_rejects_image_count_mismatch() -> None:
    row = {"image": ["/in.png", "/c1.png"], "question": "<image>\nQ?", "response": sft_response()}
    with pytest.raises(ProtocolError, match=r"2 image\(s\) but 1 <image> placeholder\(s\) in the question and 2 in"):
        row_to_trajectory(row)


def test_decode_image_explains_bad_entries() -> None:
    with pytest.raises(ImageError, match="neither an existing file nor valid base64"):
        decode_image("not base64 at all!")
    with pytest.raises(ImageError, match="type int is not base64 text"):
        decode_image(7)
    assert decode_image({"bytes": b"\x89PNG"}) == b"\x89PNG"


def test_convert_files_decodes_parquet_rows_and_skips_bad_ones(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _released_row([_b64((64, 48), "JPEG"), _b64((32, 32), "PNG")])
    corrupt = _released_row([base64.b64encode(b"not an image").decode(), _b64((8, 8), "PNG")])
    pq.write_table(pa.Table.from_pylist([good, corrupt]), tmp_path / "2round.parquet")

    report = convert_files([tmp_path / "2round.parquet"], tmp_path / "out" / "sft.jsonl")

    assert (report.rows, report.images, len(report.skipped)) == (1, 2, 1)
    assert "2round.parquet row 1: image bytes cannot be decoded" in report.skipped[0]
    row = json.loads((tmp_path / "out" / "sft.jsonl").read_text(encoding="utf-8"))
    original, crop = (Path(path) for path in row["image"])
    assert original.name == "sa_17127.jpg" and crop.suffix == ".png"
    assert original.read_bytes() == base64.b64decode(good["image"][0])  # kept byte for byte
    assert question_image_path(row["question"]) == str(original)
    assert f'image_path = "{original}"' in row["response"]
    assert not (tmp_path / "out" / "sft_images" / "2round-0000001").exists()


def test_convert_files_fixes_paths_of_readme_converted_jsonl(tmp_path: Path) -> None:
    local = tmp_path / "img.jpg"
    Image.new("RGB", (10, 10)).save(local)
    crop = tmp_path / "crop.png"
    Image.new("RGB", (8, 8)).save(crop)
    (tmp_path / "in.jsonl").write_text(json.dumps(_released_row([str(local), str(crop)])) + "\n", encoding="utf-8")
    report = convert_files([tmp_path / "in.jsonl"], tmp_path / "fixed.jsonl")
    row = json.loads((tmp_path / "fixed.jsonl").read_text(encoding="utf-8"))
    assert report.rows == 1 and row["image"] == [str(local), str(crop)]
    assert question_image_path(row["question"]) == str(local)
    assert not (tmp_path / "fixed_images").exists()


def test_convert_files_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "out.jsonl").write_text("keep me", encoding="utf-8")
    with pytest.raises(ConfigError, match="out.jsonl exists: choose another output or pass --overwrite"):
        convert_files([tmp_path / "in.jsonl"], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == "keep me"


def test_thyme_data_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from thyme.cli import main

    rows = [_released_row([_b64((16, 16), "PNG"), _b64((8, 8), "PNG")]) for _ in range(3)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    code = main(["data", "convert", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--limit", "2"])
    assert code == 0
    assert f"wrote 2 rows (4 images) to {tmp_path / 'out.jsonl'}; skipped 0" in capsys.readouterr().out
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["data", "convert", str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "x.jsonl")]) == 1
    assert "input file(s) not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.parquet", b"PAR1 but not really", "not a readable parquet file"),
        ("bad.json", b"{not json", "not valid JSON"),
        ("bad.jsonl", b'{"image": []}\n{oops\n', "bad.jsonl:2: not valid JSON"),
        ("rows.csv", b"a,b\n", "unknown data file type '.csv'"),
    ],
)
def test_convert_files_names_unreadable_inputs(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        convert_files([tmp_path / name], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
