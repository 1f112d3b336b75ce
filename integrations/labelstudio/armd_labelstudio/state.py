"""The bridge's durable state: one SQLite file in the state directory.

* ``meta``: the bridge id (a random id written once, put into every label's metadata), the Label
  Studio project id and URL.
* ``requests``: armd request id <-> Label Studio task id, with the request's label budget and expiry,
  and its status (``creating`` while its task is being created, ``open`` while annotators may answer
  it, then ``done``, ``expired``, or ``expired_unposted`` when it had expired before the bridge read it).
* ``annotations``: every Label Studio annotation the bridge has decided on, keyed by annotation id:
  ``pending`` (a label is being published), ``sent`` (the broker confirmed it), or why it was not
  sent (``late``, ``surplus``, ``duplicate_annotator``, ``unreadable``).

Every change is one transaction (SQLite with a write-ahead log and ``synchronous=FULL``), so a crash
leaves the state as of the last completed step. Kafka offsets are committed only after the step that
consumed the message is recorded here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id     TEXT PRIMARY KEY,
    task_id        INTEGER UNIQUE,
    status         TEXT NOT NULL,
    labels_wanted  INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    source         TEXT NOT NULL,
    recorded_ms    INTEGER NOT NULL,
    closed_ms      INTEGER
);
CREATE INDEX IF NOT EXISTS requests_by_status ON requests (status, expires_at_ms);
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id   INTEGER PRIMARY KEY,
    task_id         INTEGER NOT NULL,
    request_id      TEXT NOT NULL,
    annotator_id    TEXT,
    outcome         TEXT,
    answered_at_ms  INTEGER,
    status          TEXT NOT NULL,
    watermarks      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    recorded_ms     INTEGER NOT NULL,
    sent_ms         INTEGER
);
CREATE INDEX IF NOT EXISTS annotations_by_request ON annotations (request_id, status);
CREATE INDEX IF NOT EXISTS annotations_by_status ON annotations (status);
"""

CREATING = "creating"
OPEN = "open"
DONE = "done"
EXPIRED = "expired"
EXPIRED_UNPOSTED = "expired_unposted"

PENDING = "pending"
SENT = "sent"
#: Annotation statuses that hold (or will hold) one of a request's labels.
ACCEPTED = (PENDING, SENT)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    task_id: Optional[int]
    status: str
    labels_wanted: int
    expires_at_ms: int


@dataclass(frozen=True)
class AnnotationRow:
    annotation_id: int
    task_id: int
    request_id: str
    annotator_id: Optional[str]
    outcome: Optional[str]
    answered_at_ms: Optional[int]
    status: str
    watermarks: Optional[Dict[int, int]]
    attempts: int


