"""Persistent measurements: SQLAlchemy 2.x Core, SQLite by default, any SQLAlchemy URL (PostgreSQL) for fleets.

Every backend's measurement is kept (not only the winner), one row per (environment, problem key, backend).
Read-only shared databases (shipped ``tuning_db/*.sqlite`` and ``AUTOSDPA_SHARED_DBS``) are layered under the
user's database: the user's own rows win.

Schema versions (``autosdpa_meta.schema_version``), upgraded forward by ``MIGRATIONS``:

1. ``autosdpa_meta``, ``environment``, ``measurement`` (unique on environment + problem key + backend).
2. + index ``ix_measurement_problem_key`` on ``measurement(problem_key)`` (lookups and ``db`` commands filter
   by key across environments), + table ``decision`` (rank-consistent choices under torch.distributed).

A writable database of an older version is upgraded in place when opened; a read-only one (a shipped or
downloaded file) is read as it is when its tables are compatible, never written. A newer version is refused.

Concurrency: SQLite files run in WAL mode with a busy timeout; write transactions start with
``BEGIN IMMEDIATE`` (so a reader never has to upgrade to a writer mid-transaction, which SQLite answers with an
immediate "database is locked"), and every write is retried with backoff on transient lock / deadlock errors.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
from urllib.parse import quote
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

SCHEMA_VERSION = 2
STATUSES = ("ok", "rejected", "skipped")

# Limits for data that may come from elsewhere (see docs/sharing.md, "Validation").
MAX_KEY_LEN = 512
MAX_DETAIL_LEN = 2000
MAX_SHAPE_LEN = 512
MAX_SAMPLES = 10**7
MAX_SECONDS = 1e6
#: Well-formed backend names; names of backends this install does not know must also match it to be kept
#: (``autosdpa db import --allow-unknown-backends``), so a file from a newer autosdpa keeps its evidence.
BACKEND_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_PRINTABLE_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")

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
ENV_FIELDS = ("device_type", "device_name", "capability", "cores", "memory_gb", "torch", "cuda", "cudnn",
              "triton", "kernels")
MEASUREMENT_FIELDS = ("backend", "status", "median_s", "spread_s", "samples", "max_error", "detail",
                      "tuned_shape", "measured_at")
_V1_TABLES = {"autosdpa_meta": meta_table, "environment": environment_table, "measurement": measurement_table}


class StoreError(RuntimeError):
    """The database cannot be used (unreadable, corrupt, newer schema, ...)."""


@dataclasses.dataclass
class Measurement:
    backend: str
    status: str  # ok | rejected | skipped
    median_s: float | None = None
    spread_s: float | None = None
    samples: int = 0
    max_error: float | None = None
    detail: str = ""
    tuned_shape: str = ""
    measured_at: float = dataclasses.field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_s is not None and self.median_s > 0

    def validate(self) -> None:
        """Raise ValueError unless this row is sane data (rows may come from files made elsewhere)."""
        if not isinstance(self.backend, str) or not BACKEND_NAME_RE.match(self.backend):
            raise ValueError(f"malformed backend name {str(self.backend)[:80]!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {str(self.status)[:40]!r}")
        for f in ("median_s", "spread_s", "max_error"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v < 0 or v > MAX_SECONDS):
                raise ValueError(f"{f}={str(v)[:40]!r} is not a finite non-negative number")
        if self.status == "ok" and not (self.median_s and self.median_s > 0):
            raise ValueError("an ok measurement needs a positive median")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or not 0 <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"samples={str(self.samples)[:40]!r} is not an integer in 0..{MAX_SAMPLES}")
        t = self.measured_at
        if (not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0
                or t > time.time() + 86400):
            raise ValueError(f"measured_at={str(t)[:40]!r} is not a plausible time")
        for f, limit in (("detail", MAX_DETAIL_LEN), ("tuned_shape", MAX_SHAPE_LEN)):
            v = getattr(self, f)
            if not isinstance(v, str) or len(v) > limit or not _PRINTABLE_RE.match(v):
                raise ValueError(f"{f} is not a printable string of at most {limit} characters")


def fingerprint_of(fields: dict) -> str:
    """The fingerprint ``autosdpa.environment`` computes for these environment fields."""
    info = {f: fields[f] for f in ENV_FIELDS}
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def environment_problem(env: dict) -> str | None:
    """Why this environment row (fingerprint + ENV_FIELDS) is not sane data, or None."""
    fp = env.get("fingerprint")
    if not isinstance(fp, str) or not FINGERPRINT_RE.match(fp):
        return "malformed fingerprint"
    for f in ENV_FIELDS:
        v = env.get(f)
        if f in ("cores", "memory_gb"):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 10**7:
                return f"environment field {f} is not a sane integer"
        elif not isinstance(v, str) or len(v) > 256 or not _PRINTABLE_RE.match(v):
            return f"environment field {f} is not a printable string of at most 256 characters"
    if fingerprint_of(env) != fp:
        return "fingerprint does not match the environment's fields"
    return None


def key_problem(key) -> str | None:
    """Why this problem key is not acceptable data, or None (it must parse and be canonical)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN:
        return "problem key is not a string of at most 512 characters"
    from .problem import Problem

    try:
        if Problem.parse(key).key != key:
            return "problem key is not canonical"
    except (ValueError, TypeError, KeyError, IndexError):
        return "problem key does not parse"
    return None


