"""The catalogue (DuckDB, `ATLAS_HOME/catalog.duckdb`): build jobs, the append-only log of
label corrections that the next build applies, and the API keys.

An API key is a bearer token with a role (reviewer < technologist < admin). A token is shown
once, when it is created; the catalogue keeps only its SHA-256 hash. A reviewer reads, a
technologist also corrects labels, an admin also runs rebuilds and manages keys.

DuckDB lets one process write a database file at a time, so every operation opens the file,
does its work and closes it again; a writer that finds the file locked retries for a while.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

_PROCESS_LOCK = threading.RLock()

ROLES: tuple[str, ...] = ("reviewer", "technologist", "admin")  # lowest first
TOKEN_PREFIX = "cak_"

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS correction_seq START 1;
CREATE TABLE IF NOT EXISTS corrections (
    correction_id BIGINT PRIMARY KEY DEFAULT nextval('correction_seq'),
    cell_id       VARCHAR NOT NULL,
    old_label     VARCHAR,
    new_label     VARCHAR NOT NULL,
    note          VARCHAR,
    author        VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    atlas_version VARCHAR
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id      VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL,
    state       VARCHAR NOT NULL,      -- running, succeeded, failed
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    version     VARCHAR,
    message     VARCHAR,
    progress    VARCHAR                -- JSON: step, done, total
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id       VARCHAR PRIMARY KEY,
    name         VARCHAR NOT NULL,
    role         VARCHAR NOT NULL,
    token_sha256 VARCHAR NOT NULL UNIQUE,
    created_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS idempotency (  -- first answers of writes sent with an Idempotency-Key
    author          VARCHAR NOT NULL,
    key             VARCHAR NOT NULL,
    request_sha256  VARCHAR NOT NULL,     -- method, path and body of the first request
    status          INTEGER NOT NULL,
    response        VARCHAR NOT NULL,     -- JSON body of the first answer
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (author, key)
);
CREATE TABLE IF NOT EXISTS archived_cells (  -- cells archived one at a time (POST /v1/cells)
    cell_id       VARCHAR PRIMARY KEY,
    label         VARCHAR NOT NULL,
    source        VARCHAR,
    author        VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    image_path    VARCHAR NOT NULL,      -- the upload as sent, relative to ATLAS_HOME
    um_per_pixel  DOUBLE,                -- the upload's scale; NULL: the atlas's
    cell          VARCHAR NOT NULL,      -- JSON: its row of the cells table
    latent        FLOAT[] NOT NULL,
    embedder      VARCHAR NOT NULL,      -- fingerprint of the models that embedded it
    atlas_version VARCHAR NOT NULL,
    folded_into_version VARCHAR          -- the version that holds it; NULL: pending
);
CREATE SEQUENCE IF NOT EXISTS withdrawal_seq START 1;
CREATE TABLE IF NOT EXISTS withdrawals (     -- append-only: withdraw and restore events
    event_id      BIGINT PRIMARY KEY DEFAULT nextval('withdrawal_seq'),
    cell_id       VARCHAR NOT NULL,
    action        VARCHAR NOT NULL,      -- withdraw, restore
    reason        VARCHAR NOT NULL,
    author        VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    atlas_version VARCHAR
);
"""


class ApiKeyError(ValueError):
    """A key cannot be created or revoked (bad role, name taken, unknown name)."""


class IdempotencyKeyReused(ValueError):
    """An Idempotency-Key sent again with another request than the one it first came with."""

    def __init__(self, key: str):
        super().__init__(f"the Idempotency-Key {key!r} was already used for another request (another "
                         "path or body); use a new key for a new request")