class State:
    def __init__(self, state_dir: str):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "armd-labelstudio.sqlite3")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(_DDL)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: state schema {version}, this bridge reads {SCHEMA_VERSION}")
        if self.get_meta("bridge_id") is None:
            self.set_meta("bridge_id", uuid.uuid4().hex)

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    # -------------------------------------------------------------------------------------- meta
    def get_meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    @property
    def bridge_id(self) -> str:
        return self.get_meta("bridge_id")

    # ---------------------------------------------------------------------------------- requests
    def request(self, request_id: str) -> Optional[RequestRow]:
        row = self.db.execute(
            "SELECT request_id, task_id, status, labels_wanted, expires_at_ms FROM requests "
            "WHERE request_id = ?", (request_id,)).fetchone()
        return RequestRow(*row) if row else None

    def add_request(self, request_id: str, task_id: Optional[int], status: str, labels_wanted: int,
                    expires_at_ms: int, source: str) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO requests (request_id, task_id, status, labels_wanted, expires_at_ms, source,"
                " recorded_ms, closed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, task_id, status, labels_wanted, expires_at_ms, source, now_ms(),
                 None if status == OPEN else now_ms()))

    def begin_request(self, request_id: str, labels_wanted: int, expires_at_ms: int, source: str) -> None:
        """Records that a task is about to be created for this request (status ``creating``): if the
        bridge dies before :meth:`finish_request`, the next start looks the task up in Label Studio."""
        self.add_request(request_id, None, CREATING, labels_wanted, expires_at_ms, source)

    def finish_request(self, request_id: str, task_id: int) -> None:
        with self._tx():
            self.db.execute("UPDATE requests SET task_id = ?, status = ?, closed_ms = NULL "
                            "WHERE request_id = ?", (task_id, OPEN, request_id))

    def open_requests(self) -> List[RequestRow]:
        rows = self.db.execute(
            "SELECT request_id, task_id, status, labels_wanted, expires_at_ms FROM requests "
            "WHERE status = ? ORDER BY task_id", (OPEN,)).fetchall()
        return [RequestRow(*r) for r in rows]

    def close_request(self, request_id: str, status: str) -> None:
        with self._tx():
            self.db.execute("UPDATE requests SET status = ?, closed_ms = ? WHERE request_id = ?",
                            (status, now_ms(), request_id))

    def count_requests(self, status: Optional[str] = None) -> int:
        if status is None:
            return self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM requests WHERE status = ?", (status,)).fetchone()[0]

    # ------------------------------------------------------------------------------- annotations
    def has_annotation(self, annotation_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM annotations WHERE annotation_id = ?",
                               (annotation_id,)).fetchone() is not None

    def accepted(self, request_id: str) -> List[str]:
        """Annotator ids whose labels for this request are sent or being sent."""
        rows = self.db.execute(
            "SELECT annotator_id FROM annotations WHERE request_id = ? AND status IN (?, ?) "
            "ORDER BY annotation_id", (request_id, *ACCEPTED)).fetchall()
        return [r[0] for r in rows]

    def sent_count(self, request_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM annotations WHERE request_id = ? AND status = ?",
                               (request_id, SENT)).fetchone()[0]

    def record_annotation(self, annotation_id: int, task_id: int, request_id: str, status: str, *,
                          annotator_id: Optional[str] = None, outcome: Optional[str] = None,
                          answered_at_ms: Optional[int] = None,
                          watermarks: Optional[Dict[int, int]] = None) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO annotations (annotation_id, task_id, request_id, annotator_id, outcome,"
                " answered_at_ms, status, watermarks, attempts, recorded_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (annotation_id, task_id, request_id, annotator_id, outcome, answered_at_ms, status,
                 json.dumps(watermarks) if watermarks is not None else None, now_ms()))

    def pending(self) -> List[AnnotationRow]:
        rows = self.db.execute(
            "SELECT annotation_id, task_id, request_id, annotator_id, outcome, answered_at_ms, status,"
            " watermarks, attempts FROM annotations WHERE status = ? ORDER BY annotation_id",
            (PENDING,)).fetchall()
        out = []
        for r in rows:
            wm = {int(k): int(v) for k, v in json.loads(r[7]).items()} if r[7] else None
            out.append(AnnotationRow(*r[:7], wm, r[8]))
        return out

    def note_attempt(self, annotation_ids: Iterable[int]) -> None:
        with self._tx():
            self.db.executemany("UPDATE annotations SET attempts = attempts + 1 WHERE annotation_id = ?",
                                [(a,) for a in annotation_ids])

    def mark_sent(self, annotation_ids: Iterable[int]) -> None:
        """Marks labels as published; closes their requests as ``done`` once they have all their labels."""
        ids = list(annotation_ids)
        if not ids:
            return
        with self._tx():
            t = now_ms()
            self.db.executemany(
                "UPDATE annotations SET status = ?, sent_ms = ? WHERE annotation_id = ? AND status = ?",
                [(SENT, t, a, PENDING) for a in ids])
            self.db.execute(
                f"UPDATE requests SET status = ?, closed_ms = ? WHERE status = ? AND request_id IN "
                f"(SELECT request_id FROM annotations WHERE annotation_id IN ({','.join('?' * len(ids))}))"
                f" AND (SELECT COUNT(*) FROM annotations a WHERE a.request_id = requests.request_id"
                f" AND a.status = ?) >= labels_wanted",
                (DONE, t, OPEN, *ids, SENT))

    def count_annotations(self, status: Optional[str] = None) -> int:
        if status is None:
            return self.db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM annotations WHERE status = ?",
                               (status,)).fetchone()[0]

    # -------------------------------------------------------------------------------- retention
    def prune(self, older_than_ms: int) -> int:
        """Forgets requests closed before ``older_than_ms`` and their annotations (never open ones or
        labels still pending). Returns the number of requests forgotten."""
        with self._tx():
            self.db.execute(
                "DELETE FROM annotations WHERE status != ? AND request_id IN (SELECT request_id FROM "
                "requests WHERE status != ? AND closed_ms < ?)", (PENDING, OPEN, older_than_ms))
            cur = self.db.execute(
                "DELETE FROM requests WHERE status != ? AND closed_ms < ? AND NOT EXISTS (SELECT 1 FROM "
                "annotations a WHERE a.request_id = requests.request_id)", (OPEN, older_than_ms))
            return cur.rowcount
