"""Persistent measurements: SQLAlchemy 2.x Core, SQLite by default, any SQLAlchemy URL (PostgreSQL) for fleets.

All of autosdpa's SQL lives here. Every backend's measurement is kept (not only the winner), one row per
(environment, problem key, backend). Read-only shared databases (shipped ``tuning_db/*.sqlite`` and
``AUTOSDPA_SHARED_DBS``) are layered under the user's database: the user's own rows win.

A database target is a file path, ``":memory:"``, or a URL (anything with ``://``). A path is always a path:
``?`` and ``#`` in it are part of the file name, never URI parameters. Settings (which target, how long to
wait for a lock) are arguments: the store never reads the environment.

Schema versions (``autosdpa_meta.schema_version``), upgraded forward by ``MIGRATIONS``:

1. ``autosdpa_meta``, ``environment``, ``measurement`` (unique on environment + problem key + backend).
2. + index ``ix_measurement_problem_key`` on ``measurement(problem_key)`` (lookups and ``db`` commands filter
   by key across environments), + table ``decision`` (rank-consistent choices under torch.distributed).

A writable database of an older version is upgraded in place when opened; a read-only one (a shipped or
downloaded file) is read as it is when its tables are compatible, never written. A newer version is refused.
An existing file is inspected read-only *before* anything is written to it: a file that is not a regular
file, not SQLite, or another application's database is refused untouched (no WAL switch, no ``-journal``).

Files from elsewhere are data (see ``autosdpa.validation``): tables with hidden or generated columns, views
or triggers where tables are expected are refused; every text column is read through ``substr`` with a
bound, and rows are streamed, so a small hostile file cannot make a read take unbounded time or memory.

Concurrency: SQLite files run in WAL mode with a busy timeout; write transactions start with
``BEGIN IMMEDIATE`` (so a reader never has to upgrade to a writer mid-transaction, which SQLite answers with an
immediate "database is locked"), and every write is retried with backoff on transient lock / deadlock errors.

Reads of a file database go through a per-environment snapshot: a process makes many decisions in few
environments, so an environment's rows are read in one query and kept while SQLite's ``PRAGMA data_version``
says that no connection (this process's writes included) has committed since; then it is read again.
What a process does on every run with a file (inspect it, read those snapshots, create a new file, save rows)
goes through plain sqlite3 connections; the SQLAlchemy engine is built on first use by anything else
(administrative reads, prune, decisions, migrations), so a first call does not pay ~15 ms to build it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sqlite3
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event

from .config import DEFAULT_DB_TIMEOUT_S
from .records import ENV_FIELDS, ENV_INT_FIELDS, MEASUREMENT_FIELDS, STATUSES, Measurement, fingerprint_of  # noqa: F401
from .validation import (BACKEND_NAME_RE, MAX_BACKENDS_PER_KEY, MAX_DETAIL_LEN, MAX_KEY_LEN,  # noqa: F401
                         TEXT_READ_LIMITS, environment_error, key_error, known_backends, measurement_error)

SCHEMA_VERSION = 2
NEAR_FIELDS = ("device_type", "device_name", "capability", "cores", "memory_gb")  # the same hardware
SNAPSHOT_MAX_ROWS = 20_000  # an environment with more rows is read one problem key at a time
#: Warm start reads rows of at most this many other environments of the same hardware: the newest ones.
NEAR_ENVIRONMENTS = 16
#: SQLite VM steps one warm-start read of a file may take: ~0.15 s on a 2-core EPYC VM, a scan of ~1.5M rows
#: (files autosdpa writes need a few hundred: their indexes serve these reads). A file that needs more is left
#: out of warm start for the rest of the process, with one warning.
WARM_READ_BUDGET = 5_000_000
_BUDGET_TICK = 1000  # VM steps between two looks at the budget
MEMORY = ":memory:"

metadata = sa.MetaData()
meta_table = sa.Table(
    "autosdpa_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
environment_table = sa.Table(
    "environment", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("device_type", sa.String(16), nullable=False),
    sa.Column("device_name", sa.String(256), nullable=False),
    sa.Column("capability", sa.String(32), nullable=False, default=""),
    sa.Column("cores", sa.Integer, nullable=False, default=0),
    sa.Column("memory_gb", sa.Integer, nullable=False, default=0),
    sa.Column("torch", sa.String(64), nullable=False, default=""),
    sa.Column("cuda", sa.String(32), nullable=False, default=""),
    sa.Column("cudnn", sa.String(32), nullable=False, default=""),
    sa.Column("triton", sa.String(32), nullable=False, default=""),
    sa.Column("kernels", sa.String(32), nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)
measurement_table = sa.Table(
    "measurement", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("environment_id", sa.Integer, sa.ForeignKey("environment.id"), nullable=False),
    sa.Column("problem_key", sa.String(512), nullable=False),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("median_s", sa.Float),
    sa.Column("spread_s", sa.Float),
    sa.Column("samples", sa.Integer, nullable=False, default=0),
    sa.Column("max_error", sa.Float),
    sa.Column("detail", sa.Text, nullable=False, default=""),
    sa.Column("tuned_shape", sa.String(512), nullable=False, default=""),
    sa.Column("measured_at", sa.Float, nullable=False),
    sa.UniqueConstraint("environment_id", "problem_key", "backend", name="uq_measurement"),
)
measurement_key_index = sa.Index("ix_measurement_problem_key", measurement_table.c.problem_key)  # v2
decision_table = sa.Table(  # v2
    "decision", metadata,
    sa.Column("environment_id", sa.Integer, sa.ForeignKey("environment.id"), primary_key=True),
    sa.Column("problem_key", sa.String(512), primary_key=True),
    sa.Column("backend", sa.String(64), nullable=False),
    sa.Column("decided_at", sa.Float, nullable=False),
    sa.Column("decided_by", sa.String(256), nullable=False, default=""),
)
_V1_TABLES = {"autosdpa_meta": meta_table, "environment": environment_table, "measurement": measurement_table}


class StoreError(RuntimeError):
    """The database cannot be used (unreadable, corrupt, newer schema, locked, full, ...)."""


class EmptyDatabase(StoreError):
    """Opened read-only, the database does not exist yet (a missing file, or no tables at all): nothing to read,
    and a reader must not create it. ``database``: its name for display (no password)."""

    def __init__(self, message: str, database: str):
        super().__init__(message)
        self.database = database


class OverBudget(StoreError):
    """A read was stopped: it would have taken more than its budget of SQLite steps."""


@dataclasses.dataclass
class PruneResult:
    removed: int = 0                                   # measurement rows deleted
    kept: int = 0                                      # measurement rows left
    environments_removed: list[str] = dataclasses.field(default_factory=list)  # fingerprints
    removed_by_environment: dict[str, int] = dataclasses.field(default_factory=dict)  # stale fingerprint -> rows


# -- targets ---------------------------------------------------------------------------------------------------

def default_db_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("autosdpa")) / "autosdpa.sqlite"


def parse_target(target: str | os.PathLike | None) -> tuple[str, str | Path]:
    """``(kind, where)``: ("file", absolute Path), ("memory", ":memory:") or ("url", URL string).

    None is the default cache file. Only a string with ``://`` is a URL; an ``sqlite:///PATH`` URL is taken as
    the file PATH (and may not carry parameters). Raises StoreError for a malformed URL."""
    if target is None:
        return "file", default_db_path()
    t = os.fspath(target)
    if t in ("", MEMORY, "sqlite://", "sqlite:///:memory:"):
        return "memory", MEMORY
    if "://" not in t:
        return "file", Path(t).expanduser().absolute()
    try:
        u = sa.engine.make_url(t)
    except (sa.exc.ArgumentError, ValueError) as e:
        raise StoreError(f"cannot open {t!r}: not a database URL ({e})") from None
    if u.get_backend_name() != "sqlite":
        return "url", t
    if u.query:
        raise StoreError(f"{t}: parameters in an sqlite URL are not supported; give the file path instead")
    if not u.database or u.database == MEMORY:
        return "memory", MEMORY
    return "file", Path(u.database).expanduser().absolute()


def db_url(target: str | os.PathLike | None = None) -> str:
    """A readable URL for a target (None: the default cache file). For display: files are opened by path."""
    kind, where = parse_target(target)
    return {"memory": "sqlite://", "file": f"sqlite:///{where}"}.get(kind, str(where))


def is_sqlite_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file starting with SQLite's header (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _check_file(path: Path, *, readonly: bool) -> bool:
    """Refuse what is not a usable file before SQLite touches it; create the parent folder of a new file.
    Returns whether the file exists with content (and so must be inspected before any write)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if readonly:
            raise EmptyDatabase(f"{path}: no such database file", str(path)) from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {path}: {e.strerror or e}") from None
        if not path.parent.is_dir():
            raise StoreError(f"cannot create {path}: {path.parent} is not a folder")
        return False
    except OSError as e:  # a path through a file, no permission, ...
        raise StoreError(f"cannot use {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} is not a regular file")
    if st.st_size == 0 and not readonly:
        return False
    if not is_sqlite_file(path):
        raise StoreError(f"{path} is not an SQLite database file")
    return True


