"""Kernel launches described as data, then run: one code path for running, the compile check and ``ready()``.

A ``Launch`` holds everything a kernel launch needs except the tile config: kernel name, runtime arguments
(by name, in the kernel's order), constexpr arguments and the grid rule. ``flash.launches()`` and
``decode.launches()`` build them for a call (on meta tensors too: nothing is allocated or launched), so tests
can check grids at sizes that could never be allocated and ``scripts/compile_kernels.py`` compiles exactly
what would be launched. No triton import here: ``run()`` gets the kernel module from its caller.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import configs as CF
from . import _common as C

MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2 allow only 65,535)

#: Per tuned kernel kind, the arguments it may take as TMA tensor descriptors and the constexpr giving each
#: one's box rows (the box is one tile: (1, 1, rows, padded head dim)).
DESC_ROWS = {"fwd": (("Q", "BLOCK_M"), ("K", "BLOCK_N"), ("V", "BLOCK_N"), ("O", "BLOCK_M")),
             "split": (("K", "BLOCK_N"), ("V", "BLOCK_N"))}

#: keys (``Launch.key()``) of the launches this process has run: compiled, and autotuned for their key.
_LAUNCHED: set = set()


def forget() -> None:
    """Forget every recorded launch: ``ready()`` is False again until each key runs anew (tests)."""
    _LAUNCHED.clear()


def flat_grid(n_blocks: int, batch: int) -> tuple[int]:
    """One flat grid axis of ``n_blocks * batch`` programs, blocks fastest (programs running together then
    share K/V in L2). A grid that cannot be launched raises here instead of failing on the device."""
    n = int(n_blocks) * int(batch)
    if n > MAX_GRID_X:
        raise ValueError(f"launch needs {n} programs ({n_blocks} blocks x {batch}); CUDA allows {MAX_GRID_X} "
                         f"on its only unbounded grid axis")
    return (max(1, n),)


def spec_key(args: dict, exact: tuple = ()) -> tuple:
    """What Triton specialises a compiled kernel on, conservatively: tensor dtype and 16-byte alignment, and
    for each int whether it is 1, a multiple of 16 and 32-bit; ints named in ``exact`` (autotune keys) by
    value. Two launches with equal keys reuse one compiled (and autotuned) kernel. On every launch: keep it
    cheap."""
    out = []
    add = out.append
    for name, a in args.items():
        t = type(a)
        if t is int:
            add(a if name in exact else (a == 1, a % 16 == 0, -2147483648 <= a <= 2147483647))
        elif t is float:
            add(float)
        elif isinstance(a, torch.Tensor):
            add((a.dtype, a.data_ptr() % 16 == 0))
        else:
            add(a)
    return tuple(out)


@dataclasses.dataclass
class Launch:
    kernel: str                 # name of the @triton.jit function in the kernel module
    tune: str | None            # config table kind (``configs.KINDS``); None: ``fixed`` config
    args: dict                  # runtime arguments by name, in the kernel's order
    meta: dict                  # constexpr arguments, tuned tile sizes excluded
    length: int                 # extent cut into blocks of size ``cfg[block]`` (or a block count if block="")
    block: str                  # "BLOCK_M", "BLOCK_N" or "" (``length`` is already a block count)
    batch: int                  # programs per block
    tune_key: tuple = ()        # int arguments the autotuner keys on
    fixed: CF.Cfg | None = None
    #: arguments passed as rank-4 TMA tensor descriptors: (name, constexpr giving the box's rows, box columns);
    #: ``args`` keep the tensors (descriptors are made per launch, for the config's tile)
    descs: tuple = ()

    def grid(self, kwargs: dict) -> tuple[int]:
        """The grid for a config's tile sizes (``kwargs``; a fixed kernel's are in ``meta``)."""
        n = C.cdiv(self.length, {**self.meta, **kwargs}[self.block]) if self.block else self.length
        return flat_grid(n, self.batch)

    def candidates(self, smem_limit: int = CF.H100_SMEM_PER_BLOCK, mode: str | None = None):
        """Configs worth trying for this launch (the fixed one for untuned kernels)."""
        if self.tune is None:
            return [self.fixed]
        return CF.candidates_for(self.tune, {**self.args, **self.meta}, smem_limit, mode)

    def key(self) -> tuple:
        return (self.kernel, tuple(self.meta.items()), spec_key(self.args, self.tune_key))

    def launched(self) -> bool:
        """Whether this process already ran a launch with this key (so running it now compiles nothing)."""
        return self.key() in _LAUNCHED

    def without_tma(self) -> "Launch":
        """The same launch on the pointer path (for tensors a descriptor cannot describe)."""
        return dataclasses.replace(self, meta={**self.meta, "TMA": False}, descs=())

    def call_args(self, kmod, kwargs: dict) -> list:
        """The argument values as the kernel takes them with a config's tile sizes (descriptors built)."""
        values = list(self.args.values())
        for i, make in _desc_makers(self, kmod, kwargs):
            values[i] = make(values[i])
        return values


