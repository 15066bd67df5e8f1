"""One conversation with the sandbox: its input copies, its scratch dir, and the worker that holds its variables."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from thyme.sandbox.errors import InvalidInput, SandboxClosed
from thyme.sandbox.limits import Limits
from thyme.sandbox.process import ExecutionTimedOut, ProtocolViolation, WorkerDied, WorkerProcess
from thyme.sandbox.repair import RepairConfig
from thyme.sandbox.result import ExecutionResult
from thyme.sandbox.returned import clean_text, collect_images

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0
"""Time a worker may take to build a session's namespace and read the input headers."""


class Session:
    """A conversation: code blocks run one after another in the same worker, so variables and imports persist.

    Create it with :meth:`Sandbox.session`. The images the code saves stay on disk until :meth:`close`.

    Attributes:
        input_paths (`list[str]`): the paths to tell the model (the prompt's image path). They are read-only
            copies of the caller's files, which the code can never modify.
        scratch_dir (`pathlib.Path`): where the code's files go; ``/mnt/data/temp_processed_images/`` stands for it.
            It belongs to the worker: the parent reads nothing there but the files a run returns, without
            following links.
        results_dir (`pathlib.Path`): where the checked copies of returned images go (``result.images``), one
            sub-dir per run; outside the worker's reach, so nothing the code does later changes them.
        item_id (`str`): the id in every error line (``Sandbox for <item_id>: ...``).
    """

    def __init__(self, images: Sequence[str | os.PathLike[str]], item_id: str | None, limits: Limits,
                 repairs: RepairConfig, acquire: Callable[[], WorkerProcess],
                 restart: Callable[[Path], WorkerProcess], results_root: Path) -> None:
        originals = [_check_image_path(path) for path in images]
        if not originals:
            raise InvalidInput("a session needs at least one input image: pass image=PATH or images=[...]")
        self.item_id = item_id if item_id is not None else Path(originals[0]).stem
        self._limits = limits
        self._repairs = repairs
        self._restart = restart
        self._lock = threading.Lock()
        # The worker comes first: it was started (warm) for its own session dir, the only one it can see.
        worker = acquire()
        self._closed = False
        self._dir = Path(worker.session_dir)
        self.scratch_dir = self._dir / "scratch"
        self.results_dir = Path(tempfile.mkdtemp(prefix="session-", dir=results_root))
        self._runs = 0
        self._worker: WorkerProcess | None = None
        self._input_error: str | None = None
        try:
            self._inputs = self._copy_inputs(originals)
            self.input_paths: list[str] = list(self._inputs.values())
            self._open(worker)
        except BaseException:
            worker.kill()
            self.close()
            raise

    def _copy_inputs(self, originals: list[str]) -> dict[str, str]:
        inputs_dir = self._dir / "inputs"
        copies: dict[str, str] = {}
        for index, original in enumerate(originals):
            name = Path(original).name
            target = inputs_dir / (name if not (inputs_dir / name).exists() else f"{index}_{name}")
            shutil.copyfile(original, target)  # a copy, not chmod: the caller's file is never touched
            target.chmod(0o444)
            copies[original] = str(target)
        return copies

    def _open(self, worker: WorkerProcess) -> None:
        if os.geteuid() == 0 and worker.uid != 0:
            os.chown(self.scratch_dir, worker.uid, worker.uid)  # the scratch dir belongs to this worker alone
            _hand_over(self.scratch_dir, worker.uid)  # files of a previous (killed) worker of this session
        try:
            reply = worker.request(
                {"op": "open", "scratch_dir": str(self.scratch_dir), "inputs": list(self._inputs.items()),
                 "repairs": vars(self._repairs)},
                OPEN_TIMEOUT_S,
            )
        except (ExecutionTimedOut, WorkerDied, ProtocolViolation) as exc:
            # Reading the input headers is the only thing `open` does with outside data: a crash or hang here is
            # the input's fault (a malicious file), and is reported on every run instead of raised.
            worker.kill()
            self._input_error = f"reading the input image(s) stopped the sandbox process ({exc})"
            return
        self._worker = worker
        self._input_error = reply.get("input_error")

    def run(self, code: str) -> ExecutionResult:
        """Runs one code block. Never raises for anything the code does; see ``ExecutionResult.error``.

        Raises:
            SandboxClosed: the session or its Sandbox was closed.
            WorkerError: no worker could be started to run the code.
        """
        with self._lock:
            if self._closed:
                raise SandboxClosed(f"session {self.item_id!r} is closed")
            if self._input_error is not None:
                return self._failed(f"Cannot run code: {self._input_error}.", "")
            lost = ""
            if self._worker is None or not self._worker.alive:
                self._open(self._restart(self._dir))
                lost = " (the previous sandbox process was stopped: variables from earlier code blocks are gone)"
                if self._input_error is not None:
                    return self._failed(f"Cannot run code: {self._input_error}.", "")
            assert self._worker is not None
            timeout_s = self._limits.timeout_s
            try:
                reply = self._worker.request({"op": "run", "code": code}, timeout_s)
            except ExecutionTimedOut:
                self._worker = None
                return self._failed(f"Execution timed out after {timeout_s:g} seconds.", "")
            except WorkerDied as exc:
                self._worker = None
                return self._failed(f"Code execution failed: {exc}; variables from earlier code blocks are gone.", "")
            except ProtocolViolation as exc:
                self._worker = None
                return self._failed(f"Code execution failed: {exc}; the sandbox process was stopped and variables "
                                    "from earlier code blocks are gone.", "")
            # The reply comes from a process the code may control: every field is checked for its type, and text
            # is cleaned so that it can always be encoded (a lone surrogate would break the HTTP server's JSON).
            stdout = clean_text(str(reply.get("stdout", "")))
            notes = reply.get("repairs")
            repairs = [clean_text(str(note)) for note in notes] if isinstance(notes, list) else []
            if reply.get("error"):
                return self._failed(f"{clean_text(str(reply['error']))}{lost}", stdout, repairs)
            processed = reply.get("processed_path")
            self._runs += 1
            target = self.results_dir / f"run-{self._runs}"
            target.mkdir(mode=0o700)
            images, problem = collect_images(
                stdout, str(processed) if processed is not None else None, reply.get("processed_path_is_str") is True,
                self.scratch_dir, target, max_pixels=self._limits.max_pixels,
                max_file_bytes=self._limits.file_size_mb * 2**20, max_total_bytes=self._limits.scratch_mb * 2**20,
            )  # fmt: skip
            if not images:
                target.rmdir()
            if problem is not None:
                return self._failed(problem, stdout, repairs)
            return ExecutionResult(ok=True, stdout=stdout, images=images, repairs=repairs)

    def _failed(self, message: str, stdout: str, repairs: list[str] | None = None) -> ExecutionResult:
        error = f"Sandbox for {self.item_id}: {message}"
        logger.debug("%s", error)
        return ExecutionResult(ok=False, stdout=stdout, error=error, repairs=repairs or [])

    def close(self, *, keep_files: bool = False) -> None:
        """Stops the worker and deletes the input copies and the saved images.

        Args:
            keep_files (`bool`, defaults to `False`): stop the worker but leave the files (``Sandbox.run`` does
                this; the Sandbox deletes them when it closes).
        """
        with self._lock:
            self._closed = True
            if self._worker is not None:
                self._worker.kill()
                self._worker = None
            if not keep_files:
                shutil.rmtree(self._dir, ignore_errors=True)
                shutil.rmtree(self.results_dir, ignore_errors=True)

    @property
    def directories(self) -> list[Path]:
        """The session's own dirs: its work dir (inputs/ and scratch/) and its results dir."""
        return [self._dir, self.results_dir]

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()  # a dropped session must not keep its worker alive

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _hand_over(scratch_dir: Path, uid: int) -> None:
    """Gives a previous worker's files to the new worker, without trusting them: a link is never followed, and a
    file with a second name (a hard link the old worker made to a file of someone else) keeps its owner."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for directory, subdirs, files in os.walk(scratch_dir):  # os.walk does not descend into linked dirs
        for name in subdirs + files:
            try:
                fd = os.open(os.path.join(directory, name), flags)
            except OSError:  # a link (ELOOP), or gone
                continue
            try:
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink == 1):
                    os.fchown(fd, uid, uid)
            finally:
                os.close(fd)


def _check_image_path(path: str | os.PathLike[str]) -> str:
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.isfile(absolute):
        raise InvalidInput(f"input image {absolute!r} does not exist or is not a file: pass the path of an image")
    return absolute