def known_backends() -> set[str]:
    from .backends import all_backends

    return {b.name for b in all_backends()}


def default_db_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("autosdpa")) / "autosdpa.sqlite"


def db_url(target: str | os.PathLike | None = None) -> str:
    """A path or SQLAlchemy URL -> URL; None means ``AUTOSDPA_DB`` or the default cache file."""
    if target is None:
        from .config import Settings

        target = Settings.from_env().db or default_db_path()
    target = str(target)
    if "://" in target:
        return target
    return "sqlite:///" + str(Path(target).expanduser().absolute())


def is_sqlite_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _sqlite_wal_header(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return len(head) >= 20 and head[18] == 2 and head[19] == 2


def _sqlite_pragmas(dbapi_conn, _record, *, readonly: bool, wal: bool = True):
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(lock_timeout_s() * 1000)}")
    if readonly:
        cur.execute("PRAGMA query_only = 1")
        cur.execute("PRAGMA trusted_schema = 0")  # a hostile file's views/triggers may not call functions
    elif wal:
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable against process crashes (kill -9)
    cur.close()


def _on_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("autosdpa_write") else "BEGIN")


def make_engine(url: str, *, readonly: bool = False, wal: bool = True) -> sa.Engine:
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if readonly:
            if not db or not Path(db).is_file():
                raise StoreError(f"no such database file: {db}")
            if not is_sqlite_file(db):
                raise StoreError(f"{db} is not an SQLite database file")
            p = Path(db).absolute()
            # mode=ro: never create, never write. A WAL-mode file without its -wal/-shm is opened immutable so
            # that SQLite does not create those files next to a shipped file either.
            immutable = _sqlite_wal_header(p) and not Path(str(p) + "-wal").exists()
            url = f"sqlite:///file:{quote(str(p))}?mode=ro{'&immutable=1' if immutable else ''}&uri=true"
        elif not db or db == ":memory:":  # one shared in-memory database, not one per connection
            engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool,
                                      connect_args={"check_same_thread": False})
            return engine
        else:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            if Path(db).is_file() and Path(db).stat().st_size and not is_sqlite_file(db):
                raise StoreError(f"{db} is not an SQLite database file")
        engine = sa.create_engine(url, connect_args={"timeout": lock_timeout_s()})
        event.listen(engine, "connect", lambda c, r: _sqlite_pragmas(c, r, readonly=readonly, wal=wal))
        event.listen(engine, "begin", _on_begin)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


T = TypeVar("T")


def _transient(e: BaseException) -> bool:
    """Lock contention / deadlock / serialization failures: worth retrying."""
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40001", "40P01", "55P03"):
        return True
    msg = str(orig if orig is not None else e).lower()
    return isinstance(e, sa.exc.OperationalError) and ("locked" in msg or "busy" in msg)


def lock_timeout_s() -> float:
    """How long to wait for a locked database before giving up (``AUTOSDPA_DB_TIMEOUT``, default 30 s).
    The dispatcher then falls back to memory with one warning, so a stuck lock never stalls a run for long."""
    from .config import Settings

    return Settings.from_env().db_timeout_s