def _desc_makers(launch: Launch, kmod, kwargs: dict) -> list:
    """(argument index, tensor -> descriptor) for each argument passed as a descriptor, boxes sized for the
    config ``kwargs`` (the autotuner's config hook resizes them per config)."""
    names = list(launch.args)
    tiles = {**launch.meta, **kwargs}
    return [(names.index(name), kmod.desc_maker(launch.args[name], tiles[rows], cols))
            for name, rows, cols in launch.descs]


@functools.lru_cache(maxsize=None)
def smem_limit(device: torch.device) -> int:
    """Dynamic shared memory one block may use on this device (the H100/H200 figure off CUDA)."""
    if device.type != "cuda":
        return CF.H100_SMEM_PER_BLOCK
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", CF.H100_SMEM_PER_BLOCK))


def _launcher(launch: Launch, kmod):
    """A function of the launch's runtime arguments (in order) that launches on the current stream: the
    interpreter's fixed tile, a single candidate directly, or the autotuned kernel (``kmod.AUTOTUNED[kind]``)
    when there is a choice."""
    if launch.tune is not None and C.interpreting():
        cands = [CF.INTERPRET[launch.tune]]
    elif launch.tune is not None:
        dev = next(a.device for a in launch.args.values() if isinstance(a, torch.Tensor))
        cands = launch.candidates(smem_limit(dev))
        if not cands:
            raise RuntimeError(f"{launch.kernel}: no tile config fits this device's shared memory")
    else:
        cands = [launch.fixed]
    kw = cands[0].kwargs()
    if len(cands) == 1:
        c = cands[0]
        start = functools.partial(getattr(kmod, launch.kernel)[launch.grid(kw)], **launch.meta, **kw,
                                  num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        # the grid rule of a copy without the arguments: a runner keeps this partial, and must not keep tensors
        # alive
        grid = dataclasses.replace(launch, args={}, descs=()).grid
        start = functools.partial(kmod.AUTOTUNED[launch.tune + ("_tma" if launch.descs else "")][grid],
                                  **launch.meta)
    return _with_descs(launch, kmod, start, kw) if launch.descs else start


def _with_descs(launch: Launch, kmod, start, kwargs):
    """``start`` taking tensors where it takes descriptors: each launch wraps them (cheaply: the shapes and
    strides are the template's), or, when one of them is not 16-byte aligned (a runner's later input may not
    be), launches the pointer-path twin instead."""
    makers = _desc_makers(launch, kmod, kwargs)
    twin = _launcher(launch.without_tma(), kmod)   # compiles nothing until it runs

    def go(*args):
        if any(args[i].data_ptr() % 16 for i, _ in makers):
            return twin(*args)
        args = list(args)
        for i, make in makers:
            args[i] = make(args[i])
        return start(*args)
    return go


def run(launch: Launch, kmod) -> None:
    """Launch on the current stream (see ``_launcher``) and record it for ``ready()``."""
    _launcher(launch, kmod)(*launch.args.values())
    _LAUNCHED.add(launch.key())


def bind(launch: Launch, kmod):
    """``run`` split in two for callers that launch again and again with the same shapes, strides, dtypes and
    device: the config, grid and compiled-kernel key are worked out once here; the returned function launches
    with the template's arguments updated by ``changes`` (name -> value: the tensors, the scale). Recorded for
    ``ready()`` on its first launch (under the template's key: a later call with other pointer alignments is
    then "not ready", which is the safe answer). Every tensor argument must be among the ``changes``: the
    template keeps none (a KV cache freed by its owner must not stay alive in a cached runner)."""
    start = _launcher(launch, kmod)
    key = launch.key()
    template = {n: None if isinstance(a, torch.Tensor) else a for n, a in launch.args.items()}
    recorded = False

    def go(changes: dict) -> None:
        nonlocal recorded
        start(*{**template, **changes}.values())
        if not recorded:
            _LAUNCHED.add(key)
            recorded = True
    return go


def bind_by_sign(launch: Launch, kmod):
    """``bind`` for both signs of the softmax scale: (positive, negative). The folded scale needs a positive
    one; a negative scale, which F.sdpa allows, runs the kernel variant that scales first (``NEG_SCALE``),
    bound now and compiled only if ever launched."""
    return tuple(bind(dataclasses.replace(launch, meta={**launch.meta, "NEG_SCALE": neg}), kmod)
                 for neg in (False, True))
