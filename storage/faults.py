"""Named crash points for the crash-safety tests: ``DDA_CRASH_AT=name#n`` SIGKILLs the process the n-th time
(default the first) it reaches ``name``. Unset (always, outside those tests) a crash point does nothing.

The points sit where a real crash would hurt most: between an embedding write and the checkpoint row,
between the scores and the running state, between one checkpoint's state and the next.
"""

from __future__ import annotations

import os
import signal
import threading

_REACHED: dict[str, int] = {}
_GUARD = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process if ``DDA_CRASH_AT`` names ``name`` (``name#n``: on the n-th time it is reached)."""
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
