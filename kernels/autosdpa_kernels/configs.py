"""Autotune configurations of the Triton kernels and the rules that prune them (no triton import).

A config is ``Cfg(block_m, block_n, num_warps, num_stages)`` (``block_m`` is None for the decode split kernel,
whose row block is the packed query group). Each kernel kind has a short table per head-dim class and operand
class, best first, at most ``MAX_PER_KEY`` entries; the tables were chosen from compiled sm_90a data
(``scripts/compile_kernels.py``, ``benchmarks/kernels_compile_sm90.md``): no register spills, shared memory
inside an H100's limit. ``candidates()`` then drops what cannot fit this problem and device.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

H100_SMEM_PER_BLOCK = 232_448   # sm_90 opt-in dynamic shared memory per block (H100 and H200)
MAX_PER_KEY = 3
KINDS = ("fwd", "dkdv", "dq", "split")
#: "one": every kernel uses the first config its table keeps (no autotuning); tests and the device check use it.
CONFIGS_ENV = "AUTOSDPA_KERNEL_CONFIGS"


def config_mode() -> str:
    """'all' (default: autotune over the kept configs) or 'one' (``AUTOSDPA_KERNEL_CONFIGS=one``)."""
    return "one" if os.environ.get(CONFIGS_ENV, "").strip().lower() == "one" else "all"


class Cfg(NamedTuple):
    block_m: int | None     # None: not a tuned tile size (the decode split kernel's row block is the query group)
    block_n: int | None
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return {k: v for k, v in (("BLOCK_M", self.block_m), ("BLOCK_N", self.block_n)) if v is not None}

    def label(self) -> str:
        tile = "x".join(str(b) for b in (self.block_m, self.block_n) if b is not None)
        return f"{tile + ' ' if tile else ''}w{self.num_warps} s{self.num_stages}"


def head_class(d_pad: int, dv_pad: int) -> str:
    """s: padded head dims <= 128, m: 256, l: 512."""
    d = max(d_pad, dv_pad)
    return "s" if d <= 128 else ("m" if d <= 256 else "l")


def operand_class(esize: int, precision: str) -> str:
    """'16' (fp16/bf16 tiles), 'tf32' (fp32 tiles, TF32 dots) or 'ieee' (fp32 tiles, exact fp32 dots)."""
    if esize <= 2:
        return "16"
    return "ieee" if precision == "ieee" else "tf32"


def table_key(kind: str, d_pad: int, dv_pad: int, esize: int, precision: str, block_m: int | None = None):
    """(head class, operand class); the decode split kernel's classes get a "w" when its packed query rows
    reach 64 (wgmma tiles, far more registers per program)."""
    hcls = head_class(d_pad, dv_pad)
    if kind == "split" and (block_m or 0) >= 64:
        hcls += "w"
    return hcls, operand_class(esize, precision)


def _t(*rows):
    return [Cfg(*r) for r in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (head class, operand class), best first (the first is the one
# AUTOSDPA_KERNEL_CONFIGS=one uses). Every entry compiled for sm_90a without register spills, with and without
# a mask (benchmarks/kernels_compile_sm90.md); a key with no such config is absent, and the kernel then
# reports why in its not_supported_reasons (e.g. exact fp32 dots, or 128 packed decode rows at head dim 512).
TABLES: dict[str, dict[tuple[str, str], list[Cfg]]] = {
    "fwd": {
        ("s", "16"): _t((128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)),
        ("s", "tf32"): _t((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2)),
        ("s", "ieee"): _t((16, 16, 8, 1), (32, 16, 4, 2), (16, 16, 4, 1)),
        ("m", "16"): _t((128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3)),
        ("m", "tf32"): _t((64, 16, 8, 2), (16, 32, 8, 2), (16, 16, 8, 1)),
        ("m", "ieee"): _t((32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 1)),
        ("l", "16"): _t((32, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 1)),
        ("l", "tf32"): _t((32, 16, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1)),
        ("l", "ieee"): _t((16, 16, 8, 2), (16, 16, 8, 1)),
    },
    "dkdv": {
        # 32-row Q steps: the transposed dots are m64n32 wgmma (16-row steps made them m64n8)
        ("s", "16"): _t((32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 2)),
        ("s", "tf32"): _t((32, 32, 8, 2), (32, 32, 4, 1), (16, 32, 4, 2)),
        ("m", "16"): _t((16, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 1)),
        ("m", "tf32"): _t((32, 16, 8, 2), (16, 16, 8, 1), (16, 32, 8, 1)),
        ("m", "ieee"): _t((16, 16, 8, 1),),
        ("l", "16"): _t((16, 16, 8, 2), (16, 16, 8, 1)),
        ("l", "ieee"): _t((16, 16, 8, 1),),
    },
    "dq": {
        ("s", "16"): _t((128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)),
        ("s", "tf32"): _t((128, 32, 8, 3), (64, 32, 8, 2), (64, 16, 4, 3)),
        ("s", "ieee"): _t((16, 16, 8, 1),),
        ("m", "16"): _t((64, 32, 8, 3), (32, 32, 8, 2), (64, 16, 8, 2)),
        ("m", "tf32"): _t((32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 1)),
        ("m", "ieee"): _t((32, 16, 8, 2), (16, 16, 8, 2), (16, 16, 8, 1)),
        ("l", "16"): _t((16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)),
        ("l", "tf32"): _t((16, 16, 8, 2), (16, 16, 16, 2)),
        ("l", "ieee"): _t((16, 16, 8, 2), (16, 16, 8, 1)),
    },
    "split": {   # "w": 64 or more packed query rows per program
        ("s", "16"): _t((None, 128, 4, 3), (None, 64, 8, 2), (None, 64, 8, 3)),
        ("s", "tf32"): _t((None, 128, 8, 2), (None, 64, 8, 2), (None, 32, 8, 2)),
        ("s", "ieee"): _t((None, 64, 4, 4), (None, 16, 4, 1)),
        ("m", "16"): _t((None, 64, 8, 2), (None, 64, 8, 3), (None, 64, 4, 3)),
        ("m", "tf32"): _t((None, 32, 4, 2), (None, 16, 4, 1)),
        ("m", "ieee"): _t((None, 32, 8, 2), (None, 16, 8, 2), (None, 16, 4, 1)),
        ("l", "16"): _t((None, 32, 4, 2), (None, 16, 8, 2), (None, 16, 4, 1)),
        ("l", "tf32"): _t((None, 16, 8, 1), (None, 32, 8, 1), (None, 16, 4, 1)),
        ("l", "ieee"): _t((None, 16, 4, 1),),
        ("sw", "16"): _t((None, 128, 8, 3), (None, 64, 8, 3), (None, 128, 8, 2)),
        ("sw", "tf32"): _t((None, 64, 8, 2), (None, 32, 8, 2), (None, 16, 8, 2)),
        ("mw", "16"): _t((None, 64, 8, 2), (None, 32, 8, 2), (None, 16, 8, 2)),
        ("mw", "tf32"): _t((None, 16, 8, 2),),
    },
}


#: Keys whose launches with TMA descriptors need other configs than ``TABLES`` gives (empty: no descriptors
#: for this key, the pointer path runs). Elsewhere the tables compile without spills on both paths. At head dim
#: 512 the forward's pointer-path tiles spill with descriptors, and 64x16 w8 s2 (wgmma) spills without them.
TMA_TABLES: dict[str, dict[tuple[str, str], list[Cfg]]] = {
    "fwd": {("l", "16"): _t((64, 16, 8, 2),), ("l", "tf32"): []},
    "split": {("l", "tf32"): _t((None, 16, 4, 1),)},
}


def key_table(kind: str, key: tuple, tma: bool = False) -> list[Cfg]:
    """The configs of one key (``table_key``), for launches with (``tma``) or without tensor descriptors."""
    if tma and key in TMA_TABLES.get(kind, {}):
        return TMA_TABLES[kind][key]
    return TABLES[kind].get(key, [])


def tma_offered(kind: str, d_pad: int, dv_pad: int, esize: int, precision: str, block_m: int | None = None) -> bool:
    """Whether this key has configs for launches with descriptors."""
    return bool(key_table(kind, table_key(kind, d_pad, dv_pad, esize, precision, block_m), tma=True))


def all_configs(kind: str) -> list[Cfg]:
    """Every config any key of this kind may use (the list handed to ``triton.autotune``), no duplicates."""
    tables = [*TABLES[kind].values(), *TMA_TABLES.get(kind, {}).values()]
    return list(dict.fromkeys(c for t in tables for c in t))


#: what TMA adds to a kernel's shared memory: its mbarriers, and the padding that aligns the swizzled tiles
#: after them to 1 KiB
TMA_SMEM = 1024


def smem_bytes(kind: str, cfg: Cfg, d_pad: int, dv_pad: int, esize: int, mask_esize: int = 0,
               block_m: int | None = None, tma: bool = False) -> int:
    """Shared memory a config allocates, an upper bound fitted to what the compiled sm_90a kernels report
    (``benchmarks/kernels_compile_sm90.md``, "smem (model)"): the tile that stays resident (fed to tensor-core
    dots from shared memory), ``num_stages`` buffers of each tile loaded in the loop, ``num_stages - 1``
    buffers of the attention-mask tile (it is consumed a stage later; dK/dV: ``num_stages``), for dK/dV the
    per-row log-sum-exp and delta vectors and, unpipelined, a transposed Q tile; at least the fp32
    accumulator, which the epilogue may stage through shared memory; with ``tma``, ``TMA_SMEM`` more."""
    bm = cfg.block_m if cfg.block_m is not None else block_m
    bn, st = cfg.block_n, max(1, cfg.num_stages)
    dd = d_pad + dv_pad
    extra, mask_bufs = 0, st - 1
    if kind == "dkdv":
        extra = (st + 1) * bm * 8 + (bm * max(d_pad, dv_pad) * esize if st == 1 else 0)
        mask_bufs = st
    resident, looped, acc = {"fwd": (bm * d_pad, bn * dd, bm * dv_pad), "split": (bm * d_pad, bn * dd, bm * dv_pad),
                             "dkdv": (bn * dd, bm * dd, bn * max(d_pad, dv_pad)),
                             "dq": (bm * dd, bn * dd, bm * d_pad)}[kind]
    total = (resident + st * looped) * esize + mask_bufs * bm * bn * mask_esize + extra
    return max(total, acc * 4) + (TMA_SMEM if tma else 0)


def candidates(kind: str, *, d_pad: int, dv_pad: int, esize: int, precision: str, mask_esize: int = 0,
               lq_bucket: int = 1 << 30, lk_bucket: int = 1 << 30, block_m: int | None = None,
               smem_limit: int = H100_SMEM_PER_BLOCK, mode: str | None = None, table=None,
               tma: bool = False) -> list[Cfg]:
    """The configs worth trying for one autotune key, best first; empty when none can fit. ``table``
    replaces the key's table (the compile script explores with it)."""
    mode = mode or config_mode()
    if table is None:  # every launch asks: remember the answer
        return list(_cached_candidates(kind, d_pad, dv_pad, esize, precision, mask_esize, lq_bucket, lk_bucket,
                                       block_m, smem_limit, mode, tma))
    return _candidates(kind, d_pad, dv_pad, esize, mask_esize, lq_bucket, lk_bucket, block_m, smem_limit, mode,
                       table, tma)


