"""The usage writer: the request path appends events in memory; this drains them in batches.

``record()`` is O(1) and never blocks. ``run()`` is a control-plane task that writes a batch
every ``interval_s`` from a worker thread. If the store is down the batch is kept and retried;
beyond ``max_pending`` events the oldest are dropped and counted (memory must stay bounded).
``flush()`` writes what is left, at shutdown.

A batch is written exactly once: cancelling ``run()`` (shutdown does) while a batch is in its
worker thread does not stop the thread, so the batch's outcome is settled when the thread ends
(counted if it committed, put back if it failed), and ``flush()`` first waits for it. A batch
naming a key deleted meanwhile is written with no key rather than failing forever
(``repo.insert_usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from functools import partial

from sqlalchemy import Engine

from fleetgate.store import repo

log = logging.getLogger("fleetgate.usage")


class UsageWriter:
    def __init__(self, engine: Engine, *, interval_s: float = 0.1, max_pending: int = 1_000_000):
        self.engine = engine
        self.interval_s = interval_s
        self._pending: deque[repo.UsageEvent] = deque(maxlen=max_pending)
        self.dropped = 0
        self.written = 0
        self._in_flight: asyncio.Future[int] | None = None

    def record(self, event: repo.UsageEvent) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(event)

    async def write_batch(self) -> int:
        await self._settle_in_flight()
        if not self._pending:
            return 0
        batch = list(self._pending)
        self._pending.clear()
        write = asyncio.ensure_future(asyncio.to_thread(repo.insert_usage, self.engine, batch))
        self._in_flight = write
        write.add_done_callback(partial(self._settled, batch))
        # Shielded: a cancelled caller leaves the write to finish and settle itself.
        return await asyncio.shield(write)

    def _settled(self, batch: list[repo.UsageEvent], write: asyncio.Future[int]) -> None:
        if not write.cancelled() and write.exception() is None:
            self.written += write.result()
            return
        # Back in front, in order; past max_pending the oldest go, counted, as in record().
        room = (self._pending.maxlen or len(batch)) - len(self._pending)
        if len(batch) > room:
            self.dropped += len(batch) - room
            batch = batch[len(batch) - room:] if room > 0 else []
        self._pending.extendleft(reversed(batch))

    async def _settle_in_flight(self) -> None:
        write = self._in_flight
        if write is not None and not write.done():
            with contextlib.suppress(Exception):  # a failed batch is back in _pending
                await asyncio.shield(write)

    async def run(self) -> None:
        failures = 0
        reported_drops = 0
        while True:
            await asyncio.sleep(self.interval_s)
            if self.dropped != reported_drops:
                log.error(
                    "usage queue full: %d events dropped so far (the store is down or too slow)",
                    self.dropped,
                )
                reported_drops = self.dropped
            try:
                await self.write_batch()
                failures = 0
            except Exception as e:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning(
                        "usage write failed (%d in a row, %d pending): %s",
                        failures,
                        len(self._pending),
                        type(e).__name__,
                    )

    async def flush(self) -> None:
        try:
            await self.write_batch()
        except Exception as e:
            log.error(
                "usage flush at shutdown failed, %d events lost: %s",
                len(self._pending),
                type(e).__name__,
            )
