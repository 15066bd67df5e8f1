"""The process layer holds on its own: a bare interpreter after ``worker.isolate`` (no RestrictedPython, no
facades) cannot fork, start threads, connect, write outside the sandbox dir, modify an input copy, read root's
files, regain root or allocate past the memory limit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from thyme.sandbox.process import CLEAN_ENV

ATTACKS = r'''
import json, os, socket, sys, threading
from thyme.sandbox.limits import Limits
from thyme.sandbox.worker import isolate

writable, port, sentinel, copy, secret = sys.argv[1:6]
out = {"report": isolate(Limits(memory_mb=1024), writable)}

def attempt(name, action):
    try:
        action()
        out[name] = "done"
    except BaseException as exc:
        out[name] = f"{type(exc).__name__}: {exc}"

def fork():
    if os.fork() == 0:
        os._exit(0)

attempt("fork", fork)
attempt("thread", lambda: threading.Thread(target=lambda: None).start())
attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(port)), timeout=2))
attempt("write_tmp", lambda: open(sentinel, "w").close())
attempt("write_dev_shm", lambda: open("/dev/shm/" + os.path.basename(sentinel), "w").close())
attempt("modify_input_copy", lambda: open(copy, "ab").close())
attempt("chmod_input_copy", lambda: os.chmod(copy, 0o666))
attempt("read_secret", lambda: open(secret).read())
attempt("setuid_root", lambda: os.setuid(0))
attempt("allocate_2gib", lambda: bytearray(2 * 1024 ** 3))
attempt("write_own_dir", lambda: open(os.path.join(writable, "scratch", "ok.txt"), "w").close())
print(json.dumps(out))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="the full process layer (namespaces, own uid) needs root")
def test_isolated_worker_process_holds_without_the_language_policy(tmp_path: Path) -> None:
    sandbox_dir = Path(tempfile.mkdtemp(prefix="thyme-isolation-"))  # like Sandbox's own dir: /tmp, 0711
    try:
        _attack(sandbox_dir, tmp_path)
    finally:
        shutil.rmtree(sandbox_dir)


def _attack(sandbox_dir: Path, tmp_path: Path) -> None:
    (sandbox_dir / "inputs").mkdir()
    sandbox_dir.chmod(0o711)
    copy = sandbox_dir / "inputs" / "in.jpg"
    copy.write_bytes(b"original")
    copy.chmod(0o444)
    scratch = sandbox_dir / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)  # the uid is only known inside; let it write here to prove its own dir works
    secret = tmp_path / "secret.txt"  # tmp_path is root-only (0700)
    secret.write_text("s3cret")
    sentinel = Path("/tmp") / f"thyme-isolation-{uuid.uuid4().hex}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", ATTACKS, str(sandbox_dir), str(server.getsockname()[1]), str(sentinel),
             str(copy), str(secret)],
            cwd=sandbox_dir, env=CLEAN_ENV, capture_output=True, text=True, timeout=120,
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    report = out.pop("report")
    assert report["network"].startswith("network namespace")
    assert report["files"] == f"read-only except {sandbox_dir}"
    assert report["uid"] != 0 and "dropped from root" in report["user"]
    assert report["rlimits"] == "all set"
    assert out.pop("write_own_dir") == "done"
    for attack, outcome in out.items():
        assert outcome != "done", f"{attack} succeeded in the isolated process"
    assert not sentinel.exists()
    assert not Path("/dev/shm", sentinel.name).exists()
    assert copy.read_bytes() == b"original"
    assert out["allocate_2gib"].startswith("MemoryError")
