"""Builders for test data: valid environments, rows, and crafted files (v1 schema, hostile content)."""
from __future__ import annotations

import sqlite3
import time

import sqlalchemy as sa

from autosdpa.records import ENV_FIELDS, Measurement, fingerprint_of

KEY = "fwd|fp32|B=1|Hq=2|Hkv=2|Lq=8|Lk=8|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
KEY2 = "fwd|fp32|B=1|Hq=2|Hkv=2|Lq=16|Lk=16|D=16|Dv=16|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"


def env(device_name="Test GPU", torch_version="2.13.0", kernels="1", device_type="cuda", **kw) -> tuple[str, dict]:
    info = {"device_type": device_type, "device_name": device_name, "capability": "9.0", "cores": 132,
            "memory_gb": 80, "torch": torch_version, "cuda": "12.8", "cudnn": "91000", "triton": "3.5.0",
            "kernels": kernels}
    info.update(kw)
    return fingerprint_of(info), info


def meas(backend="math", median=1e-3, samples=10, status="ok", at=None, **kw) -> Measurement:
    return Measurement(backend, status, median if status == "ok" else None, median / 100 if status == "ok" else None,
                       samples if status == "ok" else 0, 1e-6, measured_at=at if at is not None else time.time() - 60,
                       **kw)


V1_DDL = """
CREATE TABLE autosdpa_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value VARCHAR(256) NOT NULL);
CREATE TABLE environment (id INTEGER NOT NULL PRIMARY KEY, fingerprint VARCHAR(64) NOT NULL UNIQUE,
  device_type VARCHAR(16) NOT NULL, device_name VARCHAR(256) NOT NULL, capability VARCHAR(32) NOT NULL,
  cores INTEGER NOT NULL, memory_gb INTEGER NOT NULL, torch VARCHAR(64) NOT NULL, cuda VARCHAR(32) NOT NULL,
  cudnn VARCHAR(32) NOT NULL, triton VARCHAR(32) NOT NULL, kernels VARCHAR(32) NOT NULL, created_at FLOAT NOT NULL);
CREATE TABLE measurement (id INTEGER NOT NULL PRIMARY KEY, environment_id INTEGER NOT NULL REFERENCES environment(id),
  problem_key VARCHAR(512) NOT NULL, backend VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, median_s FLOAT,
  spread_s FLOAT, samples INTEGER NOT NULL, max_error FLOAT, detail TEXT NOT NULL, tuned_shape VARCHAR(512) NOT NULL,
  measured_at FLOAT NOT NULL, CONSTRAINT uq_measurement UNIQUE (environment_id, problem_key, backend));
"""


def build_v1(url: str, rows=(), version="1", ddl: str = V1_DDL) -> None:
    """A database in schema version 1 (as autosdpa 0.1 wrote it), holding ``rows`` of (env, key, Measurement)."""
    engine = sa.create_engine(url)
    with engine.begin() as c:
        for stmt in ddl.split(";"):
            if stmt.strip():
                c.exec_driver_sql(stmt.replace("INTEGER NOT NULL PRIMARY KEY", "SERIAL PRIMARY KEY")
                                  if c.dialect.name == "postgresql" else stmt)
        c.execute(sa.text("INSERT INTO autosdpa_meta VALUES ('schema_version', :v)"), {"v": version})
    _insert_rows(engine, rows)
    engine.dispose()


def _insert_rows(engine, rows) -> None:
    envs = {}
    with engine.begin() as c:
        for (fp, info), key, m in rows:
            if fp not in envs:
                c.execute(sa.text("INSERT INTO environment (fingerprint, " + ", ".join(ENV_FIELDS) + ", created_at) "
                                  "VALUES (:fp, " + ", ".join(f":{f}" for f in ENV_FIELDS) + ", :t)"),
                          {"fp": fp, **info, "t": time.time()})
                envs[fp] = c.execute(sa.text("SELECT id FROM environment WHERE fingerprint = :fp"), {"fp": fp}).scalar()
            c.execute(sa.text("INSERT INTO measurement (environment_id, problem_key, backend, status, median_s, "
                              "spread_s, samples, max_error, detail, tuned_shape, measured_at) VALUES (:e, :k, :b, :s, "
                              ":med, :sp, :n, :err, :d, :ts, :at)"),
                      {"e": envs[fp], "k": key, "b": m.backend, "s": m.status, "med": m.median_s, "sp": m.spread_s,
                       "n": m.samples, "err": m.max_error, "d": m.detail, "ts": m.tuned_shape, "at": m.measured_at})


def raw_insert(path, sql: str, params=()) -> None:
    """Write anything (bypassing every check) into an SQLite file, like a hostile tool would."""
    con = sqlite3.connect(str(path))
    con.execute(sql, params)
    con.commit()
    con.close()


NO_INDEX_DDL = """
CREATE TABLE autosdpa_meta (name TEXT, value TEXT);
CREATE TABLE environment (id INTEGER, fingerprint TEXT, device_type TEXT, device_name TEXT, capability TEXT,
  cores INTEGER, memory_gb INTEGER, torch TEXT, cuda TEXT, cudnn TEXT, triton TEXT, kernels TEXT, created_at FLOAT);
CREATE TABLE measurement (id INTEGER, environment_id INTEGER, problem_key TEXT, backend TEXT, status TEXT,
  median_s FLOAT, spread_s FLOAT, samples INTEGER, max_error FLOAT, detail TEXT, tuned_shape TEXT, measured_at FLOAT);
"""


def many_environments_file(path, hardware: dict, keys, n: int = 10_000, backends=("flash", "math")) -> None:
    """A valid-looking shared file without a single index or key: ``n`` environments of the hardware ``hardware``
    (its fields; only torch differs, so every fingerprint is right), each with an ok row per backend for each
    of ``keys``: every lookup by environment or key has to scan a table."""
    con = sqlite3.connect(str(path))
    con.executescript(NO_INDEX_DDL)
    con.execute("INSERT INTO autosdpa_meta VALUES ('schema_version', '2')")
    now = time.time() - 3600
    envs, rows = [], []
    for i in range(n):
        info = {**hardware, "torch": f"0.{i}.0"}
        envs.append((i + 1, fingerprint_of(info), *(info[f] for f in ENV_FIELDS), now + i))
        for key in keys:
            for j, b in enumerate(backends):
                rows.append((len(rows) + 1, i + 1, key, b, "ok", 1e-3 * (j + 1), 1e-5, 10, 1e-6, "", "", now))
    con.executemany(f"INSERT INTO environment VALUES ({', '.join('?' * (len(ENV_FIELDS) + 3))})", envs)
    con.executemany("INSERT INTO measurement VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
