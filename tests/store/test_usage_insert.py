"""The usage insert, on SQLite and a real PostgreSQL: what is stored is exactly what was recorded.

SQLite gets multi-row ``INSERT ... VALUES`` statements cut at a chunk of rows; every batch size
around a chunk boundary is read back row by row, column by column, in order, so a row lost,
doubled or moved at a boundary fails. A key deleted while its usage waits, and a writer cancelled
while a batch is in its thread, must neither lose nor double a record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, select, text

from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine
from fleetgate.store.tables import api_keys, usage_events
from fleetgate.store.usage_writer import UsageWriter

CHUNK = repo._SQLITE_MAX_ROWS
BASE = 1_795_000_000.0  # 2026-11-18; epoch times below are whole 1/64 s, exact in a float


def add_key(engine: Engine, name: str) -> int:
    return repo.insert_key(engine, name=name, prefix="fg-" + name, digest=name.ljust(64, "0"),
                           models=None, expires_at=None).id


def events(n: int, key_ids: list[int]) -> list[repo.UsageEvent]:
    """``n`` distinct records: each column cycles through its values (NULLs, both bools, both
    kinds of time) at its own period, and ``latency_ms`` numbers them."""
    out = []
    for i in range(n):
        when: dt.datetime | float = BASE + i / 64
        if i % 3 == 0:
            when = dt.datetime(2026, 11, 18, 9, 30, 5, i % 1_000_000)
        out.append(repo.UsageEvent(
            key_id=None if i % 4 == 0 else key_ids[i % len(key_ids)],
            model=f"model-{i % 5}", endpoint="chat.completions" if i % 2 else "completions",
            status=(200, 429, 502)[i % 3], stream=i % 2 == 0, prompt_tokens=i * 3,
            completion_tokens=i * 7 % 1000, latency_ms=i, created_at=when,
            user_id=None if i % 5 == 0 else 100 + i % 7, ttft_ms=None if i % 6 == 0 else i % 50,
            disconnected=i % 7 == 0))
    return out


def expected(e: repo.UsageEvent) -> tuple[Any, ...]:
    t = e.created_at
    if isinstance(t, float):
        t = dt.datetime.fromtimestamp(t, dt.UTC).replace(tzinfo=None)
    return (*e[:8], t, *e[9:])


def stored(engine: Engine) -> list[tuple[Any, ...]]:
    cols = [usage_events.c[c] for c in repo.UsageEvent._fields]
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(*cols).order_by(usage_events.c.id))]


@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_stored_rows_are_the_events(engine, n):
    keys = [add_key(engine, "a"), add_key(engine, "b")]
    evs = events(n, keys)
    assert repo.insert_usage(engine, evs) == n
    got = stored(engine)
    assert len(got) == n
    for i, (row, ev) in enumerate(zip(got, evs, strict=True)):
        assert row == expected(ev), i
    assert {type(r[4]) for r in got} == {bool} and {type(r[11]) for r in got} == {bool}
    assert repo.insert_usage(engine, []) == 0


def test_text_is_stored_as_given(engine):
    """PostgreSQL gets the batch as COPY text, where tabs, newlines and backslashes are syntax."""
    k = add_key(engine, "a")
    names = ["tab\there", "new\nline", "back\\slash \\N", "\\.", "quote's \"q\"", "ünï ✓", ""]
    evs = [ev._replace(model=m, endpoint=m[:60]) for ev, m in zip(events(7, [k]), names, strict=True)]
    repo.insert_usage(engine, evs)
    assert stored(engine) == [expected(ev) for ev in evs]


def test_sqlite_stores_what_sqlalchemy_writes(tmp_path):
    """The raw values: times as SQLAlchemy's own DATETIME text (so they compare with every other
    query's parameters), bools as 0/1, NULL as NULL."""
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    migrate(e)
    k = add_key(e, "a")
    evs = events(7, [k])
    repo.insert_usage(e, evs)
    fields = ", ".join(repo.UsageEvent._fields)
    with e.connect() as c:
        raw = c.exec_driver_sql(f"SELECT {fields} FROM usage_events ORDER BY id").all()
        kinds = c.exec_driver_sql("SELECT DISTINCT typeof(created_at), typeof(stream), "
                                  "typeof(disconnected) FROM usage_events").all()
    assert kinds == [("text", "integer", "integer")]
    for row, ev in zip(raw, evs, strict=True):
        want = expected(ev)
        assert row[8] == want[8].strftime("%Y-%m-%d %H:%M:%S.%f")
        assert row[:8] + row[9:] == tuple(int(v) if isinstance(v, bool) else v
                                          for v in want[:8] + want[9:])