def _sqlite_wal_header(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return len(head) >= 20 and head[18] == 2 and head[19] == 2


def _sqlite_pragmas(dbapi_conn, *, readonly: bool, wal: bool, timeout_s: float) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    if readonly:
        cur.execute("PRAGMA query_only = 1")
        cur.execute("PRAGMA trusted_schema = 0")  # a hostile file's views/triggers may not call functions
    elif wal:
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable against process crashes (kill -9)
    cur.close()


def _on_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("autosdpa_write") else "BEGIN")


def _file_uri(path: Path, *, readonly: bool) -> str:
    """A URI built from the path (``?``/``#`` are quoted, never parameters). Read-only: ``mode=ro``; a WAL-mode
    file without its ``-wal`` is opened immutable so that SQLite does not create ``-wal``/``-shm`` files next
    to a shipped file either."""
    params = "mode=rwc"
    if readonly:
        immutable = _sqlite_wal_header(path) and not Path(str(path) + "-wal").exists()
        params = "mode=ro" + ("&immutable=1" if immutable else "")
    return f"file:{quote(str(path))}?{params}"


def _reader(path: Path, *, readonly: bool, timeout_s: float) -> sqlite3.Connection:
    """A plain sqlite3 connection that never writes (``query_only``): what inspecting a file and the snapshots
    read through, so that a process that only reads never builds a SQLAlchemy engine."""
    uri = _file_uri(path, readonly=readonly).replace("mode=rwc", "mode=rw")
    con = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)
    con.isolation_level = None
    con.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    con.execute("PRAGMA query_only = 1")
    con.execute("PRAGMA trusted_schema = 0")
    return con


def _file_engine(path: Path, *, readonly: bool, wal: bool, timeout_s: float, pool=sa.pool.QueuePool) -> sa.Engine:
    """An engine on the file ``path`` (see ``_file_uri``)."""
    uri = _file_uri(path, readonly=readonly)

    def connect():
        return sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False)

    engine = sa.create_engine("sqlite+pysqlite://", creator=connect, poolclass=pool)
    event.listen(engine, "connect",
                 lambda c, _r: _sqlite_pragmas(c, readonly=readonly, wal=wal, timeout_s=timeout_s))
    event.listen(engine, "begin", _on_begin)
    return engine


def _memory_engine() -> sa.Engine:
    # one shared in-memory database, not one per connection
    return sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False})


T = TypeVar("T")


def _transient(e: BaseException) -> bool:
    """Lock contention / deadlock / serialization failures: worth retrying."""
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40001", "40P01", "55P03"):
        return True
    msg = str(orig if orig is not None else e).lower()
    return isinstance(e, (sa.exc.OperationalError, sqlite3.OperationalError)) and ("locked" in msg or "busy" in msg)


def retrying(fn: Callable[[], T], *, deadline_s: float) -> T:
    """Run ``fn`` (one whole transaction), retrying with jittered exponential backoff on transient errors
    until ``deadline_s`` seconds have passed."""
    start, delay = time.monotonic(), 0.01
    while True:
        try:
            return fn()
        except (sa.exc.DBAPIError, sqlite3.OperationalError) as e:
            if not _transient(e) or time.monotonic() - start > deadline_s:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


def _describe(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return f"{e.__class__.__name__}: {str(orig if orig is not None else e).splitlines()[0][:300]}"


def _hint(e: BaseException, timeout_s: float) -> str:
    """What SQLite's terse messages usually mean, for the one warning a user gets."""
    msg = str(getattr(e, "orig", None) or e).lower()
    if "locked" in msg or "busy" in msg:
        return f" (another process held it longer than the {timeout_s:g} s timeout, AUTOSDPA_DB_TIMEOUT)"
    if "disk i/o error" in msg or "disk is full" in msg:
        return " (is the disk full, or the file size limited?)"
    if "readonly" in msg or "read-only" in msg:
        return " (the file or its folder is read-only)"
    if "not a database" in msg or "malformed" in msg:
        return " (the file was damaged or replaced)"
    return ""


# -- schema and migrations ---------------------------------------------------------------------------------------

def _create(conn, items) -> None:
    for item in items:
        if isinstance(item, sa.Index):
            conn.execute(sa.schema.CreateIndex(item, if_not_exists=True))
        else:
            conn.execute(sa.schema.CreateTable(item, if_not_exists=True))


def _v1_to_v2(conn) -> None:
    _create(conn, [measurement_key_index, decision_table])


#: (from_version, what it adds, function(conn) that upgrades from_version -> from_version + 1).
#: Each step must be idempotent (IF NOT EXISTS), so a half-applied upgrade can simply run again.
MIGRATIONS: list[tuple[int, str, Callable]] = [
    (1, "index on measurement(problem_key); decision table for rank-consistent choices", _v1_to_v2),
]


def migrate(conn, version: int) -> int:
    """Upgrade the schema on ``conn`` (inside a transaction) from ``version`` to SCHEMA_VERSION."""
    for frm, _what, fn in MIGRATIONS:
        if frm == version:
            fn(conn)
            version = frm + 1
            conn.execute(sa.update(meta_table).where(meta_table.c.name == "schema_version")
                         .values(value=str(version)))
    if version != SCHEMA_VERSION:
        raise StoreError(f"no migration path from schema version {version} to {SCHEMA_VERSION}")
    return version


def _read_version(conn, where: str) -> int:
    return _parse_version(conn.execute(sa.select(sa.func.substr(meta_table.c.value, 1, 16))
                                       .where(meta_table.c.name == "schema_version")).scalar(), where)


def _parse_version(v, where: str) -> int:
    try:
        version = int(str(v)[:12])
    except (TypeError, ValueError):
        raise StoreError(f"{where}: unreadable schema version {str(v)[:40]!r}") from None
    if version < 1:
        raise StoreError(f"{where}: unreadable schema version {version}")
    return version


def _writable_version(c, where: str) -> None:
    """Inside a write transaction: refuse to write into a database a newer autosdpa has upgraded meanwhile."""
    _refuse_newer(_read_version(c, where), where)


def _refuse_newer(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where} was upgraded to schema version {version} by a newer autosdpa; not writing "
                         f"to it (this autosdpa understands {SCHEMA_VERSION}); upgrade autosdpa")