@functools.lru_cache(maxsize=4096)
def _cached_candidates(kind, d_pad, dv_pad, esize, precision, mask_esize, lq_bucket, lk_bucket, block_m,
                       smem_limit, mode, tma) -> tuple:
    configs = key_table(kind, table_key(kind, d_pad, dv_pad, esize, precision, block_m), tma)
    return tuple(_candidates(kind, d_pad, dv_pad, esize, mask_esize, lq_bucket, lk_bucket, block_m, smem_limit,
                             mode, configs, tma))


def _candidates(kind, d_pad, dv_pad, esize, mask_esize, lq_bucket, lk_bucket, block_m, smem_limit, mode,
                table, tma) -> list[Cfg]:
    kept = [c for c in table
            if smem_bytes(kind, c, d_pad, dv_pad, esize, mask_esize, block_m, tma) <= smem_limit]
    # tiles larger than the (bucketed) problem only waste work; keep the smallest such tile
    small = [c for c in kept
             if (c.block_m is None or c.block_m <= max(16, lq_bucket)) and c.block_n <= max(16, lk_bucket)]
    if not small and kept:
        small = [min(kept, key=lambda c: ((c.block_m or 1) * c.block_n, c.num_stages))]
    kept = small[:MAX_PER_KEY]
    if mode == "one":
        kept = kept[:1]
    return kept


