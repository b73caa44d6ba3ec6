"""Files built to hurt: generated columns, views, triggers, huge values, many rows (issue 9, item 6)."""
from __future__ import annotations

import inspect
import sqlite3
import threading
import time
import tracemalloc
import warnings

import pytest
from click.testing import CliRunner

from autosdpa.cli import main
from autosdpa.sharing import SharingError, import_file, info, validated_rows
from autosdpa.store import Store, StoreError
from autosdpa.validation import MAX_BACKENDS_PER_KEY, MAX_DETAIL_LEN, MAX_ENV_TEXT_LEN, MAX_KEY_LEN

from .helpers import KEY, V1_DDL, build_v1, env, meas, raw_insert

H100 = env("NVIDIA H100 80GB HBM3")
COLS = ("environment_id, problem_key, backend, status, median_s, spread_s, samples, max_error, detail, tuned_shape, "
        "measured_at")


def _good_file(path, rows=((H100, KEY, ("flash", "math")),)):
    s = Store(str(path), wal=False)
    for e, key, backends in rows:
        s.save(*e, key, [meas(b) for b in backends])
    s.close()
    return path


def _generated_detail_file(path, pad: int, n_rows: int = 100):
    """autosdpa's v1 schema, except that measurement.detail is computed on every read: ``pad`` characters."""
    build_v1("sqlite:///" + str(path), ddl=V1_DDL.replace("detail TEXT NOT NULL,", "pad INTEGER NOT NULL,"))
    fp, inf = H100
    con = sqlite3.connect(str(path))
    con.execute("INSERT INTO environment VALUES (1, ?, " + ", ".join("?" * len(inf)) + ", 0)", (fp, *inf.values()))
    con.executemany("INSERT INTO measurement (environment_id, problem_key, backend, status, median_s, spread_s, "
                    "samples, max_error, pad, tuned_shape, measured_at) VALUES (1, ?, ?, 'ok', 1e-3, 0, 5, 0, ?, '', ?)",
                    [(KEY, f"b{i}", pad, time.time()) for i in range(n_rows)])
    # added last: SQLite computes a generated column when a row is written, and on every read
    con.execute("ALTER TABLE measurement ADD COLUMN detail TEXT GENERATED ALWAYS AS (printf('%.*c', pad, 'x')) VIRTUAL")
    con.commit()
    con.close()
    return path


def test_generated_column_file_refused_before_any_row_is_read(tmp_path):
    # 10 MB per row if it were read: a regression is slow and loud, not a machine-killer like the 1e9
    path = _generated_detail_file(tmp_path / "bomb.sqlite", pad=10**7)
    assert path.stat().st_size < 64 * 1024
    before = path.read_bytes()
    with pytest.raises(SharingError, match="generated column"):
        info(str(path))
    with pytest.raises(SharingError, match="generated column"):
        import_file(str(path), str(tmp_path / "user.sqlite"))
    r = CliRunner().invoke(main, ["db", "info", str(path)])
    assert r.exit_code == 1 and "Error:" in r.output and "generated column" in r.output and "Traceback" not in r.output
    with pytest.warns(RuntimeWarning, match="skipping shared tuning database.*generated column"):
        user = Store(str(tmp_path / "user.sqlite"), shared=[str(path)])
    assert user.shared == [] and user.lookup(H100[0], KEY) == {}
    user.close()
    assert path.read_bytes() == before
    # as the user's own database: refused too, and not written
    with pytest.raises(StoreError, match="generated column"):
        Store(str(path))
    assert path.read_bytes() == before and not list(tmp_path.glob("bomb.sqlite-*"))


@pytest.mark.parametrize("kind", ["view", "trigger", "virtual"])
def test_views_triggers_and_virtual_tables_refused(tmp_path, kind):
    path = _good_file(tmp_path / f"{kind}.sqlite")
    if kind == "view":
        raw_insert(path, "ALTER TABLE measurement RENAME TO m2")
        raw_insert(path, "CREATE VIEW measurement AS SELECT * FROM m2")
        words = "measurement is a view"
    elif kind == "trigger":
        raw_insert(path, "CREATE TRIGGER t AFTER INSERT ON measurement BEGIN DELETE FROM environment; END")
        words = "triggers"
    else:
        raw_insert(path, "DROP TABLE decision")
        try:
            raw_insert(path, "CREATE VIRTUAL TABLE decision USING fts5(x)")
        except sqlite3.OperationalError as e:
            pytest.skip(f"no fts5 in this SQLite: {e}")
        words = "decision is a virtual table"
    before = path.read_bytes()
    for readonly in (True, False):
        with pytest.raises(StoreError, match=words):
            Store(str(path), readonly=readonly)
    assert path.read_bytes() == before


def test_every_text_read_is_bounded(tmp_path):
    """Megabytes in a text or number column come back cut at the limit (+1), and are then refused."""
    path = _good_file(tmp_path / "big.sqlite")
    big = "y" * 3_000_000
    raw_insert(path, f"INSERT INTO measurement ({COLS}) VALUES (1, ?, 'math', 'ok', 1e-3, 0, 5, 0, ?, ?, 1.0)",
               (KEY.replace("Lq=8", "Lq=16").replace("Lk=8", "Lk=16"), big, big))
    raw_insert(path, f"INSERT INTO measurement ({COLS}) VALUES (1, ?, 'math', 'ok', ?, 0, 5, 0, '', '', 1.0)",
               (KEY.replace("Lq=8", "Lq=32").replace("Lk=8", "Lk=32"), big))
    raw_insert(path, f"INSERT INTO measurement ({COLS}) VALUES (1, ?, 'flash', 'ok', 1e-3, 0, 5, 0, '', '', 1.0)",
               (big,))
    raw_insert(path, "UPDATE environment SET device_name = ? WHERE id = 1", (big,))
    s = Store(str(path), readonly=True)
    rows = s.rows()
    assert len(rows) == 5
    for e, key, m in rows:
        assert len(e["device_name"]) == MAX_ENV_TEXT_LEN + 1 and len(key) <= MAX_KEY_LEN + 1
        assert len(m.detail) <= MAX_DETAIL_LEN + 1 and len(m.tuned_shape) <= 513
        assert not isinstance(m.median_s, str) or len(m.median_s) <= 40
    assert len(s.iter_environments().__next__()["device_name"]) == MAX_ENV_TEXT_LEN + 1
    s.close()
    data = info(str(path))
    assert data["valid_rows"] == 0 and data["rejected"] == 5  # the environment's over-long name sinks them all


