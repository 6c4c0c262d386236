"""The key-value store of local mode: one SQLite file (WAL, synchronous NORMAL), used on the event loop.

There MUST be NO await inside an operation: each runs from its first statement to its COMMIT
without yielding, so it is atomic for every other coroutine of the one process that owns the
file (`start` takes an exclusive `flock` on `<file>.lock`), and its transaction makes it atomic
on the disk too. That is what makes the operations on a key linearizable.

Why on the loop and not on a thread like the event store (`ember.sources.sqlite`): a point read
or write here takes tens of µs, about what a hop to a thread and back costs, and
`context.state.get` is meant to answer within 1 ms end to end. WAL with synchronous NORMAL
commits without an fsync (a commit survives the process being killed, not the machine losing
power); the fsyncs come at checkpoints, every 1,000 pages of WAL.

Expired rows count as absent at once and are deleted later: every `SWEEP_EVERY_S`, a write
deletes up to `SWEEP_BATCH` of them (and the next write more, while a batch comes back full), so
no single operation holds the loop for long.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ember.sources.sqlite import lock_exclusively
from ember.state.store import INT64_MAX, INT64_MIN, StateError, StoreUnavailable, as_integer, overflows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
"""

_READ = "SELECT value, expires_at FROM kv WHERE scope = ? AND key = ?"
_WRITE = (
    "INSERT INTO kv (scope, key, value, expires_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
_SWEEP = (
    "DELETE FROM kv WHERE (scope, key) IN"
    " (SELECT scope, key FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)"
)

SWEEP_EVERY_S = 60.0
SWEEP_BATCH = 500


class SqliteKeyValueStore:
    """`KeyValueStore` in one SQLite file."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.description = f"sqlite {path}"
        self._clock = clock  # wall-clock seconds: expiries outlive the process
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._swept_at = float("-inf")

    async def start(self) -> None:
        hint = "another ember dev with the same --state-dir?"
        fd = lock_exclusively(self.path, f"the state store {self.path}", hint, StateError)
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            os.close(fd)
            raise StateError(f"the state store {self.path} cannot be opened: {err}") from err
        self._db, self._lock_fd = db, fd

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def _transaction(self, op: str) -> Iterator[tuple[sqlite3.Connection, float]]:
        """One write transaction (with the sweep when it is due); a SQLite error is StoreUnavailable."""
        db = self._db
        if db is None:
            raise StoreUnavailable(f"the state store {self.description} is not open")
        now = self._clock()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db, now
                if now - self._swept_at >= SWEEP_EVERY_S:
                    swept = db.execute(_SWEEP, (now, SWEEP_BATCH)).rowcount
                    self._swept_at = float("-inf") if swept == SWEEP_BATCH else now
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StoreUnavailable(
                f"the state store {self.description} failed: {err}; the {op} may not have been applied"
            ) from err

    @staticmethod
    def _live(row: tuple[bytes, float | None] | None, now: float) -> tuple[bytes, float | None] | None:
        if row is None or (row[1] is not None and row[1] <= now):
            return None
        return row

    async def get(self, scope: str, key: str) -> bytes | None:
        db = self._db
        if db is None:
            raise StoreUnavailable(f"the state store {self.description} is not open")
        try:
            row = self._live(db.execute(_READ, (scope, key)).fetchone(), self._clock())
        except sqlite3.Error as err:
            raise StoreUnavailable(f"the state store {self.description} failed: {err}") from err
        return None if row is None else row[0]

    async def put(self, scope: str, key: str, value: bytes, ttl_s: int | None) -> None:
        with self._transaction("put") as (db, now):
            db.execute(_WRITE, (scope, key, value, None if ttl_s is None else now + ttl_s))

    async def delete(self, scope: str, key: str) -> bool:
        with self._transaction("delete") as (db, now):
            gone = db.execute("DELETE FROM kv WHERE scope = ? AND key = ? RETURNING value, expires_at", (scope, key))
            return self._live(gone.fetchone(), now) is not None

    async def incr(self, scope: str, key: str, by: int, ttl_s: int | None) -> int:
        with self._transaction("incr") as (db, now):
            row = self._live(db.execute(_READ, (scope, key)).fetchone(), now)
            number, expires_at = (0, None) if row is None else (as_integer(key, row[0]), row[1])
            number += by
            if not INT64_MIN <= number <= INT64_MAX:
                raise overflows(key, by)
            if ttl_s is not None:
                expires_at = now + ttl_s
            db.execute(_WRITE, (scope, key, str(number).encode(), expires_at))
            return number

    async def compare_and_set(
        self, scope: str, key: str, expected: bytes | None, value: bytes, ttl_s: int | None
    ) -> tuple[bool, bytes | None]:
        with self._transaction("compare_and_set") as (db, now):
            row = self._live(db.execute(_READ, (scope, key)).fetchone(), now)
            current = None if row is None else row[0]
            if current != expected:
                return False, current
            db.execute(_WRITE, (scope, key, value, None if ttl_s is None else now + ttl_s))
            return True, value
