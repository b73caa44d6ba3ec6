"""Launch geometry at sizes that could never be allocated (meta tensors), 64-bit offsets, the config pruner and
``ready()`` (may a call run during CUDA-graph capture?)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from autosdpa_kernels import _common, decode, flash
from autosdpa_kernels import configs as kconfigs
from autosdpa_kernels import launch as klaunch  # noqa: E402

pytestmark = [pytest.mark.triton]
MAX_X = 2**31 - 1
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_flash_grids_put_batch_times_heads_on_the_unbounded_axis():
    B, Hq, Hkv, L = 4096, 32, 8, 4096          # B*Hq = 131072: more than grid axes 1 and 2 allow
    q, k, v = meta(B, Hq, L, 128), meta(B, Hkv, L, 128), meta(B, Hkv, L, 128)
    fwd, pre, dkdv, dq = flash.launches(q, k, v, causal="top_left", enable_gqa=True, needs_grad=True)
    assert fwd.grid({"BLOCK_M": 128}) == (32 * B * Hq,)
    assert pre.grid({}) == (L // pre.meta["BLOCK_M"] * B * Hq,) and pre.meta["BLOCK_M"] == flash.PRE_BLOCK_M
    assert dkdv.grid({"BLOCK_N": 64}) == (64 * B * Hkv,)
    assert dq.grid({"BLOCK_M": 16}) == (256 * B * Hq,)
    for launch in (fwd, pre, dkdv, dq):
        for cfg in launch.candidates():
            grid = launch.grid(cfg.kwargs())
            assert len(grid) == 1 and 1 <= grid[0] <= MAX_X


def test_grid_too_large_for_cuda_raises_instead_of_launching():
    q = meta(1 << 16, 1 << 12, 1 << 9, 64)      # 2^28 (batch, head) pairs x 512 rows
    (fwd,) = flash.launches(q, q, q)
    assert fwd.grid({"BLOCK_M": 128}) == (4 << 28,)
    with pytest.raises(ValueError, match="CUDA allows"):
        fwd.grid({"BLOCK_M": 16})


def test_decode_grids_for_a_huge_batch():
    B, Hq, Hkv, Lk = 100_000, 32, 8, 8192
    (split,) = decode.launches(meta(B, Hq, 1, 128), meta(B, Hkv, Lk, 128), meta(B, Hkv, Lk, 128), enable_gqa=True)
    n_splits = split.args["NUM_SPLITS"]
    assert n_splits == 1 and not split.meta["SPLIT"]   # 800k (batch, kv head) pairs already fill the GPU
    assert split.grid({}) == (n_splits * B * Hkv,)
    (few,) = decode.launches(meta(1, Hq, 1, 128), meta(1, Hkv, Lk, 128), meta(1, Hkv, Lk, 128), enable_gqa=True)
    assert few.args["NUM_SPLITS"] * few.args["split_len"] >= Lk > (few.args["NUM_SPLITS"] - 1) * few.args["split_len"]
    assert few.grid({}) == (few.args["NUM_SPLITS"] * Hkv,) and few.meta["SPLIT"]


def test_strides_past_2_31_are_passed_as_64_bit():
    # 1M tokens, BLHD storage: the batch stride is 2^32 elements; Triton gives such arguments an i64 type
    q = meta(1, 1 << 20, 32, 128).transpose(1, 2)
    (fwd,) = flash.launches(q, q, q)
    assert fwd.args["stride_qb"] == 1 << 32 and fwd.args["stride_qm"] == 32 * 128
    key = dict(zip(fwd.args, klaunch.spec_key(fwd.args)))
    assert key["stride_qb"] == (False, True, False)   # not 1, multiple of 16, not 32-bit
    assert fwd.grid({"BLOCK_M": 128}) == ((1 << 20) // 128 * 32,)


def test_decode_workspace_follows_the_split_rule():
    q, k = meta(2, 32, 1, 128), meta(2, 8, 8192, 128)
    (split,) = decode.launches(q, k, k, enable_gqa=True)
    ws = split.args["PO"].numel() * 4 + split.args["PLSE"].numel() * 4
    assert decode.workspace_bytes(q, k, k) == ws
    # 132 SMs (H100/H200), 16 (batch, kv head) pairs: one wave is 9 splits of 911 keys, rounded up to 128-key
    # granules (16 under the interpreter): 8 splits of 1024 (9 of 912)
    want = (9, 912) if _common.interpreting() else (8, 1024)
    assert (split.args["NUM_SPLITS"], split.args["split_len"]) == want
    assert decode.split_plan(torch.device("meta"), 2, 8, 8192) == (split.args["NUM_SPLITS"], split.args["split_len"])


@pytest.mark.parametrize("B,Hkv,Lk", [(1, 8, 8192), (1, 1, 8192), (1, 8, 1000), (4, 8, 1 << 20), (1, 1, 1 << 20),
                                      (64, 8, 8192), (1, 8, 300)])
def test_decode_split_plan_fills_one_wave_with_enough_work_per_program(B, Hkv, Lk, monkeypatch):
    monkeypatch.setattr(decode, "_granule", lambda: decode.SPLIT_GRANULE)    # the GPU's tiles, here too
    sms, granule = decode.META_SMS, decode.SPLIT_GRANULE
    splits, split_len = decode.split_plan(torch.device("meta"), B, Hkv, Lk)
    assert split_len % granule == 0 and (splits - 1) * split_len < Lk <= splits * split_len
    assert B * Hkv * splits <= max(sms + B * Hkv - 1, B * Hkv)       # one wave of programs, rounded up
    if splits > 1:                                                   # every split pipelines a few tiles
        assert split_len >= decode.MIN_SPLIT_BLOCKS * granule
    want = {(1, 8, 8192): (16, 512),           # 4 tiles of 128 keys per program, 128 programs
            (1, 1, 1 << 20): (131, 8064),      # about one program per SM
            (1, 8, 300): (1, 384),             # too short to split
            (64, 8, 8192): (1, 8192)}          # 512 (batch, kv head) pairs fill the GPU: no split
    assert want.get((B, Hkv, Lk), (splits, split_len)) == (splits, split_len)


# ------------------------------------------------------------------------------------------------------------
# 64-bit offsets, for real: the interpreter evaluates the kernels' int32 arithmetic like the GPU (wrapping), so a
# mask whose last row (or column) sits past 2^31 elements is read correctly only with 64-bit block offsets. The
# mask is a strided view into a >2 GiB allocation of which only the touched pages are ever committed.
FAR = textwrap.dedent("""
    import importlib.util, os, sys, torch
    sys.path[:0] = [{here!r}]
    pkg = os.path.join({root!r}, "kernels", "autosdpa_kernels")
    spec = importlib.util.spec_from_file_location("autosdpa_kernels", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    ak = sys.modules["autosdpa_kernels"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ak)
    from kernel_ref import assert_close, make_qkv, reference
    decode, flash = ak.decode, ak.flash

    def far_mask(Lq, Lk, rows):
        n = Lq if rows else Lk
        stride = -(-(2**31 + 64) // (n - 1))
        assert stride < 2**24
        try:
            base = torch.empty((n - 1) * stride + max(Lq, Lk), dtype=torch.bool)
        except RuntimeError as e:
            print("SKIP", e); sys.exit(0)
        m = base.as_strided((Lq, Lk), (stride, 1) if rows else (1, stride))
        m.copy_(torch.rand(Lq, Lk, generator=torch.Generator().manual_seed(n)) > 0.3)
        m[:, 0] = True
        return m

    # 136 rows (or columns) with a stride under 2^24 (the in-tile limit): the last one starts past 2^31
    for Lq, Lk, rows in ((136, 20, True), (20, 136, False)):
        m = far_mask(Lq, Lk, rows)
        q, k, v = make_qkv(1, 1, 1, Lq, Lk, 16, requires_grad=True)
        out = flash.attention(q, k, v, attn_mask=m)
        ref = reference(q, k, v, m)
        assert_close(out, ref, torch.float32, what="fwd rows=%s" % rows)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
            assert_close(a, b, torch.float32, grad=True, what="grad rows=%s" % rows)
    m = far_mask(2, 136, False)
    q, k, v = make_qkv(1, 2, 1, 2, 136, 16)
    assert_close(decode.attention(q, k, v, attn_mask=m, enable_gqa=True, num_splits=2),
                 reference(q, k, v, m, enable_gqa=True), torch.float32, what="decode")
    print("OK")
""")


def test_offsets_past_2_31_elements_are_64_bit():
    env = dict(os.environ, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", FAR.format(here=HERE, root=ROOT)], capture_output=True, text=True,
                         env=env, timeout=300)
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve 2 GiB of address space here: {res.stdout.strip()}")
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout + res.stderr)[-3000:]


# ------------------------------------------------------------------------------------------------------------
# the config pruner
def test_tables_hold_at_most_three_configs_and_the_switch_keeps_one(monkeypatch):
    monkeypatch.setenv(kconfigs.CONFIGS_ENV, "all")
    for kind, tables in kconfigs.TABLES.items():
        for key, table in tables.items():
            assert 0 < len(table) <= kconfigs.MAX_PER_KEY, (kind, key)
    args = dict(d_pad=128, dv_pad=128, esize=2, precision="tf32", lq_bucket=4096, lk_bucket=4096)
    assert len(kconfigs.candidates("fwd", **args)) > 1
    monkeypatch.setenv(kconfigs.CONFIGS_ENV, "one")
    assert kconfigs.candidates("fwd", **args) == kconfigs.TABLES["fwd"][("s", "16")][:1]


def test_pruner_counts_the_mask_tile_and_the_device_limit(monkeypatch):
    monkeypatch.setenv(kconfigs.CONFIGS_ENV, "all")
    args = dict(d_pad=128, dv_pad=128, esize=2, precision="tf32", lq_bucket=4096, lk_bucket=4096)
    plain = kconfigs.candidates("fwd", **args)
    for c in plain:
        assert kconfigs.smem_bytes("fwd", c, 128, 128, 2, 4) > kconfigs.smem_bytes("fwd", c, 128, 128, 2, 1) \
            > kconfigs.smem_bytes("fwd", c, 128, 128, 2, 0)
    limit = max(kconfigs.smem_bytes("fwd", c, 128, 128, 2, 0) for c in plain) - 1
    fewer = kconfigs.candidates("fwd", **args, smem_limit=limit)
    assert len(fewer) < len(plain) and all(kconfigs.smem_bytes("fwd", c, 128, 128, 2) <= limit for c in fewer)
    assert kconfigs.candidates("fwd", **args, smem_limit=1024) == []


def test_small_problems_get_the_smallest_tile():
    got = kconfigs.candidates("fwd", d_pad=64, dv_pad=64, esize=2, precision="tf32", lq_bucket=16, lk_bucket=16)
    table = kconfigs.TABLES["fwd"][("s", "16")]
    assert got == [min(table, key=lambda c: (c.block_m * c.block_n, c.num_stages))]


# ------------------------------------------------------------------------------------------------------------
# ready(): has this call's kernel been compiled and autotuned in this process?
class _FakeKernel:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid({**kwargs, "BLOCK_M": 64, "BLOCK_N": 64}) if callable(grid) else grid  # as the autotuner
            self.calls.append((self.name, g, kwargs))
        return launch


class _FakeKernels:
    """Stands in for ``_flash_kernels``: records launches instead of compiling."""

    def __init__(self):
        self.calls = []
        self.AUTOTUNED = {k + tma: _FakeKernel(self.calls, "autotuned " + k + tma) for k in kconfigs.KINDS
                          for tma in ("", "_tma")}

    @staticmethod
    def desc_maker(t, rows, cols):
        return lambda x: ("descriptor", x, rows, cols)

    def __getattr__(self, name):
        return _FakeKernel(self.calls, name)


def test_ready_after_the_same_key_ran(monkeypatch):
    monkeypatch.setenv(kconfigs.CONFIGS_ENV, "all")
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    klaunch.forget()
    q, kv = meta(2, 8, 2048, 128), meta(2, 2, 2048, 128)
    assert not flash.ready(q, kv, kv, causal="top_left", enable_gqa=True)
    fake = _FakeKernels()
    for launch in flash.launches(q, kv, kv, causal="top_left", enable_gqa=True):
        klaunch.run(launch, fake)
    assert [c[0] for c in fake.calls] == ["autotuned fwd_tma"]      # a choice of configs: the autotuner
    assert flash.ready(q, kv, kv, causal="top_left", enable_gqa=True)
    assert flash.ready(meta(2, 8, 1900, 128), meta(2, 2, 1900, 128), meta(2, 2, 1900, 128), causal="top_left",
                       enable_gqa=True) is False                    # same bucket, other specialisation
    assert not flash.ready(q, kv, kv, causal="top_left", enable_gqa=True, needs_grad=True)   # backward not run
    mask = torch.empty(2, 1, 2048, 2048, device="meta", dtype=torch.bool)
    assert not flash.ready(q, kv, kv, attn_mask=mask, enable_gqa=True)


def test_ready_decode_and_the_one_config_switch(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    klaunch.forget()
    monkeypatch.setenv(kconfigs.CONFIGS_ENV, "one")
    q, kv = meta(4, 32, 1, 128), meta(4, 8, 8192, 128)
    assert not decode.ready(q, kv, kv, enable_gqa=True)
    fake = _FakeKernels()
    for launch in decode.launches(q, kv, kv, enable_gqa=True):
        klaunch.run(launch, fake)
    names = [c[0] for c in fake.calls]
    assert names == ["decode_split_kernel"]                            # one config: launched directly
    assert fake.calls[0][2]["BLOCK_N"] == kconfigs.TABLES["split"][("s", "16")][0].block_n
    assert decode.ready(q, kv, kv, enable_gqa=True)
    assert not decode.ready(q, kv, kv, enable_gqa=True, needs_grad=True)


def test_ready_is_true_under_the_interpreter():
    if not _common.interpreting():
        pytest.skip("CPU interpreter only")
    x = torch.randn(1, 2, 16, 16)
    assert flash.ready(x, x, x) and decode.ready(x[:, :, :1], x, x)


def test_backend_ready_hook():
    from autosdpa.backends.base import Call
    from autosdpa.backends.triton import TritonDecode, TritonFlash
    x = torch.randn(1, 2, 16, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    if _common.interpreting():
        assert TritonFlash().ready(Call(x, x, x)) and TritonDecode().ready(Call(x[:, :, :1], x, x))
    assert not TritonFlash().ready(Call(x, x, x, dropout_p=0.5))      # ineligible: never "ready"


def test_row_strides_too_large_for_32_bit_tile_offsets_are_reported():
    q = meta(1, 1, 4, 16)
    wide = meta(1, 1, 4, 1 << 25)[..., :4]            # mask rows 2^25 elements apart
    assert any("row stride" in r for r in flash.not_supported_reasons(q, q, q, attn_mask=wide))
    assert not any("row stride" in r for r in flash.not_supported_reasons(q, q, q))


def test_argument_names_match_the_kernels():
    import importlib
    fk = importlib.import_module("autosdpa_kernels._flash_kernels")
    dk = importlib.import_module("autosdpa_kernels._decode_kernels")

    def runtime(fn):
        fn = getattr(fn, "fn", fn)
        return tuple(p.name for p in fn.params if not p.is_constexpr) if hasattr(fn, "params") else None

    for fn, names in ((fk.attn_fwd_kernel, flash.FWD_ARGS), (fk.bwd_preprocess_kernel, flash.PRE_ARGS),
                      (fk.attn_bwd_dkdv_kernel, flash.DKDV_ARGS), (fk.attn_bwd_dq_kernel, flash.DQ_ARGS),
                      (dk.decode_split_kernel, decode.SPLIT_ARGS)):
        got = runtime(fn)
        if got is None:   # the interpreter's wrapper: read the Python signature
            import inspect
            anns = inspect.signature(fn.fn).parameters.values()
            got = tuple(p.name for p in anns if "constexpr" not in str(p.annotation))
        assert got == names, fn