def retrying(fn: Callable[[], T], *, deadline_s: float | None = None) -> T:
    """Run ``fn`` (one whole transaction), retrying with jittered exponential backoff on transient errors."""
    deadline_s = lock_timeout_s() if deadline_s is None else deadline_s
    start, delay = time.monotonic(), 0.01
    while True:
        try:
            return fn()
        except sa.exc.DBAPIError as e:
            if not _transient(e) or time.monotonic() - start > deadline_s:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


# -- migrations ------------------------------------------------------------------------------------------------

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
    v = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")).scalar()
    try:
        version = int(str(v)[:12])
    except (TypeError, ValueError):
        raise StoreError(f"{where}: unreadable schema version {str(v)[:40]!r}") from None
    if version < 1:
        raise StoreError(f"{where}: unreadable schema version {version}")
    return version


class Store:
    """One database (plus read-only layers). All methods raise ``StoreError`` on database trouble."""

    def __init__(self, url: str | None = None, *, readonly: bool = False, shared: Sequence[str] = (),
                 wal: bool = True):
        self.url = db_url(url)
        self.readonly = readonly
        self.version = SCHEMA_VERSION
        self._env_ids: dict[str, int] = {}
        self.engine = None
        try:
            try:
                self.engine = make_engine(self.url, readonly=readonly, wal=wal)
            except (OSError, ImportError, ValueError) as e:  # a path that cannot exist, a missing driver, a bad URL
                raise StoreError(f"cannot open {self.display_url}: {type(e).__name__}: {e}") from e
            self._write = self.engine.execution_options(autosdpa_write=True)
            # retried: a concurrent process creating the file (or switching it to WAL) holds the lock briefly
            retrying(self._check_schema)
        except sa.exc.SQLAlchemyError as e:
            if self.engine is not None:
                self.engine.dispose()
            raise StoreError(f"cannot open {self.display_url}: {_describe(e)}") from e
        except StoreError:
            if self.engine is not None:
                self.engine.dispose()
            raise
        self.shared: list[Store] = []
        for path in shared:
            try:
                self.shared.append(Store(path, readonly=True))
            except StoreError as e:
                import warnings

                warnings.warn(f"autosdpa: skipping shared tuning database: {e}", RuntimeWarning, stacklevel=2)

    @property
    def display_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # -- schema -----------------------------------------------------------------------------------------
    def _check_schema(self) -> None:
        if self.readonly:
            with self.engine.connect() as c:
                self.version = self._inspect(c)
            return
        try:  # the common case, an up-to-date database: a plain read, no write lock taken
            with self.engine.connect() as c:
                if sa.inspect(c).has_table("autosdpa_meta") and self._inspect(c) == SCHEMA_VERSION:
                    self.version = SCHEMA_VERSION
                    return
        except StoreError:
            pass  # half-created by a concurrent process, or needs a migration: decide under the lock
        self.version = retrying(self._setup_schema)

    def _inspect(self, c) -> int:
        """Check the tables of an existing database; its schema version (read-only opens)."""
        insp = sa.inspect(c)
        tables = set(insp.get_table_names())
        if "autosdpa_meta" not in tables:
            raise StoreError(f"{self.display_url} is not an autosdpa database (no autosdpa_meta table)")
        version = _read_version(c, self.display_url)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.display_url} has schema version {version}, newer than this autosdpa "
                             f"understands ({SCHEMA_VERSION}); upgrade autosdpa")
        for name, table in _V1_TABLES.items():
            if name not in tables:
                raise StoreError(f"{self.display_url} is not a usable autosdpa database (no {name} table)")
            have = {col["name"] for col in insp.get_columns(name)}
            missing = [col.name for col in table.columns if col.name not in have]
            if missing:
                raise StoreError(f"{self.display_url}: table {name} lacks columns {', '.join(missing)}")
        return version

    def _setup_schema(self) -> int:
        with self._write.begin() as c:
            if self.dialect == "postgresql":  # one process at a time creates / migrates
                c.execute(sa.text("SELECT pg_advisory_xact_lock(7305860421)"))
            insp = sa.inspect(c)
            tables = set(insp.get_table_names())
            if "autosdpa_meta" not in tables:
                foreign = tables - set(metadata.tables)
                if foreign:
                    raise StoreError(f"{self.display_url} is not an autosdpa database (it has other tables: "
                                     f"{', '.join(sorted(foreign)[:5])})")
                _create(c, [meta_table, environment_table, measurement_table, measurement_key_index,
                            decision_table])
                stmt = _insert(c, meta_table).values(name="schema_version", value=str(SCHEMA_VERSION))
                c.execute(stmt.on_conflict_do_nothing() if hasattr(stmt, "on_conflict_do_nothing") else stmt)
            version = self._inspect(c)
            if version < SCHEMA_VERSION:
                version = migrate(c, version)
            return version

    def schema_version(self) -> int:
        try:
            with self.engine.connect() as c:
                return _read_version(c, self.display_url)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e

    # -- environments -----------------------------------------------------------------------------------
    def environment_id(self, fingerprint: str, info: dict | None = None, *, create: bool = True) -> int | None:
        if fingerprint in self._env_ids:
            return self._env_ids[fingerprint]
        t = environment_table
        try:
            with self.engine.connect() as c:
                eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
            if eid is None and create and not self.readonly:
                def insert():
                    with self._write.begin() as c:
                        return _environment_id_in(c, fingerprint, info)
                eid = retrying(insert)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e
        if eid is not None:
            self._env_ids[fingerprint] = eid
        return eid

    def environments(self) -> list[dict]:
        """Every environment row: {"id", "fingerprint", "created_at", **ENV_FIELDS}."""
        try:
            with self.engine.connect() as c:
                return [dict(r) for r in c.execute(sa.select(environment_table)
                                                   .order_by(environment_table.c.id)).mappings()]
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e

    # -- measurements -----------------------------------------------------------------------------------
    def lookup(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        """All measurements of ``key`` in this environment: shared layers first, the user's rows on top."""
        out: dict[str, Measurement] = {}
        for layer in self.shared:
            try:
                out.update(layer.lookup_own(fingerprint, key))
            except StoreError:
                continue
        out.update(self.lookup_own(fingerprint, key))
        return out

    def lookup_own(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        """This database's rows for ``key`` in this environment (not the shared layers)."""
        eid = self.environment_id(fingerprint, create=False)
        if eid is None:
            return {}
        m = measurement_table
        try:
            with self.engine.connect() as c:
                rows = c.execute(sa.select(m).where(m.c.environment_id == eid, m.c.problem_key == key)).all()
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e
        out = {}
        for r in rows:
            meas = _row_to_measurement(r)
            try:
                meas.validate()
            except (ValueError, TypeError):
                continue  # bad data from elsewhere is ignored, never trusted
            out[meas.backend] = meas
        return out

    def save(self, fingerprint: str, info: dict, key: str, measurements: Iterable[Measurement]) -> None:
        """Upsert one row per backend (a re-measurement replaces the older row of the same environment).

        Safe with many processes writing at once: retried with backoff on lock contention / deadlocks."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        measurements = sorted(measurements, key=lambda m: m.backend)  # one lock order for every writer
        if not measurements:
            return
        def write():
            with self._write.begin() as c:
                # Resolved inside the write transaction, never from a cache: a pruned environment's id can be
                # reused by SQLite for another environment.
                eid = _environment_id_in(c, fingerprint, info)
                _upsert_measurements(c, [dict(environment_id=eid, problem_key=key, **dataclasses.asdict(m))
                                         for m in measurements])
                return eid
        try:
            self._env_ids[fingerprint] = retrying(write)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e

    def rows(self, *, fingerprint: str | None = None) -> list[tuple[dict, str, Measurement]]:
        """Every (environment fields, problem key, measurement) in this database (not the shared layers)."""
        return list(self.iter_rows(fingerprint=fingerprint))

    def iter_rows(self, *, fingerprint: str | None = None, since: float | None = None):
        """Like ``rows()`` but streamed (files from elsewhere may be large)."""
        e, m = environment_table, measurement_table
        cols = [e.c.fingerprint, *[e.c[f] for f in ENV_FIELDS], m.c.problem_key, *[m.c[f] for f in MEASUREMENT_FIELDS]]
        q = sa.select(*cols).join(e, e.c.id == m.c.environment_id).order_by(m.c.problem_key, m.c.backend)
        if fingerprint:
            q = q.where(e.c.fingerprint == fingerprint)
        if since is not None:
            q = q.where(m.c.measured_at >= since)
        try:
            with self.engine.connect() as c:
                for r in c.execution_options(yield_per=1000).execute(q).mappings():
                    env = {"fingerprint": r["fingerprint"], **{f: r[f] for f in ENV_FIELDS}}
                    yield env, r["problem_key"], _row_to_measurement(r)
        except sa.exc.SQLAlchemyError as e_:
            raise StoreError(f"{self.display_url}: {_describe(e_)}") from e_

    def counts(self) -> dict[str, int]:
        try:
            with self.engine.connect() as c:
                out = {"environments": c.execute(sa.select(sa.func.count()).select_from(environment_table)).scalar(),
                       "measurements": c.execute(sa.select(sa.func.count()).select_from(measurement_table)).scalar()}
                if self.version >= 2:
                    out["decisions"] = c.execute(sa.select(sa.func.count()).select_from(decision_table)).scalar()
                return out
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e

    # -- decisions (rank-consistent choices; see autosdpa.consensus) ------------------------------------
    def decide(self, fingerprint: str, info: dict | None, key: str, backend: str, decided_by: str = "") -> str:
        """Record ``backend`` for (environment, key) unless a decision exists (first writer wins); returns the
        decision in force."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        d = decision_table

        def write():
            with self._write.begin() as c:
                eid = _environment_id_in(c, fingerprint, info)  # not cached: ids can be reused after a prune
                stmt = _insert(c, d).values(environment_id=eid, problem_key=key, backend=backend,
                                            decided_at=time.time(), decided_by=decided_by[:256])
                if hasattr(stmt, "on_conflict_do_nothing"):
                    c.execute(stmt.on_conflict_do_nothing(index_elements=["environment_id", "problem_key"]))
                elif c.execute(sa.select(d.c.backend).where(d.c.environment_id == eid,
                                                            d.c.problem_key == key)).scalar() is None:
                    c.execute(stmt)
                return c.execute(sa.select(d.c.backend).where(d.c.environment_id == eid,
                                                              d.c.problem_key == key)).scalar()
        try:
            return retrying(write)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e

    def decisions(self) -> list[dict]:
        """Every decision: {"fingerprint", "problem_key", "backend", "decided_at", "decided_by"}."""
        e, d = environment_table, decision_table
        q = sa.select(e.c.fingerprint, d.c.problem_key, d.c.backend, d.c.decided_at, d.c.decided_by).join(
            e, e.c.id == d.c.environment_id).order_by(e.c.fingerprint, d.c.problem_key)
        try:
            with self.engine.connect() as c:
                return [dict(r) for r in c.execute(q).mappings()]
        except sa.exc.SQLAlchemyError as e_:
            raise StoreError(f"{self.display_url}: {_describe(e_)}") from e_

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
                for it in sorted(items, key=lambda i: (i["environment_id"], i["problem_key"])):
                    c.execute(sa.delete(d).where(d.c.environment_id == it["environment_id"],
                                                 d.c.problem_key == it["problem_key"]))
                    c.execute(sa.insert(d), it)
        try:
            retrying(write)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {_describe(e)}") from e
        return len(items)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        for s in getattr(self, "shared", ()):
            s.close()


def _describe(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return f"{e.__class__.__name__}: {str(orig if orig is not None else e).splitlines()[0][:300]}"


def _environment_id_in(c, fingerprint: str, info: dict | None) -> int:
    """The id of ``fingerprint``'s environment, created from ``info`` if missing, inside transaction ``c``."""
    t = environment_table
    eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
    if eid is None:
        row = {f: (info or {}).get(f, 0 if f in ("cores", "memory_gb") else "") for f in ENV_FIELDS}
        stmt = _insert(c, t).values(fingerprint=fingerprint, created_at=time.time(), **row)
        if hasattr(stmt, "on_conflict_do_nothing"):
            stmt = stmt.on_conflict_do_nothing(index_elements=["fingerprint"])
        c.execute(stmt)
        eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
    return eid


def _row_to_measurement(r) -> Measurement:
    r = r._mapping if hasattr(r, "_mapping") else r
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


def _upsert_measurements(conn, rows: list[dict]) -> None:
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