def _driver_rows(c) -> Callable[..., list]:
    """``rows(sql, params=())`` on a SQLAlchemy connection or a plain sqlite3 one."""
    if isinstance(c, sqlite3.Connection):
        return lambda sql, params=(): c.execute(sql, params).fetchall()
    return lambda sql, params=(): c.exec_driver_sql(sql, params).fetchall()


def _refuse_hidden_objects(rows, where: str) -> None:
    """SQLite: our names must be plain tables, without hidden or generated columns, without triggers.

    A generated column is computed on every read (``printf('%.*c', 1e9, 'x')`` from a 44 KB file), a view or
    virtual table may run anything: a file that has them is not one autosdpa wrote."""
    names = set(metadata.tables)
    for kind, name, tbl, sql in rows(
            "SELECT type, substr(name, 1, 64), substr(tbl_name, 1, 64), substr(sql, 1, 40) FROM sqlite_master"):
        if kind == "trigger" and tbl in names:
            raise StoreError(f"{where}: refusing a database with triggers on its tables (trigger {name!r})")
        if name in names and (kind != "table" or (sql or "").upper().startswith("CREATE VIRTUAL")):
            raise StoreError(f"{where}: {name} is a {'virtual table' if kind == 'table' else kind}, not a table")
    for name in sorted(names):
        for col in rows(f'PRAGMA table_xinfo("{name}")'):
            if col[6]:  # hidden
                raise StoreError(f"{where}: refusing table {name} with a hidden or generated column "
                                 f"({str(col[1])[:64]!r})")


def _inspect(c, where: str, *, readonly: bool = False) -> int | None:
    """Check an existing database's tables: its schema version, or None when it has none of autosdpa's tables
    and no others (a new database; ``readonly``: EmptyDatabase when it has no table at all, since a reader does
    not create one). Raises StoreError for anything autosdpa did not write. ``c``: a SQLAlchemy connection, or
    a plain sqlite3 one (SQLite is inspected through plain SQL either way)."""
    if isinstance(c, sqlite3.Connection) or c.dialect.name == "sqlite":
        rows = _driver_rows(c)
        _refuse_hidden_objects(rows, where)
        tables = {r[0] for r in rows("SELECT substr(name, 1, 64) FROM sqlite_master WHERE type = 'table'")}

        def columns(name):
            return {r[1] for r in rows(f'PRAGMA table_info("{name}")')}

        def version():
            got = rows(_SQLITE_VERSION_SQL)
            return _parse_version(got[0][0] if got else None, where)
    else:
        insp = sa.inspect(c)
        tables = set(insp.get_table_names())

        def columns(name):
            return {col["name"] for col in insp.get_columns(name)}

        def version():
            return _read_version(c, where)
    if "autosdpa_meta" not in tables:
        foreign = tables - set(metadata.tables)
        if foreign:
            raise StoreError(f"{where} is not an autosdpa database (it has other tables: "
                             f"{', '.join(sorted(t[:64] for t in foreign)[:5])})")
        if readonly and tables:
            raise StoreError(f"{where} is not an autosdpa database (no autosdpa_meta table)")
        if readonly:
            raise EmptyDatabase(f"{where} has no autosdpa tables yet", where)
        return None
    v = version()
    if v > SCHEMA_VERSION:
        raise StoreError(f"{where} has schema version {v}, newer than this autosdpa "
                         f"understands ({SCHEMA_VERSION}); upgrade autosdpa")
    for name, table in _V1_TABLES.items():
        if name not in tables:
            raise StoreError(f"{where} is not a usable autosdpa database (no {name} table)")
        have = columns(name)
        missing = [col.name for col in table.columns if col.name not in have]
        if missing:
            raise StoreError(f"{where}: table {name} lacks columns {', '.join(missing)}")
    return v


# -- bounded reads -----------------------------------------------------------------------------------------------

def _text(col, dialect: str):
    """``col`` read through ``substr``: never more than its limit (+1, so "too long" shows)."""
    return sa.func.substr(col, 1, TEXT_READ_LIMITS[col.name]).label(col.name)


def _number(col, dialect: str):
    """SQLite stores any value in any column: text or a blob in a number column is read bounded, then refused
    by validation."""
    if dialect != "sqlite":
        return col
    return sa.case((sa.func.typeof(col).in_(("integer", "real", "null")), col),
                   else_=sa.func.substr(col, 1, 40)).label(col.name)


def _bounded(cols, dialect: str) -> list:
    return [_text(c, dialect) if c.name in TEXT_READ_LIMITS else _number(c, dialect) for c in cols]


def _bounded_sql(name: str) -> str:
    """``_bounded`` as SQLite text, for the snapshot read (the names are this module's own constants)."""
    if name in TEXT_READ_LIMITS:
        return f"substr({name}, 1, {TEXT_READ_LIMITS[name]})"
    return f"CASE WHEN typeof({name}) IN ('integer', 'real', 'null') THEN {name} ELSE substr({name}, 1, 40) END"


_SNAPSHOT_COLUMNS = ("problem_key", *MEASUREMENT_FIELDS)
_SNAPSHOT_SQL = (f"SELECT {', '.join(_bounded_sql(c) for c in _SNAPSHOT_COLUMNS)} FROM measurement "
                 "WHERE environment_id = ? LIMIT ?")


# -- plain SQL for SQLite files: what a process's first calls write, with no SQLAlchemy engine or compiled statement
# (building both cost ~15 ms, which a new database paid on its first call). The DDL is what ``metadata`` compiles
# to on SQLite (tests/store/test_store.py compares the two schemas).
_SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS autosdpa_meta (name VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, "
    "PRIMARY KEY (name))",
    "CREATE TABLE IF NOT EXISTS environment (id INTEGER NOT NULL, fingerprint VARCHAR(64) NOT NULL, "
    "device_type VARCHAR(16) NOT NULL, device_name VARCHAR(256) NOT NULL, capability VARCHAR(32) NOT NULL, "
    "cores INTEGER NOT NULL, memory_gb INTEGER NOT NULL, torch VARCHAR(64) NOT NULL, cuda VARCHAR(32) NOT NULL, "
    "cudnn VARCHAR(32) NOT NULL, triton VARCHAR(32) NOT NULL, kernels VARCHAR(32) NOT NULL, "
    "created_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (fingerprint))",
    "CREATE TABLE IF NOT EXISTS measurement (id INTEGER NOT NULL, environment_id INTEGER NOT NULL, "
    "problem_key VARCHAR(512) NOT NULL, backend VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, "
    "median_s FLOAT, spread_s FLOAT, samples INTEGER NOT NULL, max_error FLOAT, detail TEXT NOT NULL, "
    "tuned_shape VARCHAR(512) NOT NULL, measured_at FLOAT NOT NULL, PRIMARY KEY (id), "
    "CONSTRAINT uq_measurement UNIQUE (environment_id, problem_key, backend), "
    "FOREIGN KEY(environment_id) REFERENCES environment (id))",
    "CREATE INDEX IF NOT EXISTS ix_measurement_problem_key ON measurement (problem_key)",
    "CREATE TABLE IF NOT EXISTS decision (environment_id INTEGER NOT NULL, problem_key VARCHAR(512) NOT NULL, "
    "backend VARCHAR(64) NOT NULL, decided_at FLOAT NOT NULL, decided_by VARCHAR(256) NOT NULL, "
    "PRIMARY KEY (environment_id, problem_key), FOREIGN KEY(environment_id) REFERENCES environment (id))",
)
_SQLITE_VERSION_SQL = "SELECT substr(value, 1, 16) FROM autosdpa_meta WHERE name = 'schema_version'"
_SQLITE_ENV_INSERT = (f"INSERT INTO environment (fingerprint, created_at, {', '.join(ENV_FIELDS)}) "
                      f"VALUES ({', '.join('?' * (len(ENV_FIELDS) + 2))}) ON CONFLICT (fingerprint) DO NOTHING")
