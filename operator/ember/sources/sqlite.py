"""The event store of local mode: one SQLite file (WAL, synchronous FULL) with group commit.

Every statement runs on one thread that owns the connection, so the event loop never blocks
on the disk. No write commits alone: puts, leases, acks and status changes that arrive while a
commit is on the disk wait and go together in the next transaction (group commit, each in a
savepoint), so one fsync covers many of them and the rate is not the disk's sync rate. A put's
future resolves only after its transaction committed: the event survives the process being
killed at any point after the 202.

The file belongs to one process: `start` takes an exclusive `flock` on `<file>.lock` and fails,
naming the holder's file, when another `ember dev` uses the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ember.sources.store import (
    IDEMPOTENCY_WINDOW_S,
    STATUS_TTL_S,
    Event,
    Status,
    StoreError,
    queued_status,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    body BLOB NOT NULL,
    not_before REAL NOT NULL,
    holder TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_due ON events (not_before);
CREATE TABLE IF NOT EXISTS statuses (id TEXT PRIMARY KEY, updated_at REAL NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS statuses_age ON statuses (updated_at);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, id TEXT NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (id TEXT PRIMARY KEY, at REAL NOT NULL, doc TEXT NOT NULL,
    body BLOB NOT NULL, status TEXT NOT NULL);
"""

MAX_BATCH = 1000  # puts per transaction at most
PARKED = 1e300  # the not_before of a parked event: never due (a real infinity is not a SQLite REAL)
_FUNCTION = "json_extract(doc, '$.namespace') || '/' || json_extract(doc, '$.function')"
PRUNE_EVERY_S = 300.0


