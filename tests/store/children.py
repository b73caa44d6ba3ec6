"""Child processes for the multi-process tests (run as ``python tests/store/children.py MODE ...``).

Each prints one JSON line on stdout (the last line) describing what it did."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def tune(lengths: list[int]) -> None:
    """Run autosdpa.sdpa on small CPU problems (tuning on first sight, saving into AUTOSDPA_DB)."""
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch

        torch.set_num_threads(1)
        import autosdpa
        from autosdpa import dispatch

        for L in lengths:
            q = torch.randn(1, 2, L, 16)
            autosdpa.sdpa(q, q, q)
        store = dispatch.get_store()
        measured = dispatch.dispatcher.measured_problems()
    print(json.dumps({"store": store.display_url, "measured": measured,
                      "warnings": [str(w.message) for w in caught if "autosdpa" in str(w.message)]}), flush=True)


def disk_full(limit: int) -> None:
    """The disk fills up while tuning: files may not grow past ``limit`` bytes (RLIMIT_FSIZE; SIGXFSZ ignored,
    so a write past it fails with EFBIG, which SQLite reports as a full disk). AUTOSDPA_DB is already tuned for
    L=8; new problems are tuned with the limit on."""
    import resource
    import signal

    warnings.simplefilter("always")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    import autosdpa

    with warnings.catch_warnings(record=True) as caught:
        q = torch.randn(1, 2, 8, 16)
        autosdpa.sdpa(q, q, q)  # a known problem: read from the database (opens it, -wal/-shm included)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        right = True
        for L in (32, 64, 128):
            q = torch.randn(1, 2, L, 16)
            right &= bool(torch.allclose(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q),
                                         atol=1e-5, rtol=1e-4))
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(json.dumps({"right": right, "warnings": [str(w.message) for w in caught if "autosdpa" in str(w.message)]}),
          flush=True)


def save_loop(url: str) -> None:
    """Save rows forever; after each committed save print its index (the parent SIGKILLs us)."""
    from autosdpa.store import Measurement, Store
    from autosdpa.problem import Problem

    from tests.store.helpers import env

    fp, info = env("crash test device")
    s = Store(url)
    i = int(os.environ.get("START", "0"))
    while True:
        key = Problem(lq=i + 1, lk=7).key
        s.save(fp, info, key, [Measurement(b, "ok", 1e-3 + i * 1e-9, 1e-6, 5, 0.0, "x" * 200, "q=(1,1,1,64)")
                               for b in ("math", "flash", "efficient")])
        print(i, flush=True)
        i += 1


def distributed(rank: int, world: int, init_file: str, shared_db: str, own_db: str) -> None:
    """Two gloo ranks whose own timings would pick different backends must still route the same way."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import autosdpa
    from autosdpa import dispatch
    from autosdpa.distributed import sync_decisions


    own_pick = ["math", "flash"][rank % 2]

    def rigged_choose(meas, names, torch_pick):  # this rank's "timings" favour its own pick
        return (own_pick if own_pick in names else names[0]), f"rank {rank} measured {own_pick} fastest"
    dispatch.choose = rigged_choose
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {"rank": rank, "own_pick": own_pick}

    # 1. ranks sharing one database agree through the decision table (first writer wins), no collective
    q = torch.randn(1, 2, 8, 16)
    autosdpa.sdpa(q, q, q)
    d = autosdpa.explain(q, q, q)
    out["shared"] = [d.backend, d.source, d.reason]
    dist.barrier()

    # 2. ranks with separate databases disagree until they call the collective sync_decisions()
    dispatch.dispatcher.configure(dataclasses.replace(dispatch.dispatcher.settings, db=own_db))
    q = torch.randn(1, 2, 16, 16)
    autosdpa.sdpa(q, q, q)
    out["separate_before"] = autosdpa.explain(q, q, q).backend
    out["synced"] = sync_decisions()
    autosdpa.sdpa(q, q, q)
    d = autosdpa.explain(q, q, q)
    out["separate_after"] = [d.backend, d.source]
    dist.destroy_process_group()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    mode = sys.argv[1]
    if mode == "tune":
        tune([int(x) for x in sys.argv[2].split(",")])
    elif mode == "disk_full":
        disk_full(int(sys.argv[2]))
    elif mode == "save_loop":
        save_loop(sys.argv[2])
    elif mode == "distributed":
        distributed(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