class Catalog:
    def __init__(self, home: Path | str, retry_s: float = 30.0):
        self.path = Path(home) / "catalog.duckdb"
        self.retry_s = retry_s

    @contextmanager
    def connect(self, read_only: bool = False):
        """A connection for one short operation. `read_only` is accepted for callers' clarity
        but every connection is read-write: DuckDB refuses mixing both kinds on one file in
        one process, so connections in this process take turns (a process-wide lock) and other
        processes are waited for (retry while the file is locked)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _PROCESS_LOCK:
            deadline = time.monotonic() + self.retry_s
            while True:
                try:
                    connection = duckdb.connect(str(self.path))
                    break
                except duckdb.IOException:  # locked by another process
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                connection.execute(SCHEMA)
                yield connection
            finally:
                connection.close()

    # -- corrections ----------------------------------------------------------------------
    def add_correction(self, cell_id: str, old_label: str | None, new_label: str, note: str | None,
                       author: str, atlas_version: str | None, db=None) -> dict:
        """Append one correction (nothing is ever updated or deleted) and return it as stored;
        `db`: a connection of `once` (the correction then commits with its Idempotency-Key)."""
        if db is None:
            with self.connect() as db:
                return self.add_correction(cell_id, old_label, new_label, note, author, atlas_version, db)
        row = db.execute(
            "INSERT INTO corrections (cell_id, old_label, new_label, note, author, created_at, atlas_version) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {', '.join(CORRECTION_FIELDS)}",
            [cell_id, old_label, new_label, note, author, _now(), atlas_version],
        ).fetchone()
        return _correction(row)

    # -- idempotent writes ----------------------------------------------------------------
    def once(self, author: str, key: str | None, request_sha256: str, write) -> tuple[int, object, bool]:
        """Run `write(db) -> (status, JSON-able body)` once per (author, key): in one transaction
        with the record of its answer, so that a process killed at any point has either stored
        both or neither. Returns (status, body, replayed): a key seen before gives the first
        answer back (replayed=True) and runs nothing; the same key with another request (another
        `request_sha256`) raises IdempotencyKeyReused. Without a key, `write` simply runs in a
        transaction."""
        with self.connect() as db:
            db.begin()
            try:
                if key is not None:
                    first = db.execute("SELECT request_sha256, status, response FROM idempotency "
                                       "WHERE author = ? AND key = ?", [author, key]).fetchone()
                    if first is not None:
                        db.rollback()
                        if first[0] != request_sha256:
                            raise IdempotencyKeyReused(key)
                        return int(first[1]), json.loads(first[2]), True
                status, body = write(db)
                if key is not None:
                    db.execute("INSERT INTO idempotency (author, key, request_sha256, status, response, "
                               "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                               [author, key, request_sha256, status, json.dumps(body), _now()])
                db.commit()
            except IdempotencyKeyReused:
                raise
            except BaseException:
                db.rollback()
                raise
        return status, body, False

    def corrections(self, cell_id: str | None = None, author: str | None = None, limit: int = 50,
                    before: int | None = None) -> list[dict]:
        """Corrections newest first, optionally of one cell or one author; `before` (a
        correction_id) pages back through older ones."""
        where, params = _filters(("cell_id = ?", cell_id), ("author = ?", author), ("correction_id < ?", before))
        with self.connect(read_only=True) as db:
            rows = db.execute(
                f"SELECT {', '.join(CORRECTION_FIELDS)} FROM corrections WHERE {where} "
                "ORDER BY correction_id DESC LIMIT ?", [*params, limit]).fetchall()
        return [_correction(row) for row in rows]

    def effective_labels(self) -> tuple[int, dict[str, str]]:
        """(the latest correction_id, {cell_id: its latest new label}), read in one go."""
        with self.connect(read_only=True) as db:
            through = int(db.execute("SELECT coalesce(max(correction_id), 0) FROM corrections").fetchone()[0])
            rows = db.execute(
                "SELECT cell_id, arg_max(new_label, correction_id) FROM corrections "
                "WHERE correction_id <= ? GROUP BY cell_id", [through]).fetchall()
        return through, dict(rows)

    # -- jobs -----------------------------------------------------------------------------
    def job(self, job_id: str) -> dict | None:
        """One job (progress decoded from JSON), or None."""
        with self.connect(read_only=True) as db:
            row = db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE job_id = ?", [job_id]).fetchone()
        return _job(row) if row else None

    def jobs(self, kind: str | None = None, state: str | None = None, limit: int = 20) -> list[dict]:
        """Jobs newest first, optionally of one kind and state."""
        where, params = _filters(("kind = ?", kind), ("state = ?", state))
        with self.connect(read_only=True) as db:
            rows = db.execute(
                f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE {where} "
                "ORDER BY started_at DESC LIMIT ?", [*params, limit]).fetchall()
        return [_job(row) for row in rows]

    def start_job(self, job_id: str, kind: str) -> None:
        with self.connect() as db:
            db.execute("INSERT INTO jobs (job_id, kind, state, started_at) VALUES (?, ?, 'running', ?)",
                       [job_id, kind, _now()])

    def update_job(self, job_id: str, **fields) -> None:
        if "progress" in fields and not isinstance(fields["progress"], str):
            fields["progress"] = json.dumps(fields["progress"])
        if fields.get("state") in ("succeeded", "failed"):
            fields["finished_at"] = _now()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self.connect() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", [*fields.values(), job_id])

    # -- API keys -------------------------------------------------------------------------
    def create_key(self, name: str, role: str) -> str:
        """Store a new key and return its token (the only time the token exists in clear)."""
        check_role(role)
        name = name.strip()
        if not name:
            raise ApiKeyError("a key needs a name (a person or a system, e.g. 'review-station-3')")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.connect() as db:
            taken = db.execute("SELECT count(*) FROM api_keys WHERE name = ? AND revoked_at IS NULL",
                               [name]).fetchone()[0]
            if taken:
                raise ApiKeyError(f"an active key named {name!r} exists; "
                                  "revoke it first or choose another name")
            db.execute("INSERT INTO api_keys (key_id, name, role, token_sha256, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       [uuid.uuid4().hex[:12], name, role, hash_token(token), _now()])
        return token

    def revoke_key(self, name: str) -> int:
        """Revoke the active keys named `name`; returns how many were revoked."""
        with self.connect() as db:
            revoked = db.execute("UPDATE api_keys SET revoked_at = ? "
                                 "WHERE name = ? AND revoked_at IS NULL RETURNING key_id",
                                 [_now(), name]).fetchall()
        if not revoked:
            raise ApiKeyError(f"no active key named {name!r}")
        return len(revoked)

    def active_key(self, token: str) -> dict | None:
        """{key_id, name, role} of the active (unrevoked) key with this token, or None."""
        with self.connect(read_only=True) as db:
            row = db.execute(f"SELECT {', '.join(KEY_FIELDS)} FROM api_keys "
                             "WHERE token_sha256 = ? AND revoked_at IS NULL",
                             [hash_token(token)]).fetchone()
        return dict(zip(KEY_FIELDS, row, strict=True)) if row else None

    # -- the living archive: cells archived one at a time, withdrawals --------------------
    def archive_cell(self, cell: dict, latent, *, source: str | None, author: str, image_path: str,
                     um_per_pixel: float | None, embedder: str, atlas_version: str, db=None) -> dict:
        """Store one archived cell (`cell`: its row of the cells table, with cell_id and label)
        with its latent, pending until a version folds it in. Raises ArchivedCellExists when
        the cell is archived already. `db`: a connection of `once` (the cell then commits with
        its Idempotency-Key)."""
        if db is None:
            with self.connect() as db:
                return self.archive_cell(cell, latent, source=source, author=author, image_path=image_path,
                                         um_per_pixel=um_per_pixel, embedder=embedder,
                                         atlas_version=atlas_version, db=db)
        if db.execute("SELECT count(*) FROM archived_cells WHERE cell_id = ?", [cell["cell_id"]]).fetchone()[0]:
            raise ArchivedCellExists(cell["cell_id"])
        row = db.execute(
            "INSERT INTO archived_cells (cell_id, label, source, author, created_at, image_path, um_per_pixel, "
            "cell, latent, embedder, atlas_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"RETURNING {', '.join(ARCHIVED_FIELDS)}",
            [cell["cell_id"], cell["label"], source, author, _now(), image_path, um_per_pixel,
             json.dumps(cell), [float(v) for v in latent], embedder, atlas_version]).fetchone()
        return _archived(row)

    def archived_cells(self, pending_only: bool = True) -> list[dict]:
        """Archived cells in the order they came (`pending_only`: those no version holds yet)."""
        where = "folded_into_version IS NULL" if pending_only else "TRUE"
        with self.connect(read_only=True) as db:
            rows = db.execute(f"SELECT {', '.join(ARCHIVED_FIELDS)} FROM archived_cells WHERE {where} "
                              "ORDER BY created_at, cell_id").fetchall()
        return [_archived(row) for row in rows]

    def mark_folded(self, cell_ids, version: str) -> None:
        """The version that now holds these archived cells."""
        if not len(cell_ids):
            return
        with self.connect() as db:
            db.executemany("UPDATE archived_cells SET folded_into_version = ? WHERE cell_id = ?",
                           [[version, cell_id] for cell_id in cell_ids])

    def mark_pending(self, cell_id: str) -> None:
        """An archived cell that must be folded into the next version again (it was restored
        after a version left it out)."""
        with self.connect() as db:
            db.execute("UPDATE archived_cells SET folded_into_version = NULL WHERE cell_id = ?", [cell_id])

    def add_withdrawal(self, cell_id: str, action: str, reason: str, author: str,
                       atlas_version: str | None) -> dict:
        """Append one withdraw or restore event (nothing is ever updated or deleted)."""
        if action not in ("withdraw", "restore"):
            raise ValueError(f"unknown withdrawal action {action!r}")
        with self.connect() as db:
            row = db.execute(
                "INSERT INTO withdrawals (cell_id, action, reason, author, created_at, atlas_version) "
                f"VALUES (?, ?, ?, ?, ?, ?) RETURNING {', '.join(WITHDRAWAL_FIELDS)}",
                [cell_id, action, reason, author, _now(), atlas_version]).fetchone()
        return _withdrawal(row)

    def withdrawals(self, cell_id: str | None = None) -> list[dict]:
        """Withdraw and restore events, oldest first, optionally of one cell."""
        where, params = _filters(("cell_id = ?", cell_id))
        with self.connect(read_only=True) as db:
            rows = db.execute(f"SELECT {', '.join(WITHDRAWAL_FIELDS)} FROM withdrawals WHERE {where} "
                              "ORDER BY event_id", params).fetchall()
        return [_withdrawal(row) for row in rows]

    def withdrawn_cells(self) -> dict[str, dict]:
        """{cell_id: its withdraw event} of the cells whose latest event is a withdrawal."""
        with self.connect(read_only=True) as db:
            rows = db.execute(
                f"SELECT {', '.join(WITHDRAWAL_FIELDS)} FROM withdrawals WHERE event_id IN "
                "(SELECT max(event_id) FROM withdrawals GROUP BY cell_id) AND action = 'withdraw'").fetchall()
        return {row[1]: _withdrawal(row) for row in rows}

    def archive_stamp(self) -> tuple[int, int, int]:
        """Changes whenever a cell is archived, folded or restored, or a withdrawal event is added."""
        with self.connect(read_only=True) as db:
            archived = db.execute("SELECT count(*), count(folded_into_version), "
                                  "coalesce(sum(hash(cell_id || coalesce(folded_into_version, ''))), 0) "
                                  "FROM archived_cells").fetchone()
            events = db.execute("SELECT coalesce(max(event_id), 0) FROM withdrawals").fetchone()[0]
        return int(archived[0]), int(archived[2]) % (2**61), int(events)


class ArchivedCellExists(ValueError):
    """A cell with this id is archived already (the same image sent twice)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ApiKeyError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    return role