def test_sqlite_chunk_follows_the_bound_variable_limit(tmp_path):
    """A build with the old limit of 999 bound variables gets 64-row statements (the largest
    power of two within 999 // 12 = 83): 512 rows' worth of parameters would be refused ("too many
    SQL variables")."""
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")

    @event.listens_for(e, "connect")
    def _old_limit(dbapi_conn: Any, _rec: Any) -> None:
        import sqlite3
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    migrate(e)
    with e.connect() as c:
        assert repo._sqlite_chunk(c) == 64
    k = add_key(e, "a")
    for n in (63, 64, 65, 83, 84, 400):
        with e.begin() as c:
            c.execute(delete(usage_events))
        evs = events(n, [k])
        assert repo.insert_usage(e, evs) == n
        assert stored(e) == [expected(ev) for ev in evs]


def test_one_statement_per_chunk_and_texts_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(repo, "_SQLITE_MAX_ROWS", 8)
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    migrate(e)
    k = add_key(e, "a")
    seen: list[str] = []
    event.listen(e, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: seen.append(sql) if "usage_events" in sql else None)
    evs = events(8 * 3 + 7, [k])
    repo.insert_usage(e, evs)
    assert [s.count("(?") for s in seen] == [8, 8, 8, 4, 2, 1]
    assert stored(e) == [expected(ev) for ev in evs]
    assert repo._sqlite_values(8) is repo._sqlite_values(8)


def test_batches_of_every_size_share_a_few_statements(tmp_path):
    """The driver keeps each connection's prepared statements (128), and one of a few hundred
    rows holds about 0.4 MB of SQLite's memory: a statement per batch size seen grew the serving
    process by about 70 MB under load. Batches of every size from 1 to 600 rows (every row stored,
    in order) are written with at most 10 distinct statements, one per power of two up to 512."""
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    migrate(e)
    k = add_key(e, "a")
    texts: set[str] = set()
    event.listen(e, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: texts.add(sql) if sql.startswith("INSERT") else None)
    evs = events(600, [k])
    written: list[repo.UsageEvent] = []
    for n in range(1, 601, 7):
        assert repo.insert_usage(e, evs[:n]) == n
        written += evs[:n]
    assert stored(e) == [expected(ev) for ev in written]
    assert sorted(t.count("(?") for t in texts) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def test_a_deleted_keys_usage_is_written_with_no_key(engine):
    """A key deleted while its usage waited used to fail the batch on the foreign key, and the
    writer retried it forever (and everything recorded after it)."""
    gone, kept = add_key(engine, "gone"), add_key(engine, "kept")
    evs = events(9, [gone, kept])
    with engine.begin() as c:
        c.execute(delete(api_keys).where(api_keys.c.id == gone))
    assert repo.insert_usage(engine, evs) == 9
    want = [expected(ev._replace(key_id=None) if ev.key_id == gone else ev) for ev in evs]
    assert stored(engine) == want
    assert {r[0] for r in stored(engine)} == {None, kept}


def test_other_integrity_errors_are_raised(engine):
    ev = events(1, [add_key(engine, "a")])[0]._replace(model=None)
    with pytest.raises(Exception, match="(?i)null"):
        repo.insert_usage(engine, [ev])
    assert stored(engine) == []


async def test_writer_gets_past_a_deleted_key(engine):
    gone = add_key(engine, "gone")
    w = UsageWriter(engine)
    for ev in events(5, [gone]):
        w.record(ev)
    with engine.begin() as c:
        c.execute(delete(api_keys).where(api_keys.c.id == gone))
    assert await w.write_batch() == 5
    assert not w._pending and w.written == 5
    assert [r[0] for r in stored(engine)] == [None] * 5


