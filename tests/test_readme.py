"""The README's shell blocks run as written, from the repository root, in order, on a fresh copy of the repository.

The commands are read out of README.md, so the README and this test cannot drift apart. A block that needs what a
test cannot have (weights, a model server, downloaded data, the whole install) carries a marker line just above
its fence, which GitHub does not render:

    <!-- readme-test: skip: REASON -->      not run; the reason is the skip message
    <!-- readme-test: serve URL -->         a server: started, probed at URL until it answers, then stopped

Every other block runs with ``bash -euo pipefail`` in a copy of the tracked files (what a clone holds), with this
test's virtual environment as the clone's ``.venv``. Afterwards ``git status`` in the copy must be clean: whatever
the blocks wrote lies in git-ignored folders, and no file a user has was changed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER_RE = re.compile(r"^<!-- readme-test: (?P<action>skip|serve)(?::\s*|\s+)(?P<detail>.+?) -->$")
# Files the training blocks read that ship with the training examples; a checkout without them skips those blocks.
EXAMPLE_DATA_RE = re.compile(r"train/examples/data/[\w./-]+")
BLOCK_TIMEOUT_S = 1200
SERVER_START_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    code: str
    action: str  # "run", "skip" or "serve"
    detail: str = ""  # the skip reason, or the URL a server answers on


def readme_blocks(text: str) -> list[Block]:
    """The ```bash blocks of the README, with the marker line above each, in order."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index] == "```bash":
            start = index
            end = lines.index("```", start + 1)
            above = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            marker = MARKER_RE.match(above.strip())
            code = "\n".join(lines[start + 1 : end]) + "\n"
            if marker:
                blocks.append(Block(start + 1, code, marker["action"], marker["detail"]))
            else:
                blocks.append(Block(start + 1, code, "run"))
            index = end
        index += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_starts_with_the_install_and_test_commands_ci_runs() -> None:
    first = BLOCKS[0]
    assert "pip install torch==2.13.0 -e" in first.code and "-m pytest" in first.code
    assert first.action == "skip"  # .ci/run runs it; running the suite from inside the suite would recurse


def test_readme_markers_are_all_understood() -> None:
    """A typo in a marker would silently run (or not skip) a block: every marker line must parse."""
    text = README.read_text(encoding="utf-8")
    markers = [line for line in text.splitlines() if "readme-test" in line]
    assert markers and all(MARKER_RE.match(line.strip()) for line in markers), markers
    assert sum(block.action != "run" for block in BLOCKS) == len(markers)  # each marker sits above a block


def test_readme_dry_runs_use_only_shipped_example_files() -> None:
    """Files the runnable blocks name under thyme/data/examples/ ship with the package (package data)."""
    named = {m for b in BLOCKS if b.action == "run" for m in re.findall(r"thyme/data/examples/[\w.-]+", b.code)}
    assert named, "the dry runs should use the shipped examples"
    missing = [path for path in sorted(named) if not (ROOT / path).is_file()]
    assert not missing, missing


def _copy_of_the_clone(target: Path) -> Path:
    """The tracked files (plus new files not ignored), as a fresh clone of this working tree would hold them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git = ["git", "-c", "user.name=readme-test", "-c", "user.email=readme@test", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=target, check=True)
    # This test's virtual environment stands in for the clone's `.venv` (the README's install makes one there).
    (target / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    with (target / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write(".venv\n")
    return target


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return _copy_of_the_clone(tmp_path_factory.mktemp("readme-clone"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the blocks see only what the install put on the path
    return env


def _missing_example_data(block: Block, clone: Path) -> list[str]:
    return [path for path in dict.fromkeys(EXAMPLE_DATA_RE.findall(block.code)) if not (clone / path).is_file()]


def _serve_and_probe(block: Block, clone: Path) -> None:
    import httpx

    host_port = re.match(r"https?://([^/]+)", block.detail)[1]
    host, port = host_port.rsplit(":", 1)
    try:
        httpx.get(block.detail, timeout=2)
    except httpx.TransportError:
        pass
    else:
        pytest.skip(f"something already listens on {host}:{port}")
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block.code], cwd=clone, env=_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"README line {block.line}: the server exited:\n{process.stdout.read()}"
            try:
                response = httpx.get(block.detail, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"README line {block.line}: nothing answered at {block.detail}"
                time.sleep(1)
        assert response.status_code == 200, response.text
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl+C, as the README says
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{block.line}" for block in BLOCKS])
def test_readme_block_runs_as_written(block: Block, clone: Path) -> None:
    if block.action == "skip":
        pytest.skip(f"README line {block.line}: {block.detail}")
    missing = _missing_example_data(block, clone)
    if missing:
        pytest.skip(f"README line {block.line} needs {', '.join(missing)}, which this checkout does not have")
    if block.action == "serve":
        _serve_and_probe(block, clone)
        return
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code], cwd=clone, env=_env(), capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"README line {block.line} failed ({done.returncode}):\n{block.code}\n"
        f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    )


@pytest.mark.slow
def test_readme_blocks_write_only_into_ignored_folders(clone: Path) -> None:
    """Runs after the blocks (pytest keeps file order): the copy's git status is clean, so every output went to a
    git-ignored folder and no tracked file was changed."""
    command = ["git", "status", "--porcelain", "--untracked-files=all"]
    status = subprocess.run(command, cwd=clone, capture_output=True, text=True, check=True).stdout
    assert status == "", f"the README's commands left files git would show to the user:\n{status}"