def test_a_key_with_thousands_of_rows_is_read_bounded(tmp_path):
    """Without the unique constraint a file can hold any number of rows for one key: a lookup reads a few."""
    path = tmp_path / "many.sqlite"
    _good_file(path)
    con = sqlite3.connect(str(path))
    con.executescript("ALTER TABLE measurement RENAME TO m_old; CREATE TABLE measurement AS SELECT * FROM m_old; "
                      "DROP TABLE m_old;")
    con.executemany(f"INSERT INTO measurement ({COLS}) VALUES (1, ?, ?, 'ok', 1e-3, 0, 5, 0, '', '', 1.0)",
                    [(KEY, f"b{i}") for i in range(3000)])
    con.commit()
    con.close()
    user = Store(str(tmp_path / "user.sqlite"), shared=[str(path)])
    got = user.lookup(H100[0], KEY)
    assert 0 < len(got) <= MAX_BACKENDS_PER_KEY
    user.close()


def _rows_file(path, n: int):
    """A valid file of ``n`` rows (one environment, n/4 keys x 4 backends), written quickly."""
    _good_file(path)
    now = time.time()
    keys = [KEY.replace("Lq=8", f"Lq={i + 20}") for i in range(n // 4)]
    con = sqlite3.connect(str(path))
    con.execute("DELETE FROM measurement")
    con.executemany(f"INSERT INTO measurement ({COLS}) VALUES (1, ?, ?, 'ok', 1e-3, 1e-5, 5, 0, '', '', ?)",
                    [(k, b, now) for k in keys for b in ("math", "flash", "efficient", "cudnn")])
    con.commit()
    con.close()
    return path


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_info_streams_rows(tmp_path, monkeypatch):
    assert inspect.isgeneratorfunction(Store.iter_rows) and inspect.isgeneratorfunction(validated_rows)
    monkeypatch.setattr(Store, "rows", lambda *a, **k: pytest.fail("info must not list every row"))
    small, large = _rows_file(tmp_path / "small.sqlite", 2_000), _rows_file(tmp_path / "large.sqlite", 16_000)
    assert info(str(large))["valid_rows"] == 16_000
    peak_small = _peak_bytes(lambda: info(str(small)))
    peak_large = _peak_bytes(lambda: info(str(large)))
    # 8x the rows; a list of them would hold ~8x the memory (~1 KB a row). Streaming: the same few batches.
    assert peak_large < peak_small + 2_000_000, (peak_small, peak_large)


def test_import_streams_rows(tmp_path):
    small, large = _rows_file(tmp_path / "small.sqlite", 2_000), _rows_file(tmp_path / "large.sqlite", 16_000)
    peak_small = _peak_bytes(lambda: import_file(str(small), str(tmp_path / "a.sqlite")))
    peak_large = _peak_bytes(lambda: import_file(str(large), str(tmp_path / "b.sqlite")))
    assert peak_large < peak_small + 4_000_000, (peak_small, peak_large)
    assert Store(str(tmp_path / "b.sqlite")).counts()["measurements"] == 16_000


def test_fifo_and_devices_refused_without_blocking_or_creating_files(tmp_path):
    import os

    fifo = tmp_path / "pipe.sqlite"
    os.mkfifo(fifo)
    hold = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # should the code open it anyway, it must not block
    errors = []
    journals = ("/dev/null-journal", "/dev/null-wal")
    before = {j: os.stat(j).st_mtime_ns if os.path.exists(j) else None for j in journals}  # other processes...

    def attempt():
        for target, ro in ((str(fifo), False), (str(fifo), True), ("/dev/null", False), (str(tmp_path), False)):
            try:
                Store(target, readonly=ro)
            except StoreError as e:
                errors.append(str(e))
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=20)
    os.close(hold)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert len(errors) == 4 and all("not a regular file" in e or "no such database" in e for e in errors), errors
    assert {j: os.stat(j).st_mtime_ns if os.path.exists(j) else None for j in journals} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.sqlite"]


def test_shared_bomb_as_layer_costs_one_warning(tmp_path, monkeypatch):
    """AUTOSDPA_SHARED_DBS naming a bomb: the first call warns once and runs, as if the layer were absent."""
    import torch
    import torch.nn.functional as F

    import autosdpa

    bomb = _generated_detail_file(tmp_path / "bomb.sqlite", pad=10**7)
    monkeypatch.setenv("AUTOSDPA_SHARED_DBS", str(bomb))
    autosdpa.reset()
    q = torch.randn(1, 2, 8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = autosdpa.sdpa(q, q, q)
        autosdpa.sdpa(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    msgs = [str(w.message) for w in caught if "autosdpa" in str(w.message)]
    assert len(msgs) == 1 and "generated column" in msgs[0], msgs
