"""``Sandbox``: a pool of warm worker processes on this machine, handing out sessions."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from thyme.sandbox import landlock
from thyme.sandbox.errors import InvalidInput, SandboxClosed
from thyme.sandbox.isolation import Isolation
from thyme.sandbox.limits import Limits
from thyme.sandbox.pool import WorkerPool
from thyme.sandbox.process import WorkerProcess, start_zygote
from thyme.sandbox.repair import RepairConfig
from thyme.sandbox.result import ExecutionResult
from thyme.sandbox.session import Session

if TYPE_CHECKING:
    from thyme.sandbox.zygote import Zygote

logger = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 2
"""Idle workers kept ready. Each holds ~70 MiB resident after its warm imports."""

ImagePath = str | os.PathLike[str]


class Sandbox:
    """Runs model-written code in isolated worker processes, one worker per session.

    Args:
        timeout (`float`, *optional*): wall-clock seconds per code block; overrides ``limits.timeout_s``.
        limits (`Limits`, *optional*): memory, CPU, file, stdout and pixel limits (defaults: :class:`Limits`).
        repairs (`RepairConfig`, *optional*): which source repairs run (defaults: all the weights expect).
        pool_size (`int`, defaults to `2`): warm workers kept ready.
        work_dir (`str` or `os.PathLike`, *optional*): where session dirs are made (default: a new temp dir).
        start_method (`str`, defaults to `"exec"`): ``"exec"`` starts each worker as a new interpreter inside its
            own bubblewrap (~0.5-1 s of CPU each, in the background); ``"zygote"`` forks workers from one warm process
            in milliseconds, sharing the libraries' memory (needs Landlock ABI 6+, else it falls back to exec).
        isolation (`Isolation`, *optional*): which OS layers wrap the workers, and ``strict`` to refuse running
            without bubblewrap's namespaces (default: all layers, strict when ``THYME_SANDBOX_STRICT=1``).
        url (`str` or `list[str]`, *optional*): use a remote sandbox server instead, or several, which share the
            sessions out (returns a ``RemoteSandbox``).
        token (`str`, *optional*): the remote server's bearer token.

    Attributes:
        isolation (`dict[str, str]`): per OS layer, in words, what held in the last started worker, plus ``level``
            (``strong`` when bubblewrap's namespaces held, else ``weak``, with a ``warning``).

    Example:

    ```python
    >>> from thyme.sandbox import Sandbox
    >>> with Sandbox(timeout=10) as sb:
    ...     session = sb.session(image="/abs/17127.jpg")
    ...     result = session.run("print(1 + 1)")
    >>> result.ok, result.stdout
    (True, '2\\n')
    ```
    """

    def __new__(cls, timeout: float | None = None, **kwargs: Any) -> Any:
        if kwargs.get("url") is not None:
            # The remote pool's limits (timeout included) are the server's; only the address and token are ours.
            from thyme.sandbox.remote import RemoteSandbox

            return RemoteSandbox(kwargs["url"], token=kwargs.get("token"))
        return super().__new__(cls)

    def __init__(self, timeout: float | None = None, *, limits: Limits | None = None,
                 repairs: RepairConfig | None = None, pool_size: int = DEFAULT_POOL_SIZE,
                 work_dir: ImagePath | None = None, start_method: str = "exec", isolation: Isolation | None = None,
                 url: str | Sequence[str] | None = None, token: str | None = None,
                 _language_layer: bool = True) -> None:
        # `_language_layer=False` (plain exec, real builtins) is for the layer-ablation tests only (ablation.py).
        limits = limits or Limits()
        if timeout is not None:
            limits = dataclasses.replace(limits, timeout_s=timeout)
        if pool_size < 0:
            raise InvalidInput(f"pool_size ({pool_size}) must be >= 0")
        self._isolation = isolation or Isolation()
        weak_reason = self._isolation.check()  # raises IsolationUnavailable in strict mode
        if weak_reason is not None:
            logger.warning("WEAK SANDBOX ISOLATION: %s. Workers run without bubblewrap's namespaces (Landlock, "
                           "seccomp, uid and rlimits still apply); see Sandbox.isolation and docs/sandbox.md",
                           weak_reason)
        self._language_layer = _language_layer
        if start_method not in ("exec", "zygote"):
            raise InvalidInput(f"start_method ({start_method!r}) must be 'exec' or 'zygote'")
        if start_method == "zygote" and not (self._isolation.landlock and landlock.abi_version() >= 6):
            logger.warning("sandbox: start_method='zygote' needs Landlock ABI 6+ to keep forked workers apart; "
                           "starting each worker with exec instead")
            start_method = "exec"
        self.start_method = start_method
        self._zygote: Zygote | None = None
        self._zygote_lock = threading.Lock()
        self.limits = limits
        self.repairs = repairs or RepairConfig()
        self._own_root = work_dir is None
        root = Path(tempfile.mkdtemp(prefix="thyme-sandbox-")) if work_dir is None else Path(work_dir)
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()  # image paths are compared after realpath (macOS /tmp is a symlink)
        root.chmod(0o711)
        self.root = root
        # Returned images are copied here: beside the work dir, not in it, so the workers (which may write the
        # work dir) never reach them.
        try:
            self._results_root = Path(tempfile.mkdtemp(prefix="thyme-results-", dir=root.parent))
        except OSError:  # a work_dir whose parent is not ours to write
            self._results_root = Path(tempfile.mkdtemp(prefix="thyme-results-")).resolve()
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._kept_dirs: list[Path] = []
        self._closed = False
        self._pool = WorkerPool(self._start_worker, pool_size)
        self.isolation: dict[str, str] = {}

    def _start_worker(self, session_dir: Path | None = None, *, warm: bool = False) -> WorkerProcess:
        """Starts a worker for ``session_dir``, or for a new, empty session dir (a warm worker of the pool).

        ``warm``: nobody waits for this worker yet; one forked from the zygote then rehearses a typical code block,
        so the copy-on-write faults of the pages that touches are paid now rather than in its session's first run.
        """
        if session_dir is None:
            session_dir = new_session_dir(self.root)
        try:
            zygote = self._live_zygote() if self.start_method == "zygote" else None
            worker = WorkerProcess(self.limits, str(session_dir), self._isolation,
                                   language_layer=self._language_layer, zygote=zygote, rehearse=warm)
        except BaseException:
            shutil.rmtree(session_dir, ignore_errors=True)
            raise
        self.isolation = worker.isolation
        return worker

    def _live_zygote(self) -> Zygote:
        """The fork server, started on first use and again whenever it died (its workers died with it)."""
        with self._zygote_lock:
            if self._closed:
                raise SandboxClosed("the Sandbox is closed; create a new Sandbox")
            if self._zygote is None or not self._zygote.alive:
                if self._zygote is not None:
                    logger.warning("sandbox: the zygote died; starting a new one")
                    self._zygote.close()
                self._zygote = start_zygote(self.limits, str(self.root), self._isolation,
                                            language_layer=self._language_layer)
            return self._zygote

    def session(self, image: ImagePath | None = None, *, images: Sequence[ImagePath] | None = None,
                item_id: str | None = None) -> Session:
        """Opens a conversation over one image (``image=``) or several (``images=``).

        Raises:
            InvalidInput: no image, or a path that is not a file.
            SandboxClosed: the Sandbox was closed.
        """
        if self._closed:
            raise SandboxClosed("the Sandbox is closed; create a new Sandbox")
        if (image is None) == (images is None):
            raise InvalidInput("pass exactly one of image=PATH or images=[PATH, ...]")
        paths = [image] if image is not None else list(images or [])
        session = Session(paths, item_id, self.limits, self.repairs, self._pool.acquire, self._start_worker,
                          self._results_root)
        self._sessions.add(session)
        return session

    def run(self, code: str, image: ImagePath | None = None, *, images: Sequence[ImagePath] | None = None,
            item_id: str | None = None) -> ExecutionResult:
        """One-shot: runs ``code`` in a fresh session and stops its worker. ``result.images`` stay on disk until the
        Sandbox closes."""
        session = self.session(image, images=images, item_id=item_id)
        try:
            return session.run(code)
        finally:
            session.close(keep_files=True)
            self._kept_dirs.extend(session.directories)

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Blocks until the warm workers are started; returns whether they are."""
        return self._pool.wait_ready(timeout_s)

    def close(self) -> None:
        """Stops every worker and deletes every session's files."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions):
            session.close()
        for directory in self._kept_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._pool.close()
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self._results_root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            logger.warning("Sandbox was not closed; closing it now (use `with Sandbox() as sb:` or sb.close())")
            self.close()


def new_session_dir(root: Path) -> Path:
    """A session's dir under the Sandbox's root: ``inputs/`` (the read-only copies) and ``scratch/`` (0700).

    Made before the worker starts, because bubblewrap binds exactly this dir into the worker's view.
    """
    directory = Path(tempfile.mkdtemp(prefix="session-", dir=root))
    directory.chmod(0o711)  # the worker (another uid) may pass through, not list
    (directory / "inputs").mkdir(mode=0o755)
    (directory / "scratch").mkdir(mode=0o700)
    return directory
