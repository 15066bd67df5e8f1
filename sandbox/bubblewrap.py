"""The worker's view of the host, built by bubblewrap (``bwrap``, the tool behind Flatpak).

bubblewrap starts the worker in new mount, PID, network, IPC, UTS and cgroup namespaces whose root is an empty,
read-only tmpfs holding only: the system libraries (``/usr`` and its merged-usr links), the Python installation and
the installed packages (read-only, at their own paths), a fresh ``/proc`` of the new PID namespace, a minimal
``/dev``, and the one session dir the worker serves (``inputs/`` read-only, ``scratch/`` writable). ``/home``,
``/root`` (but the Python install under it), ``/tmp``, the data set next to an input, other sessions and every
other process are simply not there. Root runs it directly; other users through an unprivileged user namespace,
which some systems forbid (Ubuntu 24.04's AppArmor rule, ``kernel.unprivileged_userns_clone=0``): :func:`probe`
finds out once per process and says why.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import select
import shutil
import site
import subprocess
import sys
import time

SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache",
                "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
"""What the dynamic loader and the C libraries need. On a merged-usr system the top-level dirs are symlinks into
/usr and are recreated as such; ``/etc`` contributes only the loader's cache and the time zone."""

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
"""The device nodes the worker may use (bubblewrap's ``--dev`` makes these plus a tty and an empty /dev/shm)."""

PROBE_TIMEOUT_S = 30.0


def python_paths() -> list[str]:
    """The read-only paths the worker's interpreter needs: the install, the venv, and the packages it imports.

    Editable installs (``pip install -e``) import ``thyme`` from the source checkout, so the package dirs are
    listed on their own; the checkout around them (a data set, tests, a venv's siblings) is not.
    """
    paths = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}
    paths.update(site.getsitepackages())
    for package in ("thyme", "thyme.sandbox"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            paths.update(spec.submodule_search_locations)
    return sorted(_minimal(os.path.realpath(path) for path in paths if os.path.exists(path)))


def _minimal(paths: object) -> list[str]:
    """Drops paths that lie inside another listed path (binding both would be redundant)."""
    kept: list[str] = []
    for path in sorted(set(paths)):  # type: ignore[call-overload]
        if not any(path == other or path.startswith(other.rstrip("/") + "/") for other in kept):
            kept.append(path)
    return kept


def read_only_paths() -> list[str]:
    """Every path the worker may read besides its session dir; the Landlock rules use the same list."""
    return _minimal([*SYSTEM_PATHS, *python_paths()]) + list(DEVICES)


def executable() -> str | None:
    return shutil.which("bwrap")


def command(bwrap: str, session_dir: str, *, keep_setuid: bool, info_fd: int, zygote: bool = False) -> list[str]:
    """The bwrap argument list that wraps a worker serving ``session_dir`` (append ``--`` and the worker's argv).

    Args:
        zygote (`bool`, defaults to `False`): ``session_dir`` is the Sandbox's work dir, under which the zygote's
            children each serve one session (their Landlock rules keep them to it, inputs read-only).
        keep_setuid (`bool`): as root, keep CAP_SETUID/CAP_SETGID (and CAP_SYS_NICE) so the worker can drop to its
            own uid after its imports; every other capability is dropped. Without root nothing is kept.
        info_fd (`int`): fd on which bubblewrap writes its JSON info (``child-pid``: the host PID of the
            namespace's init, whose only child is the worker).
    """
    args = [bwrap, *_unshare_arguments(as_root=keep_setuid), "--die-with-parent", "--new-session", "--info-fd",
            str(info_fd), "--cap-drop", "ALL"]
    if keep_setuid:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SYS_NICE"]
    bound = _minimal([*SYSTEM_PATHS, *python_paths()])
    # bubblewrap makes missing parent dirs 0700: after the uid drop the worker could not walk through /root to the
    # pyenv under it, nor to its own session dir. They are empty dirs of the sandbox's tmpfs; 0755 shows nothing.
    parents = {parent for path in [*bound, session_dir] for parent in _ancestors(path)} - set(bound)
    for parent in sorted(parents, key=lambda path: path.count("/")):
        args += ["--perms", "0755", "--dir", parent]
    for path in bound:
        if os.path.islink(path) and os.path.dirname(path) == "/":
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--bind", session_dir, session_dir]
    inputs = [] if zygote else ["--ro-bind", os.path.join(session_dir, "inputs"), os.path.join(session_dir, "inputs")]
    # Read-only: the root tmpfs and /dev (its shm dir would be a writable place outside scratch; device nodes
    # such as /dev/null still work on a read-only mount).
    args += [*inputs, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", session_dir]
    return args


def sandboxed_pid(info_fd: int) -> int:
    """The host PID of the process bubblewrap runs, read from its ``--info-fd``: the only child of the PID
    namespace's init (bubblewrap's own), which reports only its own PID.

    Raises:
        OSError: bubblewrap wrote no info, or its init exited, or no child appeared.
    """
    info = b""
    while True:
        ready, _, _ = select.select([info_fd], [], [], PROBE_TIMEOUT_S)
        chunk = os.read(info_fd, 4096) if ready else b""
        info += chunk
        try:
            init_pid = int(json.loads(info)["child-pid"])
            break
        except ValueError:
            if not chunk:
                raise OSError(f"bubblewrap gave no child pid: {info[:200]!r}") from None
    for _ in range(1000):
        with open(f"/proc/{init_pid}/task/{init_pid}/children") as children:  # FileNotFoundError: init exited
            pids = children.read().split()
        if pids:
            return int(pids[0])
        time.sleep(0.001)
    raise OSError("no process appeared inside bubblewrap")


def _ancestors(path: str) -> list[str]:
    parents = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        parents.append(parent)
        parent = os.path.dirname(parent)
    return parents


def _unshare_arguments(*, as_root: bool) -> list[str]:
    """Every namespace; a user namespace only without root. As root, a user namespace would map only uid 0 and
    make the capabilities namespaced: the worker could then neither drop to its own uid nor restore its priority."""
    if as_root:
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    return ["--unshare-all"]


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """Runs ``bwrap`` once with the worker's namespaces; returns None when it works, else why not (in words)."""
    bwrap = executable()
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    true = shutil.which("true") or "/bin/true"
    try:
        done = subprocess.run(
            [bwrap, *_unshare_arguments(as_root=os.geteuid() == 0), "--die-with-parent", "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "--", true],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not run: {exc}"
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        hint = "" if os.geteuid() == 0 else (
            " (unprivileged user namespaces are off here: Ubuntu's AppArmor restricts them, see "
            "kernel.apparmor_restrict_unprivileged_userns, or kernel.unprivileged_userns_clone=0)"
        )
        return f"bubblewrap cannot create its namespaces: {reason}{hint}"
    return None