async def test_cancelled_writer_neither_loses_nor_doubles_a_batch(tmp_path, monkeypatch):
    """Shutdown cancels ``run()`` and then flushes. A batch still in its thread at the cancel used
    to be put back and written again by the flush, as well as by its thread."""
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    migrate(e)
    k = add_key(e, "a")
    entered, release = threading.Event(), threading.Event()
    real = repo.insert_usage

    def slow(engine: Engine, batch: list[repo.UsageEvent]) -> int:
        entered.set()
        assert release.wait(10)
        return real(engine, batch)

    monkeypatch.setattr(repo, "insert_usage", slow)
    w = UsageWriter(e, interval_s=0.01)
    evs = events(20, [k])
    for ev in evs[:10]:
        w.record(ev)
    task = asyncio.create_task(w.run())
    assert await asyncio.to_thread(entered.wait, 10)
    for ev in evs[10:]:
        w.record(ev)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    asyncio.get_running_loop().call_later(0.2, release.set)
    await w.flush()  # waits for the batch in flight, then writes the rest
    assert w.written == 20 and not w._pending
    assert stored(e) == [expected(ev) for ev in evs]
    with e.connect() as c:
        assert c.execute(text("SELECT count(*) FROM usage_events")).scalar() == 20


async def test_a_batch_failing_in_flight_goes_back_in_front(tmp_path, monkeypatch):
    """Records that arrive while a batch is being written stay behind it when it fails; past
    ``max_pending`` the oldest go, counted, and a cancel before the failure loses nothing."""
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    migrate(e)
    k = add_key(e, "a")
    entered, release = threading.Event(), threading.Event()
    real = repo.insert_usage
    calls = 0

    def fail_first(engine: Engine, batch: list[repo.UsageEvent]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            assert release.wait(10)
            raise OSError("store down")
        return real(engine, batch)

    monkeypatch.setattr(repo, "insert_usage", fail_first)
    w = UsageWriter(e, interval_s=0.01, max_pending=4)
    evs = events(6, [k])
    for ev in evs[:3]:
        w.record(ev)
    task = asyncio.create_task(w.run())
    assert await asyncio.to_thread(entered.wait, 10)
    for ev in evs[3:]:
        w.record(ev)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await w.flush()
    assert w.dropped == 2 and w.written == 4 and not w._pending
    assert stored(e) == [expected(ev) for ev in evs[2:]]  # the two oldest dropped


async def test_a_record_the_store_refuses_does_not_hold_back_the_others(engine):
    """A count past the column's range and a missing model used to fail their whole batch on
    every retry, and the accounting of everyone queued behind it stalled with them."""
    evs = events(6, [add_key(engine, "k")])
    evs[2] = evs[2]._replace(prompt_tokens=2**63)  # past SQLite's and PostgreSQL's integers
    evs[4] = evs[4]._replace(model=None)  # type: ignore[arg-type]  # NOT NULL
    w = UsageWriter(engine)
    for ev in evs:
        w.record(ev)
    assert await w.write_batch() == 4
    assert (w.written, w.rejected, len(w._pending)) == (4, 2, 0)
    assert stored(engine) == [expected(ev) for i, ev in enumerate(evs) if i not in (2, 4)]
    w.record(events(1, [])[0])  # and the writer goes on
    assert await w.write_batch() == 1


async def test_a_store_lost_while_writing_one_by_one_puts_back_only_the_rest(engine, monkeypatch):
    """Written record by record (the batch was refused), each record commits alone: if the store
    goes away half-way, only the records not yet written go back, or the others would double."""
    evs = events(5, [add_key(engine, "k")])
    real = repo.insert_usage
    singles = []

    def flaky(eng: Engine, batch: list[repo.UsageEvent]) -> int:
        if len(batch) > 1:
            raise ValueError("refused for its content")
        singles.append(batch[0])
        if len(singles) == 3:
            raise ConnectionError("the store went away")
        return real(eng, batch)

    monkeypatch.setattr(repo, "insert_usage", flaky)
    w = UsageWriter(engine)
    for ev in evs:
        w.record(ev)
    with pytest.raises(ConnectionError):
        await w.write_batch()
    assert w.written == 2 and list(w._pending) == evs[2:]
    monkeypatch.setattr(repo, "insert_usage", real)
    assert await w.write_batch() == 3
    assert stored(engine) == [expected(ev) for ev in evs]  # each once, in order


def test_usage_event_from_one_tuple_is_the_named_tuple():
    """The request path builds its record with ``repo.usage_event`` (a C call, not NamedTuple's
    Python ``__new__``): the same record, with every field where its name says."""
    fields = (7, "m", "chat.completions", 200, True, 11, 13, 17, BASE, 19, 23, True)
    built = repo.usage_event(fields)
    assert type(built) is repo.UsageEvent
    assert built == repo.UsageEvent(*fields)
    assert (built.key_id, built.user_id, built.ttft_ms, built.disconnected) == (7, 19, 23, True)
    assert built.total_tokens == 24
