"""Warm start reads rows of other environments of this hardware at a bounded cost, whatever a database holds
(issue 17, item 13): the NEAR_ENVIRONMENTS newest such environments, one statement for a problem's rows in
them, each read of a file under a budget of SQLite steps."""
from __future__ import annotations

import time
import warnings

import pytest
import torch

import autosdpa
import autosdpa.store as store_mod
from autosdpa.backends import Call
from autosdpa.dispatch import dispatcher
from autosdpa.problem import Problem
from autosdpa.store import NEAR_ENVIRONMENTS, Store

from .helpers import KEY, KEY2, env, many_environments_file, meas


def test_near_rows_come_from_the_newest_environments_of_the_same_hardware_only(any_db):
    here_fp, here = env(torch_version="9.0.0")
    s = Store(any_db)
    try:
        now = time.time()
        old_fp, old = env(torch_version="1.0.0")  # the oldest environment holds the newest row...
        s.save(old_fp, old, KEY, [meas("flash", 9e-3, at=now - 1)])
        for i in range(NEAR_ENVIRONMENTS):  # ...behind NEAR_ENVIRONMENTS newer ones
            s.save(*env(torch_version=f"2.{i}.0"), KEY, [meas("flash", (i + 1) * 1e-3, at=now - 1000 + i)])
        s.save(*env(device_name="Another GPU"), KEY, [meas("flash", 1e-6, at=now)])  # other hardware
        s.save(here_fp, here, KEY, [meas("flash", 2e-6, at=now)])  # this environment: not "near"
        s.save(*env(torch_version="2.0.0"), KEY2, [meas("math", 1e-3, at=now)])  # another problem
        got = s.near_rows({here_fp}, here, KEY)
        assert set(got) == {"flash"}
        row, where = got["flash"]
        assert row.median_s == NEAR_ENVIRONMENTS * 1e-3 and where["torch"] == f"2.{NEAR_ENVIRONMENTS - 1}.0"
    finally:
        s.close()


def _problem(L=24):
    q = torch.randn(1, 2, L, 8)
    return q, Problem.from_call(Call(q, q, q), dispatcher.settings.bucket_threshold).key


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A shared file of 10,000 environments of this very hardware, without a single index, holding rows of the
    test's first problem (flash ranked 2x ahead of math); and a list of the statements run on it."""
    q, key = _problem()
    path = tmp_path / "10k-environments.sqlite"
    many_environments_file(path, dispatcher.environments(q.device)["torch"][1], [key], n=10_000)
    assert path.stat().st_size > 3_000_000
    statements = []
    real_reader = store_mod._reader

    def reader(p, **kw):
        con = real_reader(p, **kw)
        if p == path:
            con.set_trace_callback(statements.append)
        return con
    monkeypatch.setattr(store_mod, "_reader", reader)
    monkeypatch.setenv("AUTOSDPA_SHARED_DBS", str(path))
    autosdpa.reset()
    return q, key, statements


def test_10000_environments_of_this_hardware_cost_a_few_statements(hostile):
    """Before: warm start read every environment one by one, 40,000 statements (40 s) for the first problem."""
    q, key, statements = hostile
    autosdpa.sdpa(q, q, q)
    scans = [s for s in statements if "FROM measurement" in s or "FROM environment" in s]
    assert scans and len(statements) <= 20 and len(scans) <= 4, scans  # inspect, this env's lookup, warm start
    rows = dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)
    assert rows["math"].status == "skipped" and "2.00x slower than flash" in rows["math"].detail  # it was used
    n = len(statements)
    q2, _ = _problem(L=40)
    autosdpa.sdpa(q2, q2, q2)  # the next new problem: its lookup and one warm-start statement
    assert [s for s in statements[n:] if "data_version" not in s and "FROM measurement" not in s] == [] \
        and len([s for s in statements[n:] if "FROM measurement" in s]) <= 1


def test_a_warm_start_read_over_its_budget_is_stopped_and_the_file_left_out(hostile, monkeypatch):
    """However large the file, a read stops at WARM_READ_BUDGET steps: the candidates are timed without its
    rows, one warning says so, and later problems do not read it for warm start again."""
    q, key, statements = hostile
    monkeypatch.setattr(store_mod, "WARM_READ_BUDGET", 20_000)  # far less than scanning 10,000 environments
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = autosdpa.sdpa(q, q, q)
        q2, _ = _problem(L=40)
        autosdpa.sdpa(q2, q2, q2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    said = [str(w.message) for w in caught if "warm start no longer reads" in str(w.message)]
    assert len(said) == 1 and "20,000 SQLite steps" in said[0]
    rows = dispatcher.store().lookup(dispatcher.environments(q.device)["torch"][0], key)
    assert rows["math"].status == "ok" and rows["flash"].status == "ok"  # both timed
    assert sum("FROM environment WHERE device_type" in s for s in statements) == 1  # never tried again