CORRECTION_FIELDS = ("correction_id", "cell_id", "old_label", "new_label", "note", "author", "created_at",
                     "atlas_version")
JOB_FIELDS = ("job_id", "kind", "state", "started_at", "finished_at", "version", "message", "progress")
KEY_FIELDS = ("key_id", "name", "role")
ARCHIVED_FIELDS = ("cell_id", "label", "source", "author", "created_at", "image_path", "um_per_pixel", "cell",
                   "latent", "embedder", "atlas_version", "folded_into_version")
WITHDRAWAL_FIELDS = ("event_id", "cell_id", "action", "reason", "author", "created_at", "atlas_version")


def _filters(*conditions: tuple[str, object]) -> tuple[str, list]:
    """A WHERE clause of the (condition, value) pairs whose value is given, and its parameters."""
    given = [(condition, value) for condition, value in conditions if value is not None]
    return " AND ".join(["TRUE"] + [condition for condition, _ in given]), [value for _, value in given]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime | None) -> datetime | None:
    # DuckDB returns TIMESTAMPTZ in the session's time zone; answers always speak UTC.
    return value.astimezone(timezone.utc) if value is not None else None


def _correction(row) -> dict:
    correction = dict(zip(CORRECTION_FIELDS, row, strict=True))
    correction["created_at"] = _utc(correction["created_at"])
    return correction


def _job(row) -> dict:
    job = dict(zip(JOB_FIELDS, row, strict=True))
    job["started_at"], job["finished_at"] = _utc(job["started_at"]), _utc(job["finished_at"])
    job["progress"] = json.loads(job["progress"]) if job["progress"] else None
    return job


def _archived(row) -> dict:
    archived = dict(zip(ARCHIVED_FIELDS, row, strict=True))
    archived["created_at"] = _utc(archived["created_at"])
    archived["cell"] = json.loads(archived["cell"])
    return archived


def _withdrawal(row) -> dict:
    event = dict(zip(WITHDRAWAL_FIELDS, row, strict=True))
    event["created_at"] = _utc(event["created_at"])
    return event
