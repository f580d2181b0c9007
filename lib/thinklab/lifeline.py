"""Tie a child process's life to its parent's: when the parent dies, the child is killed.

On Linux this is the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`):
set in a child, it fires however the parent ends, SIGKILL included, and it survives
`exec`, so a chain of such children (sweep -> pool worker -> Jupyter kernel) dies link by
link within milliseconds. Elsewhere `die_with_parent` does nothing and returns False;
callers then rely on their locks to keep a rerun from racing an orphan.

    python -m thinklab.lifeline PARENT_PID -- CMD ARGS...

runs CMD tied to PARENT_PID (the pid it must still have as parent when the signal is set;
if that parent is already gone, CMD never starts). This module knows nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
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


def tied_command(cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """`cmd` wrapped so that the process it becomes dies with `parent_pid` (default: this process)."""
    if _prctl() is None:
        return list(cmd)
    return [sys.executable, "-m", "thinklab.lifeline", str(parent_pid or os.getpid()), "--", *cmd]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m thinklab.lifeline PARENT_PID -- CMD [ARGS...]")
    die_with_parent(int(argv[0]))
    os.execvp(argv[2], argv[2:])  # same pid, so the signal stays armed for the program it becomes


if __name__ == "__main__":
    main(sys.argv[1:])
