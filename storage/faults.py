"""Named fault points for the crash-safety and concurrency tests. Unset (always, outside those tests) a
fault point does nothing.

- ``DDA_CRASH_AT=name#n`` SIGKILLs the process the n-th time (default the first) it reaches ``name``.
- ``DDA_PAUSE_AT=name:seconds`` sleeps there, so that two writers would overlap without the lock.

The points sit where a real crash would hurt most: between an embedding write and the checkpoint row,
between the scores and the running state, between one checkpoint's state and the next.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_REACHED: dict[str, int] = {}
_GUARD = threading.Lock()


def fault_point(name: str) -> None:
    """Kill or pause this process at ``name`` when ``DDA_CRASH_AT`` or ``DDA_PAUSE_AT`` names it."""
    pause, _, seconds = os.environ.get("DDA_PAUSE_AT", "").partition(":")
    if pause == name:
        time.sleep(float(seconds or 1))
    spec = os.environ.get("DDA_CRASH_AT")
    if not spec:
        return
    wanted, _, nth = spec.partition("#")
    if wanted != name:
        return
    with _GUARD:
        _REACHED[name] = _REACHED.get(name, 0) + 1
        if _REACHED[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