def candidates_for(kind: str, a: dict, smem_limit: int = H100_SMEM_PER_BLOCK, mode: str | None = None,
                   table=None) -> list[Cfg]:
    """``candidates`` for a launch's arguments (runtime and constexpr, by name), as the autotune pruner sees them."""
    esize = getattr(a["Q"], "base", a["Q"]).element_size()   # (the tensor of a TMA descriptor)
    mask_esize = a["Msk"].element_size() if a.get("MASK_KIND") else 0
    if kind == "split":
        lq, lk, bm = 1 << 30, a["split_len"], a["BLOCK_M"]
    else:
        lq, lk, bm = a["Q_BUCKET"], a["K_BUCKET"], None
    return candidates(kind, d_pad=a["D_PAD"], dv_pad=a["DV_PAD"], esize=esize, precision=a["PRECISION"],
                      mask_esize=mask_esize, lq_bucket=lq, lk_bucket=lk, block_m=bm, smem_limit=smem_limit,
                      mode=mode, table=table, tma=bool(a.get("TMA")))


#: The interpreter (CPU tests) runs one small tile: it is slow and has no autotuner.
INTERPRET = {"fwd": Cfg(16, 16, 4, 1), "dkdv": Cfg(16, 16, 4, 1), "dq": Cfg(16, 16, 4, 1),
             "split": Cfg(None, 16, 4, 1)}


