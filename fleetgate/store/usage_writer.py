"""The usage writer: the request path appends events in memory; this drains them in batches.

``record()`` is O(1) and never blocks. ``run()`` is a control-plane task that writes a batch
every ``interval_s`` from a worker thread. If the store is down the batch is kept and retried;
beyond ``max_pending`` events the oldest are dropped and counted (memory must stay bounded).
``flush()`` writes what is left, at shutdown.

A batch is written exactly once: cancelling ``run()`` (shutdown does) while a batch is in its
worker thread does not stop the thread, so the batch's outcome is settled when the thread ends
(counted if it committed, put back if it failed), and ``flush()`` first waits for it. A batch
naming a key deleted meanwhile is written with no key rather than failing forever
(``repo.insert_usage``); a batch the store refuses for any other record in it is written record by
record and only the refused records are dropped (counted in ``rejected``, logged at ERROR), so
one bad record never holds back the accounting of everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from functools import partial

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from fleetgate.store import repo

log = logging.getLogger("fleetgate.usage")


class _PartlyWritten(Exception):
    """Writing a refused batch record by record stopped at ``done`` (the store went away)."""

    def __init__(self, done: int, written: int) -> None:
        super().__init__(f"stopped after {done} records")
        self.done = done
        self.written = written


class UsageWriter:
    def __init__(self, engine: Engine, *, interval_s: float = 0.1, max_pending: int = 1_000_000):
        self.engine = engine
        self.interval_s = interval_s
        self._pending: deque[repo.UsageEvent] = deque(maxlen=max_pending)
        self.dropped = 0
        self.rejected = 0  # records the store refused for their content (see _write)
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
        write = asyncio.ensure_future(asyncio.to_thread(self._write, batch))
        self._in_flight = write
        write.add_done_callback(partial(self._settled, batch))
        # Shielded: a cancelled caller leaves the write to finish and settle itself.
        try:
            return await asyncio.shield(write)
        except _PartlyWritten as e:  # settled by _settled; the caller hears what went wrong
            raise (e.__cause__ or e) from None

    def _write(self, batch: list[repo.UsageEvent]) -> int:
        """Write a batch (in the worker thread). A batch the store refuses for what is in it,
        not for being unreachable, is written record by record, so one bad record can't hold
        back every record after it on every retry; the records it refuses are counted in
        ``rejected`` and logged."""
        dbapi = self.engine.dialect.loaded_dbapi
        permanent = (DataError, IntegrityError, OverflowError, ValueError, TypeError,
                     dbapi.DataError, dbapi.IntegrityError)
        try:
            return repo.insert_usage(self.engine, batch)
        except permanent as e:
            first = type(e).__name__
        written = 0
        for i, event in enumerate(batch):
            try:
                written += repo.insert_usage(self.engine, [event])
            except permanent as e:
                self.rejected += 1
                log.error("usage record refused by the store and dropped (%s): model %r, "
                          "key id %s, %d prompt and %d completion tokens", type(e).__name__,
                          str(event.model)[:200], event.key_id, event.prompt_tokens,
                          event.completion_tokens)
            except Exception as e:  # the store went away half-way: the rest goes back
                raise _PartlyWritten(i, written) from e
        log.warning("usage batch of %d refused (%s): written one by one, %d stored",
                    len(batch), first, written)
        return written

    def _settled(self, batch: list[repo.UsageEvent], write: asyncio.Future[int]) -> None:
        if not write.cancelled() and write.exception() is None:
            self.written += write.result()
            return
        partly = None if write.cancelled() else write.exception()
        if isinstance(partly, _PartlyWritten):  # records before ``done`` are stored (or refused)
            self.written += partly.written
            batch = batch[partly.done:]
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
