"""The Store on SQLite and PostgreSQL: round trips, schema versions and migrations, layering, decisions."""
from __future__ import annotations

import os
import sqlite3

import pytest
import sqlalchemy as sa

from autosdpa.store import SCHEMA_VERSION, Store, StoreError
from autosdpa.validation import check_measurement, measurement_error

from .helpers import KEY, KEY2, build_v1, env, meas, raw_insert


def test_roundtrip_and_upsert(any_db):
    fp, info = env()
    s = Store(any_db)
    assert s.version == SCHEMA_VERSION == 2
    s.save(fp, info, KEY, [meas("math", 2e-3), meas("flash", 1e-3), meas("efficient", status="rejected")])
    got = s.lookup(fp, KEY)
    assert set(got) == {"math", "flash", "efficient"} and got["flash"].median_s == 1e-3
    s.save(fp, info, KEY, [meas("flash", 5e-4, samples=3)])  # re-measurement replaces the row
    assert s.lookup(fp, KEY)["flash"].median_s == 5e-4
    assert s.counts() == {"environments": 1, "measurements": 3, "decisions": 0}
    assert s.lookup(fp, KEY2) == {} and s.lookup("0" * 16, KEY) == {}
    env_row, key, m = s.rows()[0]
    assert env_row["fingerprint"] == fp and env_row["device_name"] == info["device_name"] and key == KEY
    s.close()
    s2 = Store(any_db)  # reopening an up-to-date database changes nothing
    assert s2.counts()["measurements"] == 3
    s2.close()


def test_v1_database_upgraded_in_place(any_db):
    e = env()
    build_v1(any_db, [(e, KEY, meas("math")), (e, KEY2, meas("flash"))])
    s = Store(any_db)
    assert s.version == 2 and s.schema_version() == 2
    insp = sa.inspect(s.engine)
    assert "decision" in insp.get_table_names()
    assert "ix_measurement_problem_key" in {i["name"] for i in insp.get_indexes("measurement")}
    assert set(s.lookup(e[0], KEY)) == {"math"} and s.counts()["measurements"] == 2
    assert s.decide(e[0], e[1], KEY, "math") == "math"
    s.close()


def test_newer_schema_refused(any_db):
    build_v1(any_db, version="99")
    with pytest.raises(StoreError, match="schema version 99, newer than this autosdpa understands"):
        Store(any_db)


def test_foreign_database_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    raw_insert(path, "CREATE TABLE users (id INTEGER, name TEXT)")
    with pytest.raises(StoreError, match="not an autosdpa database"):
        Store(str(path))
    with pytest.raises(StoreError, match="not an autosdpa database"):
        Store(str(path), readonly=True)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(str(garbage))
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(str(garbage), readonly=True)


def test_decisions_first_writer_wins(any_db):
    fp, info = env()
    a, b = Store(any_db), Store(any_db)
    assert a.decide(fp, info, KEY, "flash", "rank 0") == "flash"
    assert b.decide(fp, info, KEY, "math", "rank 1") == "flash"
    assert b.decide(fp, info, KEY2, "math", "rank 1") == "math"
    assert {d["problem_key"]: d["backend"] for d in a.decisions()} == {KEY: "flash", KEY2: "math"}
    assert a.set_decisions([{"fingerprint": fp, "problem_key": KEY, "backend": "math"}]) == 1
    assert b.decide(fp, info, KEY, "flash") == "math"
    a.close(), b.close()


