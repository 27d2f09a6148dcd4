"""One worker task: the keys it owns, the ones ready for it, and its loop.

A worker awaits the loads and saves of its keys itself, one at a time, so a
processor never has more than ``workers`` loads and saves in flight. Windows of
different keys overlap: while one key's window is open the worker serves others.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Hashable
from heapq import heappop
from typing import TYPE_CHECKING, Any

from ._batch import (
    GONE,
    NEW,
    OPEN,
    KeyState,
    abort_group,
    close_batch,
    should_close,
    start_batch,
)
from ._util import checkpoint

if TYPE_CHECKING:
    from ._processor import Processor

__all__ = ["Worker"]

# Batches a busy worker runs back to back before it checkpoints.
_YIELD_EVERY = 64


class Worker:
    __slots__ = ("proc", "index", "keys", "ready", "timers", "seq", "_wakeup")

    def __init__(self, proc: Processor[Any], index: int) -> None:
        self.proc = proc
        self.index = index
        self.keys: dict[Hashable, KeyState] = {}
        self.ready: deque[KeyState] = deque()  # keys to load, or to close early
        # (close_at, tie-breaker, key state, batch number); stale entries are skipped
        self.timers: list[tuple[float, int, KeyState, int]] = []
        self.seq = itertools.count()
        self._wakeup: Any = None  # the event the worker sleeps on, or None

    def schedule(self, st: KeyState) -> None:
        """Put a key on the ready queue (once) and wake the worker."""
        if not st.in_ready:
            st.in_ready = True
            self.ready.append(st)
            wakeup = self._wakeup
            if wakeup is not None:
                self._wakeup = None
                wakeup.set()

    def drop(self, st: KeyState) -> None:
        st.phase = GONE
        keys = self.keys
        del keys[st.key]
        self.proc._keys -= 1
        if not keys:
            # A dict never shrinks on deletion: after a burst of distinct keys
            # it would keep its large table for good. A fresh one gives it back.
            self.keys = {}

    def begin_stop(self) -> None:
        """Close open windows now; the loop exits once no key is left."""
        for st in self.keys.values():
            if st.phase == OPEN:
                self.schedule(st)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    async def run(self) -> None:
        proc = self.proc
        ready = self.ready
        timers = self.timers
        clock = proc._clock
        since_yield = 0
        try:
            while True:
                if proc._aborting:  # torn down: start no new batch
                    self._abort()
                    return
                if timers:  # due windows join the ready queue, in FIFO order
                    now = clock()
                    while timers and timers[0][0] <= now:
                        _, _, st, batch_no = heappop(timers)
                        if st.phase == OPEN and st.batch_no == batch_no:
                            self.schedule(st)
                if ready:
                    st = ready.popleft()
                    st.in_ready = False
                    if st.phase == NEW:
                        await start_batch(self, st)
                    elif st.phase == OPEN and should_close(st):
                        # (not if a newcomer joined a batch all had withdrawn from)
                        await close_batch(self, st)
                    since_yield += 1
                    if since_yield >= _YIELD_EVERY:
                        # In-memory loads and saves never yield: let others run.
                        since_yield = 0
                        await checkpoint()
                    continue
                if proc._stopping and not self.keys:
                    return
                since_yield = 0
                await self._sleep(timers[0][0] if timers else math.inf)
        except BaseException:
            self._abort()
            raise

    async def _sleep(self, deadline: float) -> None:
        wakeup = self._wakeup = self.proc._new_event()
        try:
            if deadline == math.inf:
                await wakeup.wait()
            else:
                with self.proc._cancel_scope(deadline=deadline):
                    await wakeup.wait()
        finally:
            self._wakeup = None

    def _abort(self) -> None:
        # The worker is being torn down (cancelled, or a load/save/hook raised a
        # BaseException): every operation not applied yet fails with
        # ProcessorStopped, and the worker keeps nothing.
        proc = self.proc
        for st in list(self.keys.values()):
            if st.phase != NEW:
                proc._active -= 1
            failed = 0
            for group in st.groups:
                failed += abort_group(group)
            proc._pending -= failed
            proc._done += failed
            self.drop(st)
        self.ready.clear()
        self.timers.clear()
        proc._room.wake_all()
