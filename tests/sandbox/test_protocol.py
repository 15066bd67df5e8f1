"""The parent trusts nothing from the worker: escaped code (plain exec, ``Sandbox(_language_layer=False)``) that
forges replies on the protocol pipe or keeps running after its reply gets neither accepted.

Each test judges the effect: the forged text never reaches the result, the marker file that code running after the
reply would write never appears, the returned image is still the regular file it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from thyme.sandbox import Sandbox
from thyme.sandbox.process import _process_state

FIND_REPLY_PIPES = '''
import json, os, stat
def reply_pipes():
    for fd in range(3, 64):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                yield fd
        except OSError:
            pass
def forge(message):
    for fd in reply_pipes():
        try:
            os.write(fd, (json.dumps(message) + "\\n").encode())
        except OSError:
            pass
'''


@pytest.fixture(scope="module")
def escaped() -> Iterator[Sandbox]:
    with Sandbox(timeout=3, pool_size=0, _language_layer=False) as sandbox:
        yield sandbox


def test_a_forged_reply_without_the_nonce_fails_the_run(escaped: Sandbox, small_image: Path) -> None:
    with escaped.session(image=str(small_image)) as session:
        code = FIND_REPLY_PIPES + (
            "forge({'stdout': 'FORGED', 'error': None, 'repairs': []})\n"
            "import time\ntime.sleep(1)\nopen(temp_output_dir + 'after.txt', 'w').write('ran on')\n"
        )
        result = session.run(code)
        assert not result.ok
        assert "FORGED" not in result.stdout
        assert "not the protocol" in result.error
        time.sleep(1.5)
        assert not (session.scratch_dir / "after.txt").exists()  # killed at once, before its sleep ended
        again = session.run("print('fresh')")  # the session goes on with a new worker
        assert again.ok and again.stdout == "fresh\n"


def test_a_forged_reply_with_the_nonce_that_keeps_running_fails_the_run(escaped: Sandbox, small_image: Path) -> None:
    """The code reads the nonce out of the worker's own frames (it has the whole language) and forges a well-formed
    reply; it does not stop after it, so the parent never takes it."""
    with escaped.session(image=str(small_image)) as session:
        code = FIND_REPLY_PIPES + (
            "import sys\nframe = sys._getframe()\nnonce = None\n"
            "while frame is not None:\n"
            "    nonce = frame.f_locals.get('nonce') or nonce\n"
            "    frame = frame.f_back\n"
            "forge({'stdout': 'FORGED', 'error': None, 'repairs': [], 'nonce': nonce})\n"
            "import time\nwhile True:\n    time.sleep(0.05)\n"
        )
        result = session.run(code)
        assert not result.ok
        assert "FORGED" not in result.stdout
        assert "kept running" in result.error


def test_no_code_of_a_run_executes_after_its_reply(escaped: Sandbox, small_image: Path, tmp_path: Path) -> None:
    """A timer set by the code fires after the worker replied: it would swap the returned image for a symlink to
    a secret. The worker is stopped from its reply until the next request, so the timer never fires meanwhile."""
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    with escaped.session(image=str(small_image)) as session:
        code = (
            "import os, signal\n"
            "open(temp_output_dir + 'out.png', 'wb').write(open(image_path, 'rb').read())\n"
            "def swap(*_):\n"
            "    os.replace(temp_output_dir + 'out.png', temp_output_dir + 'moved.png')\n"
            f"    os.symlink({str(secret)!r}, temp_output_dir + 'out.png')\n"
            "    open(temp_output_dir + 'after.txt', 'w').write('ran on')\n"
            "signal.signal(signal.SIGALRM, swap)\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"
            "print(temp_output_dir + 'out.png')\n"
        )
        result = session.run(code)
        assert result.ok, result.error
        assert [Path(image).name for image in result.images] == ["out.png"]
        returned = Path(result.images[0])
        time.sleep(1.5)
        assert _process_state(session._worker.pid) == "T"  # stopped while the caller holds the result
        assert not (session.scratch_dir / "after.txt").exists()
        assert returned.is_file() and not returned.is_symlink()  # the parent's copy: the swap did not reach it
        assert returned.read_bytes() == small_image.read_bytes()
