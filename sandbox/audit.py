"""A CPython audit hook that refuses file, process, ctypes and socket events while the model's code runs.

The facades confine the file functions the model calls by name, but the libraries hold many more routes to
``open``: PIL plugin classes and registries (``type(im)(path)``, ``Image.OPEN[...]``), ``ImageFile``'s ``filename``,
the ``FileIO`` class behind any file object (``type(f.raw)(path)``), numpy's ``lib.format``/``DataSource``/
``tofile``/``fromfile``. Every one of them ends in an ``open`` audit event (PEP 578), and ``from_address`` on a ctypes
type ends in ``ctypes.cdata``; refusing the events closes the routes as a class instead of one name at a time.

The hook is armed only around ``exec`` of the model's code (the worker's own start-up uses ctypes and opens files)
and cannot be removed once added (``sys.addaudithook`` is itself refused while armed). Code that corrupts memory or
reaches C file functions directly (FreeType, OpenCV) is not seen here: the facades and the process layer cover those.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from thyme.sandbox.errors import PolicyViolation
from thyme.sandbox.facades import PathPolicy

REFUSED_PREFIXES = ("ctypes.", "socket.", "subprocess.", "pty.", "winreg.", "_winapi.", "msvcrt.", "webbrowser.")
REFUSED_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "os.startfile",
        "os.add_dll_directory",
        "sys.addaudithook",
        "sys.setprofile",
        "sys.settrace",
        "sys.remote_exec",
        "pickle.find_class",
        "code.__new__",
        "function.__new__",
        "cpython.run_command",
        "cpython.run_file",
        "cpython.run_module",
        "cpython.run_startup",
        "cpython.run_interactivehook",
        "os.chdir",
        "os.setxattr",
        "os.removexattr",
        "os.chflags",
        "os.lchflags",
        "os.putenv",
        "os.unsetenv",
    }
)
WRITE_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.truncate",
        "os.utime",
        "os.link",
        "os.symlink",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.copymode",
        "shutil.copystat",
        "shutil.copytree",
        "shutil.move",
        "shutil.chown",
        "shutil.make_archive",
        "shutil.unpack_archive",
    }
)
TWO_PATH_WRITES = frozenset(
    {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree", "shutil.move"}
)
READ_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.listxattr", "os.getxattr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd", ".pth")


class _Guard:
    """The hook's state: armed or not, and the session's path policy while armed."""

    def __init__(self) -> None:
        self.paths: PathPolicy | None = None
        self.armed = False

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        if event in REFUSED_EVENTS or event.startswith(REFUSED_PREFIXES):
            raise PolicyViolation(f"{event} is not available in the sandbox")
        if event == "open":
            self._check(args[0], _opens_for_writing(args[1], args[2]))
        elif event in TWO_PATH_WRITES:
            self._check(args[0], event != "shutil.copyfile" and event != "shutil.copytree")
            self._check(args[1], True)
        elif event in WRITE_EVENTS:
            self._check(args[0], True)
        elif event in READ_EVENTS:
            self._check(args[0], False, listing=True)

    def _check(self, path: Any, writing: bool, listing: bool = False) -> None:
        """Lets through the session's files and (read-only) the interpreter's own code; refuses everything else."""
        assert self.paths is not None
        self.armed = False  # realpath and the checks below raise events of their own
        try:
            if isinstance(path, int):
                raise PolicyViolation(f"opening file descriptor {path} is not allowed in the sandbox")
            if path is None:
                return
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
            real = os.path.realpath(text)
            if writing:
                self.paths.writable(real)
            elif not _is_library_code(real, listing):
                self.paths.readable(real)
        finally:
            self.armed = True


def _opens_for_writing(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
        return True
    return isinstance(flags, int) and flags > 0 and bool(flags & _WRITE_FLAGS)


def _is_library_code(real: str, listing: bool) -> bool:
    """Python code under ``sys.path``, or a listing of a dir there: a lazy import of the libraries while the code
    runs. (No ``isdir`` check: once the worker gave up root, a pyenv under /root can no longer be stat-ed.)"""
    if not (listing or real.endswith(_CODE_SUFFIXES)):
        return False
    for entry in sys.path:
        root = os.path.realpath(entry) if entry else ""
        if root and (real == root or real.startswith(root + os.sep)):
            return True
    return False


_GUARD = _Guard()
_installed = False


@contextmanager
def armed(paths: PathPolicy) -> Iterator[None]:
    """Refuses the events above, for ``paths``'s session, for the duration of the ``with`` block."""
    global _installed
    if not _installed:
        sys.addaudithook(_GUARD)
        _installed = True
    _GUARD.paths, _GUARD.armed = paths, True
    try:
        yield
    finally:
        _GUARD.armed = False