_SQLITE_UPSERT = (f"INSERT INTO measurement (environment_id, problem_key, {', '.join(MEASUREMENT_FIELDS)}) "
                  f"VALUES ({', '.join('?' * (len(MEASUREMENT_FIELDS) + 2))}) "
                  "ON CONFLICT (environment_id, problem_key, backend) DO UPDATE SET "
                  + ", ".join(f"{f} = excluded.{f}" for f in MEASUREMENT_FIELDS if f != "backend"))


def _sqlite_create(con: sqlite3.Connection, where: str) -> int:
    """Inside a write transaction on a plain connection: the schema version, the tables created if none."""
    version = _inspect(con, where)
    if version is None:
        for stmt in _SQLITE_DDL:
            con.execute(stmt)
        con.execute("INSERT INTO autosdpa_meta (name, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (name) DO NOTHING", (str(SCHEMA_VERSION),))
        version = SCHEMA_VERSION
    return version


def _sqlite_upsert(con: sqlite3.Connection, where: str, fingerprint: str, info: dict | None,
                   rows: Sequence[tuple[str, Measurement]]) -> int:
    """``Store.upsert_many`` inside a write transaction on a plain connection; returns the environment's id."""
    got = con.execute(_SQLITE_VERSION_SQL).fetchall()
    _refuse_newer(_parse_version(got[0][0] if got else None, where), where)
    find = "SELECT id FROM environment WHERE fingerprint = ?"
    found = con.execute(find, (fingerprint,)).fetchall()
    if not found:
        values = [(info or {}).get(f, 0 if f in ENV_INT_FIELDS else "") for f in ENV_FIELDS]
        con.execute(_SQLITE_ENV_INSERT, (fingerprint, time.time(), *values))
        found = con.execute(find, (fingerprint,)).fetchall()
    eid = found[0][0]
    con.executemany(_SQLITE_UPSERT, [(eid, k, *(getattr(m, f) for f in MEASUREMENT_FIELDS)) for k, m in rows])
    return eid


def _data_version_of(con: sqlite3.Connection) -> int:
    """SQLite's counter of commits by *other* connections, as ``con`` sees it (its own commits leave it)."""
    return con.execute("PRAGMA data_version").fetchone()[0]


def _row_to_measurement(r) -> Measurement:
    return Measurement(backend=r["backend"], status=r["status"], median_s=r["median_s"], spread_s=r["spread_s"],
                       samples=r["samples"], max_error=r["max_error"],
                       detail="" if r["detail"] is None else r["detail"],
                       tuned_shape="" if r["tuned_shape"] is None else r["tuned_shape"],
                       measured_at=r["measured_at"])


def _insert(conn, table):
    name = conn.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return sa.insert(table)
    return insert(table)


def _upsert(conn, rows: list[dict]) -> None:
    m = measurement_table
    stmt = _insert(conn, m)
    if hasattr(stmt, "on_conflict_do_update"):
        cols = [c for c in rows[0] if c not in ("environment_id", "problem_key", "backend")]
        stmt = stmt.on_conflict_do_update(index_elements=["environment_id", "problem_key", "backend"],
                                          set_={c: stmt.excluded[c] for c in cols})
        conn.execute(stmt, rows)
        return
    for row in rows:  # other databases: delete + insert in the same transaction
        conn.execute(sa.delete(m).where(m.c.environment_id == row["environment_id"],
                                        m.c.problem_key == row["problem_key"], m.c.backend == row["backend"]))
        conn.execute(sa.insert(m), row)


def _environment_id_in(c, fingerprint: str, info: dict | None) -> int:
    """The id of ``fingerprint``'s environment, created from ``info`` if missing, inside transaction ``c``."""
    t = environment_table
    eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
    if eid is None:
        row = {f: (info or {}).get(f, 0 if f in ENV_INT_FIELDS else "") for f in ENV_FIELDS}
        stmt = _insert(c, t).values(fingerprint=fingerprint, created_at=time.time(), **row)
        if hasattr(stmt, "on_conflict_do_nothing"):
            stmt = stmt.on_conflict_do_nothing(index_elements=["fingerprint"])
        c.execute(stmt)
        eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
    return eid


def seal_file(path: str | os.PathLike) -> None:
    """Leave the SQLite file ``path`` self-contained for sharing: rollback journal (no -wal/-shm), compacted."""
    try:
        con = sqlite3.connect(f"file:{quote(str(Path(path).absolute()))}?mode=rw", uri=True)
        try:
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("VACUUM")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise StoreError(f"cannot finish {path}: {e}") from None


# -- the store ---------------------------------------------------------------------------------------------------

def _fit_detail(m: Measurement) -> Measurement:
    """``m`` with a detail a reader accepts (``validation.MAX_DETAIL_LEN``): a longer one ends saying how much
    was left out (autosdpa's own are a few hundred characters)."""
    if len(m.detail or "") <= MAX_DETAIL_LEN:
        return m
    cut = MAX_DETAIL_LEN - 32
    return dataclasses.replace(m, detail=f"{m.detail[:cut]} ... (+{len(m.detail) - cut} characters)")


