"""Store tests: every database-facing test runs on SQLite and, when AUTOSDPA_TEST_PG_URL is set (``.ci/run``
starts a throw-away server and sets it), on PostgreSQL, each test in its own fresh database."""
from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

PG_URL = os.environ.get("AUTOSDPA_TEST_PG_URL")
PG_SKIP = "AUTOSDPA_TEST_PG_URL is not set (.ci/run starts a PostgreSQL and sets it)"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never touch the real user cache: every test (and child process) gets its own AUTOSDPA_DB."""
    monkeypatch.setenv("AUTOSDPA_DB", str(tmp_path / "user.sqlite"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # Store(None): never the real cache
    monkeypatch.delenv("AUTOSDPA_SHARED_DBS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    yield
    import autosdpa

    autosdpa.reset()


def _fresh_pg_database():
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"autosdpa_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    def drop():
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return url, drop


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason=PG_SKIP))])
def any_db(request, tmp_path):
    """A fresh, empty database URL: an SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield "sqlite:///" + str(tmp_path / "db.sqlite")
        return
    url, drop = _fresh_pg_database()
    try:
        yield url
    finally:
        drop()
