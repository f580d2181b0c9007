"""Tie a child process's life to its parent's: when the parent dies, the child is killed.

On Linux this is the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`):
set in a child, it fires however the parent ends, SIGKILL included, and it survives
`exec`, so a chain of such children (sweep -> pool worker -> Jupyter kernel) dies link by
link within milliseconds. Elsewhere `die_with_parent` does nothing and returns False;
callers then rely on their locks to keep a rerun from racing an orphan.

`tied_command(cmd)` wraps a command so that the process it becomes is tied to this one:
a few lines of Python (run with `-I`, so they need neither thinklab nor the caller's
environment) arm the signal, check that the parent still lives, and `exec` the command in
the same process. This module knows nothing else.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _prctl():
    """libc's prctl on Linux (the symbols already loaded into this process), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Have this process killed (SIGKILL) when its parent dies; True where the OS supports it.

    `parent_pid` closes the race where the parent dies before the signal is set: the
    process then finds itself re-parented and ends at once.
    """
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was set: nobody is waiting for this process
    return True


# argv: PARENT_PID CMD [ARGS...]; the signal is armed in this process, which then becomes CMD
_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(%d, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n" % PR_SET_PDEATHSIG
)


def tied_command(cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """`cmd` wrapped so that the process it becomes dies with `parent_pid` (default: this process)."""
    if _prctl() is None:
        return list(cmd)
    return [sys.executable, "-I", "-c", _TRAMPOLINE, str(parent_pid or os.getpid()), *cmd]