#: Wider lists the compile script explores (``--explore``) to choose the tables from compiled data.
EXPLORE = {
    "fwd": _t((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 4, 3),
              (128, 32, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 3), (64, 64, 8, 2),
              (64, 32, 4, 4), (64, 32, 8, 3), (64, 32, 4, 2), (64, 16, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1),
              (32, 16, 4, 2), (16, 16, 4, 1)),
    "dkdv": _t((64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3),
               (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 4, 3), (16, 64, 4, 2),
               (16, 32, 4, 2), (16, 32, 8, 3), (32, 32, 4, 1), (16, 32, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1)),
    "dq": _t((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
             (64, 32, 4, 3), (64, 32, 8, 2), (64, 16, 4, 3), (64, 16, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1),
             (32, 16, 8, 1), (16, 16, 4, 1)),
    "split": _t((None, 128, 8, 3), (None, 128, 8, 2), (None, 128, 4, 3), (None, 64, 8, 3), (None, 64, 4, 4),
                (None, 64, 4, 3), (None, 64, 8, 2), (None, 32, 8, 3), (None, 32, 4, 4), (None, 32, 8, 2),
                (None, 32, 4, 2), (None, 16, 8, 2), (None, 16, 4, 1)),
}


def _no_table_reason(kind, ocls, query, value, rows) -> str:
    what = f"head dims {query.shape[-1]}/{value.shape[-1]}" + (f", {rows} packed query rows" if kind == "split"
                                                                else "")
    if ocls == "ieee":
        return (f"fp32 exact (ieee) dots are not offered for {what} ({kind}): every config spills registers "
                "(allow TF32 with torch.backends.cuda.matmul.allow_tf32 = True, or use another backend)")
    return f"no {kind} tile config runs {what} in {query.dtype} without spilling registers"


def config_reasons(kinds, query, key, value, attn_mask, smem_limit: int, precision: str | None = None) -> list[str]:
    """Why no tile config can run these inputs (empty when every kernel in ``kinds`` has one); ``precision``:
    the dots' input precision (default: what a call would use now, per ``allow_tf32``)."""
    from . import _common as C
    d_pad, dv_pad = max(16, C.next_pow2(query.shape[-1])), max(16, C.next_pow2(value.shape[-1]))
    precision = precision or C.dot_precision(query.dtype)
    esize = query.element_size()
    mask_esize = attn_mask.element_size() if attn_mask is not None else 0
    rows = max(16, C.next_pow2(query.shape[1] // max(1, key.shape[1]) * query.shape[2]))  # decode's packed rows
    reasons = []
    for kind in kinds:
        hcls, ocls = table_key(kind, d_pad, dv_pad, esize, precision, rows)
        if not TABLES[kind].get((hcls, ocls)):
            reasons.append(_no_table_reason(kind, ocls, query, value, rows))
        elif not candidates(kind, d_pad=d_pad, dv_pad=dv_pad, esize=esize, precision=precision,
                            mask_esize=mask_esize, smem_limit=smem_limit, mode="all", block_m=rows):
            reasons.append(f"no {kind} tile config fits {smem_limit} B of shared memory (head dims "
                           f"{query.shape[-1]}/{value.shape[-1]}, {query.dtype})")
    return reasons
