"""Children that do not outlive their parent, even when the parent is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` after which the child gets `sig` when this process
    dies, however it dies (Linux `PR_SET_PDEATHSIG`); None where that is not available.

    The kernel sends the signal when the *thread* that forked the child ends, not the process,
    so this is only offered to the main thread, which lives as long as the process does.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    number = int(sig)

    def preexec() -> None:
        # runs in the child between fork and exec: nothing here may import or take a lock
        if prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0) != 0:
            return  # not fatal: the parent's own cleanup still stops the child
        if os.getppid() != parent:
            # the parent died before prctl took effect, so the signal will never come
            os._exit(1)

    return preexec
