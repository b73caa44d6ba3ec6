"""Persistent measurements: SQLAlchemy 2.x Core, SQLite by default, any SQLAlchemy URL (PostgreSQL) for fleets.

Every backend's measurement is kept (not only the winner), one row per (environment, problem key, backend).
Read-only shared databases (shipped ``tuning_db/*.sqlite`` and ``AUTOSDPA_SHARED_DBS``) are layered under the
user's database: the user's own rows win.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event

SCHEMA_VERSION = 1
STATUSES = ("ok", "rejected", "skipped")

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
ENV_FIELDS = ("device_type", "device_name", "capability", "cores", "memory_gb", "torch", "cuda", "cudnn",
              "triton", "kernels")


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
        return self.status == "ok" and self.median_s is not None

    def validate(self) -> None:
        """Raise ValueError unless this row is sane data (rows may come from files made elsewhere)."""
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        for f in ("median_s", "spread_s", "max_error"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 1e6):
                raise ValueError(f"{f}={v!r} is not a finite non-negative number")
        if self.status == "ok" and self.median_s is None:
            raise ValueError("an ok measurement needs a median")
        if not isinstance(self.samples, int) or not 0 <= self.samples <= 10**9:
            raise ValueError(f"samples={self.samples!r}")


def default_db_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("autosdpa")) / "autosdpa.sqlite"


def db_url(target: str | os.PathLike | None = None) -> str:
    """A path or SQLAlchemy URL -> URL; None means ``AUTOSDPA_DB`` or the default cache file."""
    target = target if target is not None else os.environ.get("AUTOSDPA_DB") or default_db_path()
    target = str(target)
    if "://" in target:
        return target
    return "sqlite:///" + str(Path(target).expanduser().absolute())


def _sqlite_pragmas(dbapi_conn, _record, *, readonly: bool):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def make_engine(url: str, *, readonly: bool = False) -> sa.Engine:
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if readonly:
            if not db or not Path(db).is_file():
                raise StoreError(f"no such database file: {db}")
            # mode=ro: never create, never write, never leave -wal files next to a shipped file
            url = f"sqlite:///file:{Path(db).absolute()}?mode=ro&uri=true"
        elif not db or db == ":memory:":  # one shared in-memory database, not one per connection
            engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool,
                                      connect_args={"check_same_thread": False})
            return engine
        else:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", lambda c, r: _sqlite_pragmas(c, r, readonly=readonly))
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class Store:
    """One database (plus read-only layers). All methods raise ``StoreError`` on database trouble."""

    def __init__(self, url: str | None = None, *, readonly: bool = False, shared: Sequence[str] = ()):
        self.url = db_url(url)
        self.readonly = readonly
        self._env_ids: dict[str, int] = {}
        try:
            self.engine = make_engine(self.url, readonly=readonly)
            self._check_schema()
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"cannot open {self.display_url}: {e.__class__.__name__}: {e.orig if hasattr(e, 'orig') else e}") from e
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

    # -- schema -----------------------------------------------------------------------------------------
    def _check_schema(self) -> None:
        insp = sa.inspect(self.engine)
        if not insp.has_table("autosdpa_meta"):
            if self.readonly:
                raise StoreError(f"{self.display_url} is not an autosdpa database (no autosdpa_meta table)")
            with self.engine.begin() as c:
                metadata.create_all(c)
                stmt = _insert(c, meta_table).values(name="schema_version", value=str(SCHEMA_VERSION))
                c.execute(stmt.on_conflict_do_nothing() if hasattr(stmt, "on_conflict_do_nothing") else stmt)
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.display_url} has schema version {version}, newer than this autosdpa "
                             f"understands ({SCHEMA_VERSION}); upgrade autosdpa")
        if version < SCHEMA_VERSION:
            raise StoreError(f"{self.display_url} has old schema version {version}; run `autosdpa db import`")

    def schema_version(self) -> int:
        with self.engine.connect() as c:
            v = c.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")).scalar()
        try:
            return int(v)
        except (TypeError, ValueError):
            raise StoreError(f"{self.display_url}: unreadable schema version {v!r}") from None

    # -- environments -----------------------------------------------------------------------------------
    def environment_id(self, fingerprint: str, info: dict | None = None, *, create: bool = True) -> int | None:
        if fingerprint in self._env_ids:
            return self._env_ids[fingerprint]
        t = environment_table
        try:
            with self.engine.begin() as c:
                eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
                if eid is None and create and not self.readonly:
                    row = {f: (info or {}).get(f, 0 if f in ("cores", "memory_gb") else "") for f in ENV_FIELDS}
                    stmt = _insert(c, t).values(fingerprint=fingerprint, created_at=time.time(), **row)
                    if hasattr(stmt, "on_conflict_do_nothing"):
                        stmt = stmt.on_conflict_do_nothing(index_elements=["fingerprint"])
                    c.execute(stmt)
                    eid = c.execute(sa.select(t.c.id).where(t.c.fingerprint == fingerprint)).scalar()
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {e}") from e
        if eid is not None:
            self._env_ids[fingerprint] = eid
        return eid

    # -- measurements -----------------------------------------------------------------------------------
    def lookup(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        """All measurements of ``key`` in this environment: shared layers first, the user's rows on top."""
        out: dict[str, Measurement] = {}
        for layer in self.shared:
            try:
                out.update(layer._lookup_own(fingerprint, key))
            except StoreError:
                continue
        out.update(self._lookup_own(fingerprint, key))
        return out

    def _lookup_own(self, fingerprint: str, key: str) -> dict[str, Measurement]:
        eid = self.environment_id(fingerprint, create=False)
        if eid is None:
            return {}
        m = measurement_table
        try:
            with self.engine.connect() as c:
                rows = c.execute(sa.select(m).where(m.c.environment_id == eid, m.c.problem_key == key)).all()
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {e}") from e
        out = {}
        for r in rows:
            meas = _row_to_measurement(r)
            try:
                meas.validate()
            except ValueError:
                continue  # bad data from elsewhere is ignored, never trusted
            out[meas.backend] = meas
        return out

    def save(self, fingerprint: str, info: dict, key: str, measurements: Iterable[Measurement]) -> None:
        """Upsert one row per backend (a re-measurement replaces the older row of the same environment)."""
        if self.readonly:
            raise StoreError(f"{self.display_url} is read-only")
        eid = self.environment_id(fingerprint, info)
        rows = [dict(environment_id=eid, problem_key=key, **dataclasses.asdict(m)) for m in measurements]
        if not rows:
            return
        try:
            with self.engine.begin() as c:
                _upsert_measurements(c, rows)
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"{self.display_url}: {e}") from e

    def rows(self, *, fingerprint: str | None = None) -> list[tuple[dict, str, Measurement]]:
        """Every (environment fields, problem key, measurement) in this database (not the shared layers)."""
        e, m = environment_table, measurement_table
        q = sa.select(e, m).join(e, e.c.id == m.c.environment_id).order_by(m.c.problem_key, m.c.backend)
        if fingerprint:
            q = q.where(e.c.fingerprint == fingerprint)
        try:
            with self.engine.connect() as c:
                result = c.execute(q).mappings().all()
        except sa.exc.SQLAlchemyError as e_:
            raise StoreError(f"{self.display_url}: {e_}") from e_
        out = []
        for r in result:
            env = {"fingerprint": r["fingerprint"], **{f: r[f] for f in ENV_FIELDS}}
            out.append((env, r["problem_key"], _row_to_measurement(r)))
        return out

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {"environments": c.execute(sa.select(sa.func.count()).select_from(environment_table)).scalar(),
                    "measurements": c.execute(sa.select(sa.func.count()).select_from(measurement_table)).scalar()}

    def close(self) -> None:
        self.engine.dispose()
        for s in self.shared:
            s.close()


def _row_to_measurement(r) -> Measurement:
    r = r._mapping if hasattr(r, "_mapping") else r
    return Measurement(backend=r["backend"], status=r["status"], median_s=r["median_s"], spread_s=r["spread_s"],
                       samples=r["samples"], max_error=r["max_error"], detail=r["detail"] or "",
                       tuned_shape=r["tuned_shape"] or "", measured_at=r["measured_at"])


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