def lock_exclusively(path: Path, what: str, hint: str, error: type[Exception]) -> int:
    """The descriptor of `path`.lock, locked for this process alone (its folder made first): one
    process owns a SQLite store. Raises `error` naming `what` when it cannot be opened, or when
    another process holds it (`hint`: who that may be)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise error(f"cannot open {what}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(f"{what} is in use by another process ({hint})") from None
    return fd


class SqliteStore:
    """`EventStore` in one SQLite file."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.description = f"sqlite {path}"
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending: list[tuple[Callable[[sqlite3.Connection, float], Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._pruned_at = 0.0

    async def start(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        hint = "another ember dev with the same --state-dir, or another activator with the same EMBER_ASYNC_STORE?"
        self._lock_fd = lock_exclusively(self.path, f"the event store {self.path}", hint, StoreError)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            # This process holds the lock: every lease in the file is a dead process's; free them now.
            db.execute("UPDATE events SET holder = NULL, lease_until = 0 WHERE holder IS NOT NULL")
        except sqlite3.Error as err:
            raise StoreError(f"the event store {self.path} cannot be opened: {err}") from None
        self._db = db

    async def close(self) -> None:
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        await self._call(self._shut)
        self._executor.shutdown(wait=True)

    def _shut(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the event store {self.path} is not open")
        return self._db

    # -- every write goes through one group commit

    async def _write(self, op: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run `op` in the next transaction: writes that arrive while one commits wait and go
        together in the next (one fsync for all of them). Each runs in a savepoint of its own, so
        one that fails fails alone."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future  # type: ignore[no-any-return]

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    outcomes = await self._call(self._commit, [op for op, _ in batch])
                except Exception as err:  # the transaction failed: none of the batch was written
                    failure = err if isinstance(err, StoreError) else StoreError(f"{self.description}: {err}")
                    outcomes = [failure] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._flushing = None

    def _commit(self, ops: list[Callable[[sqlite3.Connection, float], Any]]) -> list[Any]:
        db = self._conn()
        now = self._clock()
        outcomes: list[Any] = []
        with self._transaction(db):
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    outcomes.append(op(db, now))
                    db.execute("RELEASE op")
                except sqlite3.Error as err:
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    outcomes.append(StoreError(f"{self.description}: {err}"))
            self._maybe_prune(db, now)
        return outcomes

    async def put(self, event: Event, idempotency_key: str | None = None) -> str:
        def insert(db: sqlite3.Connection, now: float) -> str:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT id FROM idempotency WHERE key = ? AND until > ?", (idempotency_key, now)
                ).fetchone()
                if row is not None:
                    return str(row[0])
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (key, id, until) VALUES (?, ?, ?)",
                    (idempotency_key, event.id, now + IDEMPOTENCY_WINDOW_S),
                )
            # A request id names its event: the same id again (while its status is kept) is a no-op.
            if db.execute("SELECT 1 FROM statuses WHERE id = ?", (event.id,)).fetchone() is None:
                db.execute(
                    "INSERT INTO events (id, doc, body, not_before) VALUES (?, ?, ?, ?)",
                    (event.id, json.dumps(event.to_json()), event.body, event.not_before),
                )
                self._status(db, queued_status(event))
            return event.id

        return await self._write(insert)

    async def lease(self, holder: str, count: int, lease_s: float) -> list[Event]:
        def take(db: sqlite3.Connection, now: float) -> list[Event]:
            rows = db.execute(
                "UPDATE events SET holder = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM events WHERE not_before <= ? AND lease_until < ? ORDER BY not_before LIMIT ?"
                ") RETURNING doc, body",
                (holder, now + lease_s, now, now, count),
            ).fetchall()
            return [Event.from_json(json.loads(doc), bytes(body)) for doc, body in rows]

        return await self._write(take)

    def _maybe_prune(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        db.execute("DELETE FROM statuses WHERE updated_at < ?", (now - STATUS_TTL_S,))
        db.execute("DELETE FROM idempotency WHERE until < ?", (now,))

    async def extend(self, holder: str, events: Sequence[Event], lease_s: float) -> None:
        ids = [e.id for e in events]
        if not ids:
            return

        def renew(db: sqlite3.Connection, now: float) -> None:
            db.executemany(
                "UPDATE events SET lease_until = ? WHERE id = ? AND holder = ?",
                [(now + lease_s, i, holder) for i in ids],
            )

        await self._write(renew)

    async def mark(self, status: Status) -> None:
        await self._write(lambda db, _now: self._status(db, status))

    @staticmethod
    def _status(db: sqlite3.Connection, status: Status) -> None:
        db.execute(
            "INSERT OR REPLACE INTO statuses (id, updated_at, doc) VALUES (?, ?, ?)",
            (status.id, status.updated_at, status.dumps()),
        )

    async def ack(self, event: Event, status: Status) -> None:
        def done(db: sqlite3.Connection, _now: float) -> None:
            db.execute("DELETE FROM events WHERE id = ?", (event.id,))
            self._status(db, status)

        await self._write(done)

    async def retry_later(self, event: Event, status: Status) -> None:
        def park(db: sqlite3.Connection, _now: float) -> None:
            db.execute(
                "UPDATE events SET doc = ?, not_before = ?, holder = NULL, lease_until = 0 WHERE id = ?",
                (json.dumps(event.to_json()), event.not_before, event.id),
            )
            self._status(db, status)

        await self._write(park)

    async def dead_letter(self, event: Event, status: Status) -> None:
        def bury(db: sqlite3.Connection, _now: float) -> None:
            db.execute("DELETE FROM events WHERE id = ?", (event.id,))
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (id, at, doc, body, status) VALUES (?, ?, ?, ?, ?)",
                (event.id, status.updated_at, json.dumps(event.to_json()), event.body, status.dumps()),
            )
            self._status(db, status)

        await self._write(bury)

    async def park(self, events: Sequence[Event]) -> None:
        ids = [(PARKED, e.id) for e in events]
        functions = sorted({e.label for e in events})
        if not ids:
            return

        def aside(db: sqlite3.Connection, now: float) -> None:
            db.executemany("UPDATE events SET not_before = ?, holder = NULL, lease_until = 0 WHERE id = ?", ids)
            db.execute(  # the rest of these Functions' backlog: due, held by nobody
                f"UPDATE events SET not_before = ? WHERE not_before <= ? AND lease_until < ?"
                f" AND {_FUNCTION} IN ({', '.join('?' * len(functions))})",
                (PARKED, now, now, *functions),
            )

        await self._write(aside)

    async def unpark(self, function: str, count: int) -> int:
        def free(db: sqlite3.Connection, now: float) -> int:
            cursor = db.execute(
                "UPDATE events SET not_before = ? WHERE id IN ("
                f" SELECT id FROM events WHERE not_before >= ? AND {_FUNCTION} = ? ORDER BY rowid LIMIT ?)",
                (now, PARKED, function, count),
            )
            return int(cursor.rowcount)

        return await self._write(free)

    async def parked(self) -> dict[str, int]:
        def count() -> dict[str, int]:
            rows = (
                self._conn()
                .execute(f"SELECT {_FUNCTION}, count(*) FROM events WHERE not_before >= ? GROUP BY 1", (PARKED,))
                .fetchall()
            )
            return {str(fn): int(n) for fn, n in rows}

        return await self._call(count)

    async def status(self, event_id: str) -> Status | None:
        return await self._call(self._read_status, event_id)

    def _read_status(self, event_id: str) -> Status | None:
        row = self._conn().execute("SELECT doc FROM statuses WHERE id = ?", (event_id,)).fetchone()
        return Status.loads(row[0]) if row else None

    async def depth(self) -> int:
        return await self._call(lambda: int(self._conn().execute("SELECT count(*) FROM events").fetchone()[0]))

    async def dead_letters(self) -> list[tuple[Event, Status]]:
        """Every dead-lettered event with its status, oldest first (for tests and inspection)."""
        return await self._call(self._dead_letters)

    def _dead_letters(self) -> list[tuple[Event, Status]]:
        rows = self._conn().execute("SELECT doc, body, status FROM dead_letters ORDER BY at").fetchall()
        return [(Event.from_json(json.loads(d), bytes(b)), Status.loads(s)) for d, b, s in rows]

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise StoreError(f"{self.description}: {err}") from None
        try:
            yield
            db.execute("COMMIT")
        except BaseException as err:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                raise StoreError(f"{self.description}: {err}") from None
            raise
