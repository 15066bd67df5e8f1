"""The Sandbox API as the agent, the trainer and the CLI use it: legit programs, sessions, results, errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import thyme.sandbox
from thyme.sandbox import InvalidInput, Limits, RepairConfig, Sandbox, SandboxClosed

LEGIT = {
    "cv2_crop_zoom": ("import cv2\nimg = cv2.imread(image_path)\ncrop = img[0:64, 90:154]\n"
                      "big = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)\n"
                      "print(big.shape, crop[0, 0].tolist(), crop[0, -1].tolist())",
                      "(128, 128, 3) [0, 0, 255] [255, 0, 0]\n"),
    "cv2_rotate_contrast": ("import cv2\nimg = cv2.imread(image_path)\n"
                            "rot = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)\n"
                            "gray = cv2.cvtColor(rot, cv2.COLOR_BGR2GRAY)\n"
                            "eq = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)\n"
                            "print(rot.shape, eq.dtype, cv2.convertScaleAbs(img, alpha=1.5, beta=10)[0, 0].tolist())",
                            "(200, 120, 3) uint8 [10, 10, 255]\n"),
    "pil_crop_rotate_enhance": ("from PIL import Image, ImageEnhance, ImageOps\nim = Image.open(image_path)\n"
                                "c = im.crop((80, 0, 120, 40)).resize((80, 80)).rotate(90, expand=True)\n"
                                "c = ImageEnhance.Contrast(c).enhance(1.8)\nc = ImageOps.grayscale(c)\n"
                                "px = c.load()\nprint(c.size, c.mode, im.getpixel((0, 0)))",
                                "(80, 80) L (255, 0, 0)\n"),
    "numpy_maths": ("import numpy as np\na = np.arange(12, dtype=float).reshape(3, 4)\n"
                    "print(a.mean(), a.sum(axis=0).tolist(), round(float(np.linalg.norm(a)), 3), a.T.shape)",
                    "5.5 [12.0, 15.0, 18.0, 21.0] 22.494 (4, 3)\n"),
    "classes_and_builtins": ("class Box:\n    def __init__(self, w, h):\n        self.w = w\n        self.h = h\n"
                             "    def area(self):\n        return self.w * self.h\n"
                             "b = Box(3, 4)\nb.w += 1\nprint(b.area(), bool(0), sorted(set([3, 1, 3])), "
                             "getattr(b, 'h'), hasattr(b, 'w'), isinstance(b, Box), type(b) is Box)",
                             "16 False [1, 3] 4 True True True\n"),
    "functions_see_globals": ("SCALE = 3\ndef zoom(x):\n    return x * SCALE\n"
                              "print(zoom(2), [zoom(i) for i in range(3)])",
                              "6 [0, 3, 6]\n"),
    "item_and_slice_augassign": ("d = {'k': 1}\nd['k'] += 1\nimport numpy as np\na = np.zeros(4, int)\n"
                                 "a[1:3] += 7\nm = [[1]]\nm[0][0] *= 5\nprint(d, a.tolist(), m)",
                                 "{'k': 2} [0, 7, 7, 0] [[5]]\n"),
    "formatting": ("x = 3.14159\nprint(f'{x:.2f}', '{:.1f}|{n}'.format(x, n='a'), '%d%%' % 50)",
                   "3.14 3.1|a 50%\n"),
    "stdlib": ("import math, json, re, datetime, collections, itertools, statistics\n"
               "print(math.floor(2.5), json.dumps({'a': 1}), re.compile(r'\\d+').findall('a1b22'), "
               "datetime.datetime.strptime('2024-02-03', '%Y-%m-%d').month, "
               "collections.Counter('aab').most_common(1), list(itertools.islice(itertools.count(), 3)), "
               "statistics.median([1, 3, 2]))  # model.eval() in a comment",
               "2 {\"a\": 1} ['1', '22'] 2 [('a', 2)] [0, 1, 2] 2\n"),
    "os_path_helpers": ("import os\nprint(os.path.basename(image_path), os.path.splitext('a/b.jpg')[1], "
                        "os.path.exists(image_path), os.path.exists('/etc/passwd'))",
                        "small.png .jpg True False\n"),
    "block_first_code": ("for i in range(2):\n    print(i)", "0\n1\n"),
    "file_objects": ("from PIL import Image\nwith open(image_path, 'rb') as f:\n    im = Image.open(f)\n"
                     "    im.load()\n"
                     "with open('/mnt/data/temp_processed_images/c.png', 'wb') as out:\n    im.save(out, 'PNG')\n"
                     "import numpy as np\nwith open('a.npy', 'wb') as g:\n    np.save(g, np.arange(3))\n"
                     "print(im.size, Image.open('c.png').size, np.load(open('a.npy', 'rb')).tolist())",
                     "(200, 120) (200, 120) [0, 1, 2]\n"),
    "subdirs_created_like_the_original": ("import cv2, os\nimg = cv2.imread(image_path)\n"
                                          "os.makedirs('/mnt/data/temp_processed_images/', exist_ok=True)\n"
                                          "p = '/mnt/data/temp_processed_images/crops/left/a.png'\n"
                                          "print(cv2.imwrite(p, img[:64, :64]), os.path.isfile('crops/left/a.png'))",
                                          "True True\n"),
    "long_loops_and_conversions": ("total = 0\nfor y in range(5000):\n    total += y\n"
                                   "print(total, list('ab'), tuple('c'), len(range(10 ** 9)))",
                                   "12497500 ['a', 'b'] ('c',) 1000000000\n"),
    "exceptions_and_lambdas": ("try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    print('caught', e)\n"
                               "f = lambda *a, **k: (len(a), sorted(k))\nprint(f(1, 2, z=1))",
                               "caught division by zero\n(2, ['z'])\n"),
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legit_program_output(sandbox: Sandbox, small_image: Path, name: str) -> None:
    code, expected = LEGIT[name]
    result = sandbox.run(code, image=str(small_image), item_id=name)
    assert result.ok, result.error
    assert result.stdout == expected


def test_two_block_conversation_keeps_variables_and_imports(sandbox: Sandbox, small_image: Path) -> None:
    with sandbox.session(image=str(small_image)) as session:
        first = session.run("import cv2\nimg = cv2.imread(image_path)\nh, w = img.shape[:2]\nprint(w, h)")
        second = session.run("crop = img[0:h // 2, 0:w // 2]\n"
                             "cv2.imwrite('/mnt/data/temp_processed_images/q.png', crop)\n"
                             "print('/mnt/data/temp_processed_images/q.png')")
        assert first.stdout == "200 120\n"
        assert second.ok, second.error
        assert second.images == [str(session.results_dir / "run-2" / "q.png")]  # a copy the worker cannot reach
        saved = cv2.imread(second.images[0])
        assert saved.shape == (60, 100, 3)  # bounds computed from names, not literals: not clamped
        assert saved[0, 0].tolist() == [0, 0, 255]


def test_several_images_come_back_in_print_order(sandbox: Sandbox, small_image: Path) -> None:
    code = ("import cv2\nimg = cv2.imread(image_path)\nout = '/mnt/data/temp_processed_images/'\n"
            "for name, x in (('left', 0), ('right', 100), ('mid', 50)):\n"
            "    cv2.imwrite(out + name + '.png', img[:, x:x + 64])\n"
            "print('Saved: ' + out + 'right.png.')\nprint(out + 'left.png,', out + 'mid.png')\n"
            "print(out + 'right.png')\nprint('mid.png.bak')")
    with sandbox.session(image=str(small_image)) as session:
        result = session.run(code)
        assert result.ok, result.error
        assert [Path(p).name for p in result.images] == ["right.png", "left.png", "mid.png"]
        assert cv2.imread(result.images[0])[0, -1].tolist() == [255, 0, 0]  # right half is blue (BGR)


def test_processed_path_counts_in_any_block_when_nothing_printed(sandbox: Sandbox, small_image: Path) -> None:
    code = ("from PIL import Image\nprocessed_path = '/mnt/data/temp_processed_images/p{n}.png'\n"
            "Image.open(image_path).crop((0, 0, 64, 64)).save(processed_path)")
    with sandbox.session(image=str(small_image)) as session:
        first, second = session.run(code.format(n=1)), session.run(code.format(n=2))
        assert first.images == [str(session.results_dir / "run-1" / "p1.png")]
        assert second.images == [str(session.results_dir / "run-2" / "p2.png")]  # the original missed later blocks
        third = session.run("print('just text')")
        assert third.images == [] and third.text == "just text"


def test_printed_image_that_was_not_saved_is_an_error(sandbox: Sandbox, small_image: Path) -> None:
    with sandbox.session(image=str(small_image), item_id="7") as session:
        result = session.run("print('/mnt/data/temp_processed_images/never.png')")
        assert not result.ok
        missing = session.scratch_dir / "never.png"
        assert result.error == (f"Sandbox for 7: Path '{missing}' found in print, but file does not exist or is "
                                "not a file.")


def test_text_result_and_bare_file_names_in_prose(sandbox: Sandbox, small_image: Path) -> None:
    result = sandbox.run("print('The input is small.png; answer: 42')", image=str(small_image))
    assert result.ok and result.images == []
    assert result.text == "The input is small.png; answer: 42"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = (", "Sandbox for e: Code execution failed due to SyntaxError: "),
        ("_hidden = 1", "Sandbox for e: Code execution failed due to SyntaxError: Line 1: \"_hidden\" is an invalid"),
        ("import requests", "Sandbox for e: Code execution failed due to ImportError. Ensure all required modules "
                            "are available and correctly named: import of 'requests' is not allowed in the sandbox"),
        ("print(undefined_name)", "Sandbox for e: Code execution failed: name 'undefined_name' is not defined"),
        ("{}['k']", "Sandbox for e: Code execution failed: KeyError: 'k'"),
        ("from PIL import Image\nImage.os", "Sandbox for e: Code execution failed: PIL.Image.os is not available"),
    ],
)
def test_code_errors_are_one_model_readable_line(sandbox: Sandbox, small_image: Path, code: str,
                                                 expected: str) -> None:
    result = sandbox.run(code, image=str(small_image), item_id="e")
    assert not result.ok
    assert result.error.startswith(expected)
    assert "\n" not in result.error


def test_sessions_are_isolated_from_each_other(sandbox: Sandbox, small_image: Path) -> None:
    with sandbox.session(image=str(small_image)) as a, sandbox.session(image=str(small_image)) as b:
        a.run("secret = 41")
        assert b.run("print(secret)").error.endswith("name 'secret' is not defined")
        assert a.scratch_dir != b.scratch_dir
        a.run("open('/mnt/data/temp_processed_images/a.txt', 'w').write('x')")
        assert "reading" in b.run(f"print(open('{a.scratch_dir}/a.txt').read())").error


def test_several_inputs_and_the_callers_original_path(sandbox: Sandbox, small_image: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.png"
    cv2.imwrite(str(second), np.full((30, 40, 3), 9, np.uint8))
    with sandbox.session(images=[str(small_image), str(second)]) as session:
        assert [Path(p).name for p in session.input_paths] == ["small.png", "second.png"]
        assert all(Path(p).parent.name == "inputs" for p in session.input_paths)
        code = f"import cv2\nprint(cv2.imread('{session.input_paths[1]}').shape, cv2.imread('{second}').shape)"
        assert session.run(code).stdout == "(30, 40, 3) (30, 40, 3)\n"


def test_repairs_can_be_switched_off(example: dict) -> None:
    with Sandbox(repairs=RepairConfig(crop_clamp=False), pool_size=0) as sb:
        with sb.session(image=str(example["image"])) as session:
            result = session.run(example["code"])
            assert result.ok, result.error
            assert cv2.imread(result.images[0]).shape == (80, 220, 3)  # the unclamped 110x40 crop, zoomed 2x
            assert not any("clamped" in note for note in result.repairs)


def test_corrupt_input_gives_clear_error_and_next_session_works(sandbox: Sandbox, small_image: Path,
                                                                tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    with sandbox.session(image=str(corrupt), item_id="42") as session:
        result = session.run("print(1)")
        assert not result.ok
        assert result.error.startswith("Sandbox for 42: Cannot run code: the input file 'broken.jpg' is not a "
                                       "readable image")
    assert sandbox.run("print(2)", image=str(small_image)).stdout == "2\n"


def test_input_over_pixel_limit_is_refused(small_image: Path) -> None:
    with Sandbox(limits=Limits(max_pixels=10_000), pool_size=0) as sb:
        result = sb.run("print(1)", image=str(small_image), item_id="big")
        assert not result.ok
        assert result.error == ("Sandbox for big: Cannot run code: the input image 'small.png' has more pixels "
                                "than the limit of 10000.")


def test_missing_input_raises_invalid_input(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist or is not a file"):
        sandbox.session(image=str(tmp_path / "nope.jpg"))
    with pytest.raises(InvalidInput, match="exactly one of"):
        sandbox.session()


def test_timeout_kills_worker_and_session_continues_without_old_variables(small_image: Path) -> None:
    with Sandbox(timeout=1.5, pool_size=1) as sb, sb.session(image=str(small_image), item_id="t") as session:
        session.run("kept = 1")
        start = time.monotonic()
        result = session.run("while True:\n    pass")
        assert time.monotonic() - start < 20
        assert result.error == "Sandbox for t: Execution timed out after 1.5 seconds."
        after = session.run("print(kept)")
        assert "name 'kept' is not defined" in after.error
        assert "variables from earlier code blocks are gone" in after.error
        assert session.run("print(3)").stdout == "3\n"


def test_worker_crash_is_reported_and_replaced(sandbox: Sandbox, small_image: Path) -> None:
    with sandbox.session(image=str(small_image), item_id="c") as session:
        session.run("x = 1")
        pid = session._worker.pid
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        result = session.run("import time\ntime.sleep(8)")
        assert result.error.startswith(
            "Sandbox for c: Code execution failed: the sandbox process stopped with SIGKILL")
        assert session.run("print(5)").stdout == "5\n"
        assert session._worker.pid != pid


def test_cpu_rlimit_backs_up_the_wall_clock(small_image: Path) -> None:
    with Sandbox(limits=Limits(timeout_s=60, cpu_s=1), pool_size=0) as sb:
        result = sb.run("while True:\n    pass", image=str(small_image), item_id="cpu")
        assert result.error.startswith("Sandbox for cpu: Code execution failed: the sandbox process stopped with "
                                       "SIGXCPU: it used up its CPU time limit")


def test_close_deletes_session_files_and_refuses_further_runs(sandbox: Sandbox, small_image: Path) -> None:
    session = sandbox.session(image=str(small_image))
    session.run("open('/mnt/data/temp_processed_images/n.txt', 'w').write('1')")
    assert (session.scratch_dir / "n.txt").exists()
    session.close()
    assert not session.scratch_dir.exists() and not session.results_dir.exists()
    with pytest.raises(SandboxClosed):
        session.run("print(1)")


def test_one_shot_run_keeps_images_until_the_sandbox_closes(small_image: Path) -> None:
    code = ("import cv2\ncv2.imwrite('/mnt/data/temp_processed_images/o.png', cv2.imread(image_path)[:64, :64])\n"
            "print('/mnt/data/temp_processed_images/o.png')")
    with Sandbox(pool_size=0) as sb:
        result = sb.run(code, image=str(small_image))
        assert cv2.imread(result.images[0]).shape == (64, 64, 3)
    assert not Path(result.images[0]).exists()


def test_closed_sandbox_refuses_sessions(small_image: Path) -> None:
    sb = Sandbox(pool_size=0)
    sb.close()
    with pytest.raises(SandboxClosed):
        sb.session(image=str(small_image))


def test_pool_keeps_warm_workers_ready(small_image: Path) -> None:
    with Sandbox(pool_size=1) as sb:
        assert sb.wait_ready(120)
        with sb.session(image=str(small_image)):
            assert sb.wait_ready(120)  # a replacement was started behind the taken worker
        assert sb.isolation["network"] != ""


def test_exported_members_match_all() -> None:
    public = {name for name in dir(thyme.sandbox) if not name.startswith("_")}
    assert set(thyme.sandbox.__all__) <= public
    assert {"Sandbox", "Session", "ExecutionResult", "SandboxError", "Limits", "RepairConfig"} <= set(
        thyme.sandbox.__all__)


def test_import_sandbox_does_not_import_torch() -> None:
    code = "import sys, thyme.sandbox\nprint(sorted(m for m in ('torch', 'transformers', 'cv2') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # not even cv2: only workers import the image libraries


def test_worker_dying_while_reading_the_input_is_an_input_error(small_image: Path, tmp_path: Path) -> None:
    from thyme.sandbox.isolation import Isolation
    from thyme.sandbox.local import new_session_dir
    from thyme.sandbox.process import WorkerProcess
    from thyme.sandbox.session import Session

    root = Path(tempfile.mkdtemp(prefix="thyme-test-"))
    root.chmod(0o711)

    def dying_worker(session_dir: Path | None = None) -> WorkerProcess:  # a malicious input crashing the decoder
        worker = WorkerProcess(Limits(), str(session_dir or new_session_dir(root)), Isolation())
        os.kill(worker.pid, signal.SIGKILL)
        worker.process.wait()
        return worker

    try:
        with Session([str(small_image)], "bad", Limits(), RepairConfig(), dying_worker, dying_worker,
                     tmp_path) as session:
            result = session.run("print(1)")
            assert result.error.startswith("Sandbox for bad: Cannot run code: reading the input image(s) stopped "
                                           "the sandbox process (the sandbox process stopped with SIGKILL")
            assert session.run("print(1)").error == result.error  # no new worker is thrown at the same input
    finally:
        shutil.rmtree(root)


def test_sessions_run_concurrently_from_threads(sandbox: Sandbox, small_image: Path) -> None:
    results: dict[int, object] = {}

    def work(value: int) -> None:
        with sandbox.session(image=str(small_image), item_id=str(value)) as session:
            code = (f"import numpy as np, cv2\nv = {value}\nimport time\ntime.sleep(0.2)\n"
                    "cv2.imwrite('/mnt/data/temp_processed_images/v.png', np.full((8, 8), v, np.uint8))\n"
                    "print('/mnt/data/temp_processed_images/v.png')")
            result = session.run(code)
            results[value] = (result.ok, int(cv2.imread(result.images[0], cv2.IMREAD_GRAYSCALE)[0, 0]))

    threads = [threading.Thread(target=work, args=(value,)) for value in (10, 20, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {10: (True, 10), 20: (True, 20), 30: (True, 30)}


def test_every_allowed_import_works(sandbox: Sandbox, small_image: Path) -> None:
    from thyme.sandbox.policy import ALLOWED_IMPORTS

    code = "\n".join(f"import {name}" for name in sorted(ALLOWED_IMPORTS)) + "\nprint('imported')"
    result = sandbox.run(code, image=str(small_image))
    assert result.ok, result.error
    assert result.stdout == "imported\n"