class Store:
    """One database (plus read-only layers). All methods raise ``StoreError`` on database trouble.

    ``target``: a file path, ``":memory:"`` or a URL (None: the default cache file). ``timeout_s``: how long
    to wait for a locked database (busy timeout and write retries) before raising StoreError."""

    def __init__(self, target: str | os.PathLike | None = None, *, readonly: bool = False,
                 shared: Sequence[str | os.PathLike] = (), wal: bool = True, timeout_s: float = DEFAULT_DB_TIMEOUT_S):
        self.kind, where = parse_target(target)
        self.path: Path | None = where if self.kind == "file" else None
        self.url = db_url(target) if self.kind != "memory" else "sqlite://"
        self.readonly = readonly
        self.timeout_s = timeout_s
        self.version = SCHEMA_VERSION
        self._engine: sa.Engine | None = None
        self._wal = wal
        self._engine_lock = threading.Lock()
        self.shared: list[Store] = []
        #: (the database, why) when this in-memory store stands in for one that failed (the dispatcher's
        #: fallback) or does not exist yet: what it holds is lost at exit (``autosdpa tune`` then fails)
        self.stands_in_for: tuple[str, str] | None = None
        self._env_ids: dict[str, int] = {}
        self._snapshots: dict[str, tuple[int, dict[str, dict[str, Measurement]] | None]] = {}
        self._near_held: dict[tuple, tuple[int, dict[int, dict]]] = {}  # warm start's environments, per commit
        self._near_off: str | None = None  # why warm start no longer reads this database
        self._watch = None  # a DBAPI connection kept for PRAGMA data_version (file databases)
        self._watch_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None  # a plain connection kept for writing a file
        self._writer_lock = threading.Lock()
        self._save_lock = threading.Lock()
        try:
            self._open()
        except OSError as e:  # the file vanished or changed under us between the checks
            raise StoreError(f"cannot open {self.display_url}: {e.strerror or e}") from e
        for p in shared:
            try:
                self.shared.append(Store(p, readonly=True, timeout_s=timeout_s))
            except StoreError as e:
                warnings.warn(f"autosdpa: skipping shared tuning database: {e}", RuntimeWarning, stacklevel=2)

    def _open(self) -> None:
        """Inspect first (read-only), then open for writing: nothing is written to a file that is refused.
        An existing, up-to-date file is inspected through a plain sqlite3 connection, and its engine is built
        only when something needs it (a write, an administrative read): a process that only looks rows up
        never pays for SQLAlchemy's engine and SQLite dialect."""
        version = None
        with self._db_errors("cannot open "):
            if self.kind == "memory":
                self._engine = _memory_engine()
            elif self.kind == "url":
                try:
                    self._engine = sa.create_engine(self.url, pool_pre_ping=True)
                except (ImportError, ValueError, sa.exc.ArgumentError) as e:  # missing driver, bad URL
                    raise StoreError(f"cannot open {self.display_url}: {type(e).__name__}: {e}") from e
            else:
                existing = _check_file(self.path, readonly=self.readonly)
                if existing:
                    version = self._probe()
                if existing and (self.readonly or version == SCHEMA_VERSION):
                    self.version = version
                    return
            try:
                self.version = self._check_schema(known=version)
            except BaseException:
                self._dispose()
                raise

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine, built on first use for a file."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    with self._db_errors("cannot open "):
                        self._engine = _file_engine(self.path, readonly=self.readonly, wal=self._wal,
                                                    timeout_s=self.timeout_s)
        return self._engine

    @property
    def _write(self):
        return self.engine.execution_options(autosdpa_write=True)

    def _probe(self) -> int | None:
        """The schema version of an existing file, read through a plain read-only connection (None: no
        tables)."""
        def once():
            con = _reader(self.path, readonly=True, timeout_s=self.timeout_s)
            try:
                return _inspect(con, self.display_url, readonly=self.readonly)
            finally:
                con.close()
        return retrying(once, deadline_s=self.timeout_s)

    def _dispose(self) -> None:
        with self._watch_lock:
            if self._watch is not None:
                with contextlib.suppress(Exception):
                    self._watch.close()
                self._watch = None
        with self._writer_lock:
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer.close()
                self._writer = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _inspect_with(self, engine: sa.Engine) -> int | None:
        def once():
            with engine.connect() as c:
                return _inspect(c, self.display_url, readonly=self.readonly)
        return retrying(once, deadline_s=self.timeout_s)

    @property
    def display_url(self) -> str:
        if self.kind == "file":
            return str(self.path)
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.kind == "file" else self.engine.dialect.name

    def same_database(self, other: "Store | str | os.PathLike") -> bool:
        """Whether ``other`` (a Store or a target) is this very database (a file: through links and ``..``)."""
        kind, where = (other.kind, other.path or other.url) if isinstance(other, Store) else parse_target(other)
        if kind != self.kind or kind == "memory":
            return False
        if kind == "url":
            return where == self.url
        try:
            return os.path.samefile(where, self.path)
        except OSError:
            return False

    @contextlib.contextmanager
    def _db_errors(self, prefix: str = ""):
        """Every database error (SQLAlchemy's, or the driver's) becomes one StoreError naming the database."""
        try:
            yield
        except (sa.exc.SQLAlchemyError, sqlite3.Error) as e:
            raise StoreError(f"{prefix}{self.display_url}: {_describe(e)}{_hint(e, self.timeout_s)}") from e

    # -- schema -----------------------------------------------------------------------------------------
    def _check_schema(self, known: int | None) -> int:
        if self.readonly:
            return self._inspect_with(self.engine)
        if known == SCHEMA_VERSION:  # inspected by the probe: nothing to create or migrate
            return known
        if self.kind == "file":  # a new file: created through the plain connection; an older one migrates below
            version = self._sqlite_write(lambda con: _sqlite_create(con, self.display_url))
            if version == SCHEMA_VERSION:
                return version
        if self.kind != "file":
            try:  # the common case, an up-to-date database: a plain read, no write lock taken
                with self.engine.connect() as c:
                    if _inspect(c, self.display_url) == SCHEMA_VERSION:
                        return SCHEMA_VERSION
            except StoreError:
                pass  # half-created by a concurrent process, or needs a migration: decide under the lock
        # retried: a concurrent process creating the file (or switching it to WAL) holds the lock briefly
        return retrying(self._setup_schema, deadline_s=self.timeout_s)

    def _setup_schema(self) -> int:
        with self._write.begin() as c:
            if self.dialect == "postgresql":  # one process at a time creates / migrates
                c.execute(sa.text("SELECT pg_advisory_xact_lock(7305860421)"))
            version = _inspect(c, self.display_url)
            if version is None:
                _create(c, [meta_table, environment_table, measurement_table, measurement_key_index,
                            decision_table])
                stmt = _insert(c, meta_table).values(name="schema_version", value=str(SCHEMA_VERSION))
                c.execute(stmt.on_conflict_do_nothing() if hasattr(stmt, "on_conflict_do_nothing") else stmt)
                version = _inspect(c, self.display_url)
            if version < SCHEMA_VERSION:
                version = migrate(c, version)
            return version

    def schema_version(self) -> int:
        with self._db_errors(), self.engine.connect() as c:
            return _read_version(c, self.display_url)

    # -- environments -----------------------------------------------------------------------------------
    def environment_id(self, fingerprint: str, info: dict | None = None, *, create: bool = True) -> int | None:
        if fingerprint in self._env_ids:
            return self._env_ids[fingerprint]
        t = environment_table
        with self._db_errors():
            with self.engine.connect() as c:
                eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
            if eid is None and create and not self.readonly:
                def insert():
                    with self._write.begin() as c:
                        return _environment_id_in(c, fingerprint, info)
                eid = retrying(insert, deadline_s=self.timeout_s)
        if eid is not None:
            self._env_ids[fingerprint] = eid
        return eid

    def environment(self, fingerprint: str) -> dict | None:
        """The environment row of ``fingerprint`` ({"fingerprint", "created_at", **ENV_FIELDS}), or None."""
        t = environment_table
        q = sa.select(*_bounded([t.c.fingerprint, *[t.c[f] for f in ENV_FIELDS]], self.dialect),
                      t.c.created_at).where(t.c.fingerprint == fingerprint).limit(1)
        with self._db_errors(), self.engine.connect() as c:
            row = c.execute(q).mappings().first()
        return dict(row) if row is not None else None

    def iter_environments(self) -> Iterator[dict]:
        """Every environment row, streamed: {"fingerprint", "created_at", **ENV_FIELDS} (bounded, not validated)."""
        t = environment_table
        q = sa.select(*_bounded([t.c.fingerprint, *[t.c[f] for f in ENV_FIELDS]], self.dialect),
                      _number(t.c.created_at, self.dialect)).order_by(t.c.id)
        with self._db_errors(), self.engine.connect() as c:
            for r in c.execution_options(yield_per=500).execute(q).mappings():
                yield dict(r)

    def environments(self) -> list[dict]:
        """``list(iter_environments())``: for the user's own database (few environments)."""
        return list(self.iter_environments())

    # -- measurements -----------------------------------------------------------------------------------
    def lookup(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        """All valid measurements of ``key`` in this environment: shared layers first, the user's rows on top."""
        out: dict[str, Measurement] = {}
        for layer in self.shared:
            try:
                out.update(layer.lookup_own(fingerprint, key))
            except StoreError:
                continue
        out.update(self.lookup_own(fingerprint, key))
        return out

    def lookup_own(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        """This database's valid rows for ``key`` in this environment (not the shared layers)."""
        snapshot = self._snapshot(fingerprint)
        if snapshot is not None:
            rows = snapshot.get(key, {})
            return {b: m for b, m in rows.items() if measurement_error(m) is None}
        eid = self.environment_id(fingerprint, create=False)
        if eid is None:
            return {}
        m = measurement_table
        q = (sa.select(*_bounded([m.c[f] for f in MEASUREMENT_FIELDS], self.dialect))
             .where(m.c.environment_id == eid, m.c.problem_key == key).limit(MAX_BACKENDS_PER_KEY))
        out = {}
        with self._db_errors(), self.engine.connect() as c:
            for r in c.execute(q).mappings():
                meas = _row_to_measurement(r)
                if measurement_error(meas) is None:  # bad data from elsewhere is ignored, never trusted
                    out[meas.backend] = meas
        return out

    def _watched(self, sql: str, params: tuple = (), *, budget: int | None = None) -> list[tuple]:
        """``sql`` on the connection kept for snapshots (file databases): plain SQLite, no statement compiled by
        SQLAlchemy, since a process's first decision would pay for compiling every statement. ``budget``: the
        most SQLite VM steps it may take, else it is stopped (OverBudget)."""
        with self._watch_lock, self._db_errors():
            if self._watch is None:
                self._watch = _reader(self.path, readonly=self.readonly, timeout_s=self.timeout_s)
            ticks = [0]
            if budget is not None:
                def tick():
                    ticks[0] += 1
                    return ticks[0] * _BUDGET_TICK > budget  # non-zero: SQLite stops the statement
                self._watch.set_progress_handler(tick, _BUDGET_TICK)
            cur = self._watch.cursor()
            try:
                return cur.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                if budget is not None and ticks[0] * _BUDGET_TICK > budget:
                    raise OverBudget(f"{self.display_url}: a read took more than {budget:,} SQLite steps") from None
                raise
            finally:
                cur.close()
                if budget is not None:
                    self._watch.set_progress_handler(None, 0)

    def _sqlite_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in one ``BEGIN IMMEDIATE`` transaction on the plain connection kept for writing a
        file, retried on lock contention like every write."""
        def once():
            with self._writer_lock:
                if self._writer is None:
                    con = sqlite3.connect(_file_uri(self.path, readonly=False), uri=True, timeout=self.timeout_s,
                                          check_same_thread=False)
                    _sqlite_pragmas(con, readonly=False, wal=self._wal, timeout_s=self.timeout_s)
                    self._writer = con
                con = self._writer
                con.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(con)
                    con.execute("COMMIT")
                    return out
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                    raise
        with self._db_errors():
            return retrying(once, deadline_s=self.timeout_s)

    def _data_version(self) -> int | None:
        """SQLite's counter of commits made by other connections (None: not a file database)."""
        return self._watched("PRAGMA data_version")[0][0] if self.kind == "file" else None

    def _snapshot(self, fingerprint: str) -> dict[str, dict[str, Measurement]] | None:
        """{key: {backend: row}} of the environment, unvalidated (validated per lookup), read again after any
        commit; None where keys are read one at a time (not a file, or more than SNAPSHOT_MAX_ROWS rows)."""
        version = self._data_version()
        if version is None:
            return None
        held = self._snapshots.get(fingerprint)
        if held is not None and (held[0] == version or held[1] is None):  # too many rows stays too many
            return held[1]
        self._env_ids.pop(fingerprint, None)  # a commit may have pruned it (SQLite reuses ids)
        ids = self._watched("SELECT id FROM environment WHERE fingerprint = ?", (fingerprint,))
        rows: dict[str, dict[str, Measurement]] | None = {}
        if ids:
            found = self._watched(_SNAPSHOT_SQL, (ids[0][0], SNAPSHOT_MAX_ROWS + 1))
            if len(found) > SNAPSHOT_MAX_ROWS:
                rows = None
            else:
                for values in found:
                    r = dict(zip(_SNAPSHOT_COLUMNS, values))
                    per_key = rows.setdefault(r["problem_key"], {})
                    if len(per_key) < MAX_BACKENDS_PER_KEY:
                        per_key[r["backend"]] = _row_to_measurement(r)
        self._snapshots[fingerprint] = (version, rows)
        return rows

    def near_rows(self, exclude: Iterable[str], info: dict, key: str) -> dict[str, tuple[Measurement, dict]]:
        """Valid rows for ``key`` measured on the same hardware as ``info`` (device type, name, capability,
        cores, memory) in *other* environments (another torch, CUDA or Triton; fingerprints not in ``exclude``):
        {backend: (newest row, its environment)}. They cannot decide here; they can rank (``autosdpa.warm``).

        Bounded whatever the database holds (a shared file may hold thousands of such environments and no
        index): the NEAR_ENVIRONMENTS newest environments (read once per commit), then one statement for the
        key's rows in all of them, each read of a file under WARM_READ_BUDGET; a file that needs more is left
        out of warm start from then on, with one warning."""
        if self._near_off is not None:
            return {}
        try:
            envs = self._near_environments(frozenset(exclude), info)
            found = self._near_measurements(list(envs), key) if envs else []
        except OverBudget as e:
            self._near_off = str(e)
            warnings.warn(f"autosdpa: warm start no longer reads {self.display_url} ({e}); candidates are "
                          "timed without its rows", RuntimeWarning, stacklevel=2)
            return {}
        out: dict[str, tuple[Measurement, dict]] = {}
        for eid, m in found:
            held = out.get(m.backend)
            if eid in envs and measurement_error(m) is None and (held is None or m.measured_at > held[0].measured_at):
                out[m.backend] = (m, envs[eid])
        return out

    def _near_environments(self, exclude: frozenset[str], info: dict) -> dict[int, dict]:
        """{id: fields} of the NEAR_ENVIRONMENTS newest valid environments of ``info``'s hardware, but not
        ``exclude``; for a file, read again only after a commit."""
        hardware = tuple(info.get(f) for f in NEAR_FIELDS)
        version = self._data_version()
        held = self._near_held.get((hardware, exclude))
        if held is not None and held[0] == version:
            return held[1]
        cols = ("id", "fingerprint", *ENV_FIELDS)
        if version is None:
            e = environment_table
            q = (sa.select(*_bounded([e.c[c] for c in cols], self.dialect))
                 .where(*(e.c[f] == v for f, v in zip(NEAR_FIELDS, hardware)), e.c.fingerprint.notin_(sorted(exclude)))
                 .order_by(e.c.created_at.desc(), e.c.id.desc()).limit(NEAR_ENVIRONMENTS))
            with self._db_errors(), self.engine.connect() as c:
                found = [tuple(r) for r in c.execute(q)]
        else:
            where = [f"{f} = ?" for f in NEAR_FIELDS] + ["fingerprint != ?"] * len(exclude)
            found = self._watched(
                f"SELECT {', '.join(_bounded_sql(c) for c in cols)} FROM environment WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*hardware, *sorted(exclude), NEAR_ENVIRONMENTS), budget=WARM_READ_BUDGET)
        envs = {}
        for r in found:
            env = dict(zip(cols[1:], r[1:]))
            if isinstance(r[0], int) and environment_error(env) is None:  # data from elsewhere: checked
                envs[r[0]] = env
        if version is not None:
            self._near_held[(hardware, exclude)] = (version, envs)
        return envs

    def _near_measurements(self, ids: list[int], key: str) -> list[tuple[int, Measurement]]:
        """(environment id, row) of ``key`` in the environments ``ids``: one statement, bounded, not validated."""
        limit = len(ids) * MAX_BACKENDS_PER_KEY
        if self.kind != "file":
            m = measurement_table
            q = (sa.select(m.c.environment_id, *_bounded([m.c[f] for f in MEASUREMENT_FIELDS], self.dialect))
                 .where(m.c.problem_key == key, m.c.environment_id.in_(ids)).limit(limit))
            with self._db_errors(), self.engine.connect() as c:
                found = [tuple(r) for r in c.execute(q)]
        else:
            found = self._watched(
                f"SELECT environment_id, {', '.join(_bounded_sql(c) for c in MEASUREMENT_FIELDS)} FROM measurement "
                f"WHERE problem_key = ? AND environment_id IN ({', '.join('?' * len(ids))}) LIMIT ?",
                (key, *ids, limit), budget=WARM_READ_BUDGET)
        return [(r[0], _row_to_measurement(dict(zip(MEASUREMENT_FIELDS, r[1:])))) for r in found]

    def save(self, fingerprint: str, info: dict, key: str, measurements: Iterable[Measurement]) -> None:
        """Upsert one row per backend (a re-measurement replaces the older row of the same environment).

        Safe with many processes writing at once: retried with backoff on lock contention / deadlocks."""
        self.upsert_many(fingerprint, info, [(key, m) for m in measurements])

    def upsert_many(self, fingerprint: str, info: dict | None, rows: Sequence[tuple[str, Measurement]],
                    *, chunk: int = 500) -> None:
        """Write ``(problem key, measurement)`` rows of one environment in one transaction, replacing rows of
        the same (key, backend). The environment is created from ``info`` if missing."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        # one lock order for every writer; a detail past what a reader accepts would make the row vanish on read
        rows = sorted(((k, _fit_detail(m)) for k, m in rows), key=lambda r: (r[0], r[1].backend))
        if not rows:
            return

        if self.kind == "file":
            with self._save_lock:  # one own write at a time: each sees only its own commit as "ours"
                before = self._data_version()

                def write(con):
                    # Under the write lock nobody else can commit: was there a commit since ``before`` (while
                    # we waited for the lock)? And the writer's own counter, which our commit leaves alone.
                    quiet = self._data_version() == before
                    eid = _sqlite_upsert(con, self.display_url, fingerprint, info, rows)
                    return eid, quiet, _data_version_of(con)
                self._env_ids[fingerprint], quiet, mine = self._sqlite_write(write)
                self._after_own_write(before, quiet, mine, fingerprint, rows)
            return

        def write():
            with self._write.begin() as c:
                _writable_version(c, self.display_url)
                # Resolved inside the write transaction, never from a cache: a pruned environment's id can be
                # reused by SQLite for another environment.
                eid = _environment_id_in(c, fingerprint, info)
                dicts = [dict(environment_id=eid, problem_key=k, **dataclasses.asdict(m)) for k, m in rows]
                for i in range(0, len(dicts), chunk):
                    _upsert(c, dicts[i:i + chunk])
                return eid
        with self._db_errors():  # a server or memory database: no snapshots to keep current
            self._env_ids[fingerprint] = retrying(write, deadline_s=self.timeout_s)

    def _after_own_write(self, before: int | None, quiet: bool, mine: int, fingerprint: str, rows) -> None:
        """Keep the snapshots that were current before this write (add the rows written to their environment's)
        only when this write was the one commit in between: ``quiet`` says none came while it waited for the
        lock, and the writer's counter (``mine`` at our commit) says none came after it before ``after`` was
        read. Otherwise they stay at their old version and are read again (a row another process deleted, e.g.
        by ``db prune``, is never served from a snapshot)."""
        if not quiet:
            return
        after = self._data_version()
        if self._writer_version() != mine:  # read after ``after``: a commit before it shows here
            return
        for fp, (version, held) in list(self._snapshots.items()):
            if version != before or held is None:
                continue
            if fp == fingerprint:
                for key, m in rows:
                    held.setdefault(key, {})[m.backend] = m
            self._snapshots[fp] = (after, held)

    def _writer_version(self) -> int | None:
        """``PRAGMA data_version`` of the writing connection: it moves only when *another* connection commits."""
        with self._writer_lock, self._db_errors():
            return None if self._writer is None else _data_version_of(self._writer)

    def evidence(self, fingerprint: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, float]]:
        """``{(problem key, backend): (samples, measured_at)}`` of the rows of ``pairs`` this database holds in
        the environment ``fingerprint`` (for the conflict rule of imports and merges)."""
        t, m = environment_table, measurement_table
        out: dict[tuple[str, str], tuple[int, float]] = {}
        keys = sorted({k for k, _ in pairs})
        wanted = set(pairs)
        with self._db_errors(), self.engine.connect() as c:
            for i in range(0, len(keys), 200):
                q = (sa.select(m.c.problem_key, m.c.backend, m.c.samples, m.c.measured_at)
                     .join(t, t.c.id == m.c.environment_id)
                     .where(t.c.fingerprint == fingerprint, m.c.problem_key.in_(keys[i:i + 200])))
                for r in c.execute(q):
                    if (r.problem_key, r.backend) in wanted:
                        out[(r.problem_key, r.backend)] = (r.samples or 0, r.measured_at or 0.0)
        return out

    def iter_rows(self, *, fingerprint: str | None = None, since: float | None = None
                  ) -> Iterator[tuple[dict, str, Measurement]]:
        """Every (environment fields, problem key, measurement) of this database (not the shared layers), streamed
        in (environment, key, backend) order, every text read bounded; not validated. Rows of one environment
        share one (read-only) environment dict."""
        e, m = environment_table, measurement_table
        cols = _bounded([e.c.fingerprint, *[e.c[f] for f in ENV_FIELDS], m.c.problem_key,
                         *[m.c[f] for f in MEASUREMENT_FIELDS]], self.dialect)
        q = (sa.select(*cols).join(e, e.c.id == m.c.environment_id)
             .order_by(m.c.environment_id, m.c.problem_key, m.c.backend))
        if fingerprint:
            q = q.where(e.c.fingerprint == fingerprint)
        if since is not None:
            q = q.where(m.c.measured_at >= since)
        n_env = 1 + len(ENV_FIELDS)
        head, env = None, {}
        with self._db_errors(), self.engine.connect() as c:
            for r in c.execution_options(yield_per=1000).execute(q):
                if r[:n_env] != head:  # rows come grouped by environment: one dict per environment
                    head = r[:n_env]
                    env = dict(zip(("fingerprint", *ENV_FIELDS), head))
                m = Measurement(*r[n_env + 1:])  # MEASUREMENT_FIELDS, in the dataclass's order
                if m.detail is None:
                    m.detail = ""
                if m.tuned_shape is None:
                    m.tuned_shape = ""
                yield env, r[n_env], m

    def rows(self, *, fingerprint: str | None = None) -> list[tuple[dict, str, Measurement]]:
        """``list(iter_rows())``: for small databases and tests."""
        return list(self.iter_rows(fingerprint=fingerprint))

    def counts(self) -> dict[str, int]:
        with self._db_errors(), self.engine.connect() as c:
            out = {"environments": c.execute(sa.select(sa.func.count()).select_from(environment_table)).scalar(),
                   "measurements": c.execute(sa.select(sa.func.count()).select_from(measurement_table)).scalar()}
            if self.version >= 2:
                out["decisions"] = c.execute(sa.select(sa.func.count()).select_from(decision_table)).scalar()
            return out

    def prune(self, *, scope: Iterable[str] | None = None, stale: Iterable[str] = (), failed: bool = False,
              older_than: float | None = None, decisions: bool = False, dry_run: bool = False) -> PruneResult:
        """Delete the rows of the ``stale`` environments; in the ``scope`` environments (fingerprints; None: all)
        rows that are not ok (``failed``) or measured before ``older_than``, and rank ``decisions``; then every
        environment of the scope left without rows. ``dry_run`` does the same work and rolls it back."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        e, m, d = environment_table, measurement_table, decision_table
        stale, scope_fps = set(stale), (None if scope is None else set(scope))
        row_cond = ([m.c.status != "ok"] if failed else []) + ([m.c.measured_at < older_than]
                                                                if older_than is not None else [])

        def work():
            with self._write.connect() as c:
                trans = c.begin()
                _writable_version(c, self.display_url)
                ids = {fp: i for i, fp in c.execute(sa.select(e.c.id, e.c.fingerprint))}
                scope_ids = list(ids.values()) if scope_fps is None else [ids[f] for f in scope_fps if f in ids]
                res = PruneResult()
                stale_ids = {ids[f]: f for f in stale if f in ids}
                if stale_ids:
                    for eid, n in c.execute(sa.select(m.c.environment_id, sa.func.count()).where(
                            m.c.environment_id.in_(stale_ids)).group_by(m.c.environment_id)):
                        res.removed_by_environment[stale_ids[eid]] = n
                    res.removed += c.execute(sa.delete(m).where(m.c.environment_id.in_(stale_ids))).rowcount
                if row_cond and scope_ids:
                    res.removed += c.execute(sa.delete(m).where(m.c.environment_id.in_(scope_ids),
                                                                sa.or_(*row_cond))).rowcount
                if decisions and scope_ids:
                    c.execute(sa.delete(d).where(d.c.environment_id.in_(scope_ids)))
                empty = set(scope_ids) | set(stale_ids)
                has_rows = sa.exists().where(m.c.environment_id == e.c.id)
                gone = set(c.execute(sa.select(e.c.id).where(e.c.id.in_(empty or [-1]), ~has_rows)).scalars())
                if gone:
                    c.execute(sa.delete(d).where(d.c.environment_id.in_(gone)))
                    c.execute(sa.delete(e).where(e.c.id.in_(gone)))
                res.environments_removed = sorted(fp for fp, i in ids.items() if i in gone)
                res.kept = c.execute(sa.select(sa.func.count()).select_from(m)).scalar()
                trans.rollback() if dry_run else trans.commit()  # dry run: the same work, so exact counts
                return res
        with self._db_errors():
            res = retrying(work, deadline_s=self.timeout_s)
        self._env_ids.clear()
        return res

    # -- decisions (rank-consistent choices; see autosdpa.consensus) ------------------------------------
    def decide(self, fingerprint: str, info: dict | None, key: str, backend: str, decided_by: str = "") -> str:
        """Record ``backend`` for (environment, key) unless a decision exists (first writer wins); returns the
        decision in force."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        d = decision_table

        def write():
            with self._write.begin() as c:
                _writable_version(c, self.display_url)
                eid = _environment_id_in(c, fingerprint, info)  # not cached: ids can be reused after a prune
                stmt = _insert(c, d).values(environment_id=eid, problem_key=key, backend=backend,
                                            decided_at=time.time(), decided_by=decided_by[:256])
                if hasattr(stmt, "on_conflict_do_nothing"):
                    c.execute(stmt.on_conflict_do_nothing(index_elements=["environment_id", "problem_key"]))
                elif c.execute(sa.select(d.c.backend).where(d.c.environment_id == eid,
                                                            d.c.problem_key == key)).scalar() is None:
                    c.execute(stmt)
                return c.execute(sa.select(sa.func.substr(d.c.backend, 1, TEXT_READ_LIMITS["backend"])).where(
                    d.c.environment_id == eid, d.c.problem_key == key)).scalar()
        with self._db_errors():
            return retrying(write, deadline_s=self.timeout_s)

    def decisions(self) -> list[dict]:
        """Every decision: {"fingerprint", "problem_key", "backend", "decided_at", "decided_by"} (bounded)."""
        e, d = environment_table, decision_table
        q = sa.select(*_bounded([e.c.fingerprint, d.c.problem_key, d.c.backend], self.dialect), d.c.decided_at,
                      sa.func.substr(d.c.decided_by, 1, 256).label("decided_by")).join(
            e, e.c.id == d.c.environment_id).order_by(e.c.fingerprint, d.c.problem_key)
        with self._db_errors(), self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def set_decisions(self, decisions: Iterable[dict]) -> int:
        """Overwrite decisions with ``decisions`` (dicts as from ``decisions()``); environments must exist
        here or are created from ``info`` when given. Returns how many were written."""
        items = []
        for dec in decisions:
            eid = self.environment_id(dec["fingerprint"], dec.get("info"), create=bool(dec.get("info")))
            if eid is not None:
                items.append(dict(environment_id=eid, problem_key=dec["problem_key"], backend=dec["backend"],
                                  decided_at=float(dec.get("decided_at") or time.time()),
                                  decided_by=str(dec.get("decided_by", ""))[:256]))
        if not items:
            return 0
        d = decision_table

        def write():
            with self._write.begin() as c:
                _writable_version(c, self.display_url)
                for it in sorted(items, key=lambda i: (i["environment_id"], i["problem_key"])):
                    c.execute(sa.delete(d).where(d.c.environment_id == it["environment_id"],
                                                 d.c.problem_key == it["problem_key"]))
                    c.execute(sa.insert(d), it)
        with self._db_errors():
            retrying(write, deadline_s=self.timeout_s)
        return len(items)

    def close(self) -> None:
        self._dispose()
        for s in self.shared:
            s.close()
