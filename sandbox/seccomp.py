"""A seccomp filter for the worker, built with libseccomp (the library behind Docker's, systemd's and Flatpak's
filters): system calls that image code never needs and an escaped interpreter would want fail with EPERM.

It is the layer that stops UDP and unix-socket connections where there is no network namespace (Landlock rules
cover TCP only), and it stops ``execve`` (replacing the worker with another program), ``ptrace`` and
``process_vm_*`` (reading another process's memory), and the namespace and mount calls that a kernel bug would be
reached through, and ``chmod``/``chown`` (Landlock has no right for file modes: a worker running as the user who
owns the input copies could make them writable). libseccomp is loaded through ctypes: its Python binding ships with
the system Python only (``python3-seccomp``), not with the interpreter the sandbox runs on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000

DENIED_SYSCALLS = (
    "socket", "socketpair", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "io_uring_setup", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "mount_setattr",
    "move_mount", "open_tree", "fsopen", "fsmount", "fspick", "personality", "acct", "swapon", "swapoff",
    "reboot", "settimeofday", "clock_settime", "quotactl", "lookup_dcookie", "vm86", "vm86old",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "fchownat", "lchown",
)
"""Each fails with EPERM. Names this architecture does not have are skipped."""


def install() -> str:
    """Loads the filter into this process for good; returns what held, in words."""
    # The soname first: find_library runs ldconfig in a subprocess, which a confined worker cannot start.
    name = "libseccomp.so.2" if sys.platform.startswith("linux") else ctypes.util.find_library("seccomp")
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return "absent (libseccomp is not installed: apt-get install libseccomp2)"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    context = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not context:
        return "absent (seccomp_init failed)"
    try:
        denied = 0
        for syscall in DENIED_SYSCALLS:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number < 0:
                continue
            code = lib.seccomp_rule_add(context, SCMP_ACT_ERRNO_BASE | errno.EPERM, number, 0)
            if code != 0:
                return f"absent (seccomp_rule_add {syscall}: {errno.errorcode.get(-code, code)})"
            denied += 1
        code = lib.seccomp_load(context)
        if code != 0:
            return f"absent (seccomp_load: {errno.errorcode.get(-code, code)})"
    finally:
        lib.seccomp_release(context)
    return f"{denied} system calls refused (sockets, exec, ptrace, namespaces, mounts, chmod/chown)"
