"""A file's snapshot stays current across this store's own write only when that write was the one commit in
between: a commit by another connection while our write waits for the lock, or just after our commit, makes
the next lookup read again (issue 17, item 1)."""
from __future__ import annotations

import sqlite3
import threading

from autosdpa.store import Store

from .helpers import KEY, KEY2, env, meas


def _seeded(path):
    fp, info = env()
    ours = Store(path)
    ours.save(fp, info, KEY, [meas("math"), meas("flash", status="rejected", detail="wrong result")])
    assert set(ours.lookup_own(fp, KEY)) == {"math", "flash"}  # the snapshot is held from here on
    return ours, fp, info


def test_a_row_deleted_while_our_write_waits_for_the_lock_is_not_served(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    ours, fp, info = _seeded(path)
    other = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock and deletes a row...
    other.execute("DELETE FROM measurement WHERE backend = 'flash'")
    waiting = threading.Event()
    real_write = ours._sqlite_write
    monkeypatch.setattr(ours, "_sqlite_write", lambda fn: waiting.set() or real_write(fn))
    saver = threading.Thread(target=ours.save, args=(fp, info, KEY2, [meas("math")]))
    try:
        saver.start()
        assert waiting.wait(30)
        other.execute("COMMIT")  # ...and commits while our write waits for that lock
        saver.join(30)
        assert not saver.is_alive()
        assert set(ours.lookup_own(fp, KEY)) == {"math"}
        assert set(ours.lookup_own(fp, KEY2)) == {"math"}
    finally:
        other.close()
        ours.close()


def test_a_row_pruned_right_after_our_commit_is_not_served(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite"
    ours, fp, info = _seeded(path)
    pruner = Store(path)
    real_write = ours._sqlite_write

    def write_then_prune(fn):
        out = real_write(fn)
        pruner.prune(failed=True)  # `autosdpa db prune --failed` in another process, before we look again
        return out
    monkeypatch.setattr(ours, "_sqlite_write", write_then_prune)
    try:
        ours.save(fp, info, KEY2, [meas("math")])
        assert set(ours.lookup_own(fp, KEY)) == {"math"}
        assert set(ours.lookup_own(fp, KEY2)) == {"math"}
    finally:
        pruner.close()
        ours.close()


def test_an_uncontended_own_write_keeps_the_snapshot_without_reading_again(tmp_path, monkeypatch):
    """The point of the snapshot: our own write alone does not cost a re-read of the environment."""
    path = tmp_path / "db.sqlite"
    ours, fp, info = _seeded(path)
    try:
        ours.save(fp, info, KEY2, [meas("flash", 2e-3)])
        statements, real_read = [], ours._watched
        monkeypatch.setattr(ours, "_watched", lambda sql, *a, **kw: statements.append(sql) or real_read(sql, *a, **kw))
        assert set(ours.lookup_own(fp, KEY)) == {"math", "flash"} and set(ours.lookup_own(fp, KEY2)) == {"flash"}
        assert all("data_version" in s for s in statements)  # no SELECT of rows: the snapshot was current
    finally:
        ours.close()
