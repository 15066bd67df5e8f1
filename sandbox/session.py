"""One conversation with the sandbox: its input copies, its scratch dir, and the worker that holds its variables."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from thyme.sandbox.errors import InvalidInput, SandboxClosed
from thyme.sandbox.limits import Limits
from thyme.sandbox.process import ExecutionTimedOut, ProtocolViolation, WorkerDied, WorkerProcess
from thyme.sandbox.repair import RepairConfig
from thyme.sandbox.result import ExecutionResult, check_saved_images, detect_images

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
        item_id (`str`): the id in every error line (``Sandbox for <item_id>: ...``).
    """

    def __init__(self, images: Sequence[str | os.PathLike[str]], item_id: str | None, limits: Limits,
                 repairs: RepairConfig, acquire: Callable[[], WorkerProcess],
                 restart: Callable[[Path], WorkerProcess]) -> None:
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
            for path in self.scratch_dir.rglob("*"):  # files of a previous (killed) worker of this session
                os.chown(path, worker.uid, worker.uid, follow_symlinks=False)
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
            stdout = str(reply.get("stdout", ""))
            repairs = [str(note) for note in reply.get("repairs", [])]
            if reply.get("error"):
                return self._failed(f"{reply['error']}{lost}", stdout, repairs)
            images, problem = detect_images(stdout, reply.get("processed_path"),
                                            bool(reply.get("processed_path_is_str")), str(self.scratch_dir))
            problem = problem or check_saved_images(images, self._limits.max_pixels)
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

    @property
    def directory(self) -> Path:
        """The session's own dir (inputs/ and scratch/)."""
        return self._dir

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()  # a dropped session must not keep its worker alive

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _check_image_path(path: str | os.PathLike[str]) -> str:
    absolute = os.path.abspath(os.fspath(path))
    if not os.path.isfile(absolute):
        raise InvalidInput(f"input image {absolute!r} does not exist or is not a file: pass the path of an image")
    return absolute