def _snapshot(path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_shared_layer_user_rows_win_and_file_untouched(any_db, tmp_path, journal):
    fp, info = env()
    shipped = tmp_path / "shipped" / "h100.sqlite"
    shipped.parent.mkdir()
    s = Store(str(shipped), wal=journal == "wal")
    s.save(fp, info, KEY, [meas("math", 1e-3), meas("flash", 9e-3)])
    s.save(fp, info, KEY2, [meas("flash", 1e-3)])
    s.close()
    if journal == "wal":
        con = sqlite3.connect(str(shipped))
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
    before = _snapshot(shipped)
    user = Store(any_db, shared=[str(shipped)])
    user.save(fp, info, KEY, [meas("flash", 5e-4)])
    got = user.lookup(fp, KEY)
    assert got["flash"].median_s == 5e-4  # the user's own measurement wins
    assert got["math"].median_s == 1e-3  # the shared layer fills in what the user lacks
    assert set(user.lookup(fp, KEY2)) == {"flash"}
    user.shared[0].counts()
    user.close()
    assert _snapshot(shipped) == before  # same bytes, same mtime, no -wal/-shm/-journal next to it


def test_shared_layer_invalid_rows_ignored(tmp_path):
    fp, info = env()
    shipped = tmp_path / "bad.sqlite"
    s = Store(str(shipped), wal=False)
    s.save(fp, info, KEY, [meas("math", 1e-3), meas("flash", 2e-3)])
    s.close()
    raw_insert(shipped, "UPDATE measurement SET median_s = -1 WHERE backend = 'flash'")
    raw_insert(shipped, "INSERT INTO measurement (environment_id, problem_key, backend, status, median_s, samples, "
                        "detail, tuned_shape, measured_at) VALUES (1, ?, 'Evil Name;--', 'ok', 0.0, 5, '', '', 1.0)",
               (KEY,))
    user = Store(str(tmp_path / "user.sqlite"), shared=[str(shipped)])
    assert set(user.lookup(fp, KEY)) == {"math"}
    user.close()


def test_unusable_shared_layer_skipped_with_warning(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.warns(RuntimeWarning, match="skipping shared tuning database"):
        user = Store(str(tmp_path / "user.sqlite"), shared=[str(bad), str(tmp_path / "missing.sqlite")])
    assert user.shared == []
    user.close()


def test_measurement_validation():
    assert measurement_error(meas("math")) is None
    for bad, words in ((dict(median_s=float("nan")), "median_s"), (dict(median_s=float("inf")), "median_s"),
                       (dict(median_s=-1.0), "median_s"), (dict(samples=-1), "samples"),
                       (dict(status="winner"), "unknown status"),
                       (dict(backend="x'; DROP TABLE measurement;--"), "malformed backend name"),
                       (dict(detail="x" * 5000), "detail"), (dict(measured_at=1e12), "measured_at"),
                       (dict(samples=10**12), "samples"), (dict(median_s="fast"), "median_s"),
                       (dict(tuned_shape="\x1b[2J"), "tuned_shape")):
        m = meas("math")
        for k, v in bad.items():
            setattr(m, k, v)
        assert words in measurement_error(m)
        with pytest.raises(ValueError, match=words):
            check_measurement(m)


def test_rows_stay_with_their_environment_after_another_process_prunes_it(any_db):
    """A long-lived Store caches environment ids; after a prune elsewhere, SQLite may hand the same id to a new
    environment. Saves must still land under the right fingerprint."""
    fp_a, info_a = env("GPU A")
    fp_b, info_b = env("GPU B")
    s = Store(any_db)
    s.save(fp_a, info_a, KEY, [meas("math")])  # caches A's id
    other = Store(any_db)
    with other.engine.begin() as c:  # "another process" prunes A and records B, which may reuse A's id
        c.execute(sa.text("DELETE FROM measurement"))
        c.execute(sa.text("DELETE FROM environment"))
    other.save(fp_b, info_b, KEY, [meas("flash")])
    s.save(fp_a, info_a, KEY2, [meas("math")])
    assert set(s.lookup(fp_b, KEY)) == {"flash"} and s.lookup(fp_b, KEY2) == {}
    assert set(Store(any_db).lookup(fp_a, KEY2)) == {"math"}
    s.close()
    other.close()


def test_measurement_fields_are_the_dataclass_order():
    """The store builds Measurements positionally from MEASUREMENT_FIELDS (fast streaming): same order."""
    import dataclasses

    from autosdpa.records import MEASUREMENT_FIELDS, Measurement

    assert MEASUREMENT_FIELDS == tuple(f.name for f in dataclasses.fields(Measurement))


def test_snapshot_reads_an_environment_once_and_sees_every_later_commit(tmp_path, monkeypatch):
    """A file's lookups come from one read of the environment until any connection commits (this store's own
    writes, another process's, a raw sqlite3 edit): then the next lookup reads again."""
    path = tmp_path / "snap.sqlite"
    fp, info = env()
    ours, other = Store(path), Store(path)
    try:
        ours.save(fp, info, KEY, [meas("math", 2e-3)])
        reads = []
        real_connect = ours.engine.connect
        monkeypatch.setattr(ours.engine, "connect", lambda *a, **k: reads.append(1) or real_connect(*a, **k))
        assert set(ours.lookup_own(fp, KEY)) == {"math"}
        n = len(reads)
        for _ in range(5):  # unchanged: no query at all
            assert ours.lookup_own(fp, KEY2) == {} and set(ours.lookup_own(fp, KEY)) == {"math"}
        assert len(reads) == n
        other.save(fp, info, KEY2, [meas("flash", 1e-3)])           # another writer
        assert set(ours.lookup_own(fp, KEY2)) == {"flash"}
        ours.save(fp, info, KEY, [meas("math", 5e-3), meas("flash", 1e-3)])  # our own write
        assert ours.lookup_own(fp, KEY)["math"].median_s == 5e-3 and set(ours.lookup_own(fp, KEY)) == {"math", "flash"}
        con = sqlite3.connect(str(path))
        con.execute("UPDATE measurement SET median_s = 'bad' WHERE backend = 'flash' AND problem_key = ?", (KEY,))
        con.commit()
        con.close()
        assert set(ours.lookup_own(fp, KEY)) == {"math"}  # still validated per lookup
    finally:
        ours.close()
        other.close()


def test_snapshot_gives_way_to_per_key_reads_for_a_large_environment(tmp_path, monkeypatch):
    import autosdpa.store as store_mod

    monkeypatch.setattr(store_mod, "SNAPSHOT_MAX_ROWS", 1)
    fp, info = env()
    s = Store(tmp_path / "big.sqlite")
    try:
        s.save(fp, info, KEY, [meas("math"), meas("flash")])
        assert set(s.lookup_own(fp, KEY)) == {"math", "flash"}
        assert s._snapshots[fp][1] is None  # too many rows: remembered, keys read one at a time
        s.save(fp, info, KEY2, [meas("math")])
        assert set(s.lookup_own(fp, KEY2)) == {"math"}
    finally:
        s.close()


def test_a_new_file_gets_the_schema_sqlalchemy_would_create(tmp_path):
    """New files are created with plain SQL (no engine on a first call): the very tables, columns, keys and
    indexes that ``metadata.create_all`` makes."""
    from autosdpa import store as store_mod

    ours = tmp_path / "ours.sqlite"
    Store(ours).close()
    theirs = tmp_path / "theirs.sqlite"
    engine = sa.create_engine(f"sqlite:///{theirs}")
    store_mod.metadata.create_all(engine)
    engine.dispose()

    def schema(path):
        con = sqlite3.connect(str(path))
        try:
            tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            out = {}
            for t in tables:
                indexes = sorted((r[1], r[2], r[3], tuple(c[2] for c in con.execute(f'PRAGMA index_info("{r[1]}")')))
                                 for r in con.execute(f'PRAGMA index_list("{t}")'))
                out[t] = (con.execute(f'PRAGMA table_info("{t}")').fetchall(), indexes,
                          con.execute(f'PRAGMA foreign_key_list("{t}")').fetchall())
            return out
        finally:
            con.close()
    mine, want = schema(ours), schema(theirs)
    assert set(mine) == set(want)
    for t in want:
        assert mine[t] == want[t], t


def test_a_detail_longer_than_readers_accept_is_kept_shortened_not_lost(tmp_path):
    """A row whose detail passes the readers' limit would be written, then dropped on every read (and the
    problem tuned again each run): it is stored shortened, saying how much was left out."""
    from autosdpa.store import Measurement, Store
    from autosdpa.validation import MAX_DETAIL_LEN

    s = Store(str(tmp_path / "x.sqlite"))
    env = {"device_type": "cpu", "device_name": "cpu", "torch": "2.13.0"}
    key = "fwd|fp32|B=1|Hq=1|Hkv=1|Lq=8|Lk=8|D=8|Dv=8|nocausal|mask=none|drop=0|gqa=0|layout=bhld|det=0"
    s.save("f" * 16, env, key, [Measurement("math", "rejected", detail="x" * (MAX_DETAIL_LEN + 500))])
    s.close()
    got = Store(str(tmp_path / "x.sqlite")).lookup_own("f" * 16, key)
    assert got["math"].status == "rejected" and len(got["math"].detail) <= MAX_DETAIL_LEN
    assert got["math"].detail.endswith("characters)")
