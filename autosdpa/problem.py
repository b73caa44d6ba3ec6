"""The problem: a canonical, bucketed, human-readable description of one attention call.

Its ``key`` is what the store keeps, e.g.
``fwd|bf16|B=8|Hq=32|Hkv=8|Lq=1024|Lk=1024|D=128|Dv=128|causal|mask=none|drop=0|gqa=1|layout=bhld|det=0``.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from .config import parse_bucketing  # noqa: F401  (re-exported)
from .backends.base import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, PADDED, STRUCTURES, Call

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_CAUSAL_WORDS = {CAUSAL_NONE: "nocausal", CAUSAL_TOP_LEFT: "causal", CAUSAL_BOTTOM_RIGHT: "causal_br"}
LAYOUTS = ("bhld", "blhd", "strided", "nd3", "nd5+", "jagged")
_MASK_RE = re.compile(r"^(none|(bool|float):[B1][H1][Q1][K1])$")


#: Query lengths up to this are decode-like: their key lengths are bucketed from 1 (no exact lengths up to the
#: threshold), since a decode loop sees every Lk once and an exact bucket per step would re-tune 16 times.
DECODE_LQ = 16


def bucket(n: int, threshold: int | None = 16) -> int:
    """Sizes up to ``threshold`` stay exact; above it, round up to the next power of two."""
    if threshold is None or n <= threshold:
        return n
    return 1 << (n - 1).bit_length()


def layout_class(t: torch.Tensor) -> str:
    """The ``layout=`` field of the key: 3-D, 5-D and more, or for 4-D: contiguous, BLHD-strided, other."""
    if t.dim() == 3:
        return "nd3"
    if t.dim() != 4:
        return "nd5+"
    if t.is_contiguous():
        return "bhld"
    if t.transpose(1, 2).is_contiguous():
        return "blhd"
    return "strided"


def _mask_kind(call: Call) -> str:
    m = call.dense_mask
    if m is None:
        return "none"
    kind = "bool" if m.dtype == torch.bool else "float"
    if call.query.dim() == 3:  # (N, L, E): the mask broadcasts to (N, Lq, Lk); there is no head dim
        s3 = (1,) * max(0, 3 - m.dim()) + tuple(m.shape[-3:])
        shape = (s3[0], 1, s3[1], s3[2])
    else:  # leading dims fold into one batch dim, as for q
        full = (1,) * max(0, call.query.dim() - m.dim()) + tuple(m.shape)
        shape = (math.prod(full[:-3]), *full[-3:])
    pattern = "".join(c if s != 1 else "1" for c, s in zip("BHQK", shape))
    return f"{kind}:{pattern}"


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of the problem key: the Problem attribute, how it is written in the key, and its name in
    shape specs (``autosdpa tune --shape``). The key is the fields in this order, joined by ``|``."""

    attr: str
    label: str | None            # "B" -> "B=8"; None -> a bare word (direction, dtype, causal kind)
    spec: str                    # name in shape specs
    help: str
    words: tuple[tuple[object, str], ...] = ()  # value <-> word, for enumerations written as words
    optional: bool = False       # written only when it differs from the default (keys of older files stay)

    def format(self, value) -> str:
        if self.words:
            text = dict(self.words)[value]
        elif isinstance(value, bool):
            text = str(int(value))
        else:
            text = str(value)
        return text if self.label is None else f"{self.label}={text}"

    def parse(self, part: str):
        if self.label is not None:
            name, eq, part = part.partition("=")
            if name != self.label or not eq:
                raise ValueError(f"expected {self.label}=...")
        if self.words:
            for value, word in self.words:
                if word == part:
                    return value
            raise ValueError(f"{part!r} is not one of {', '.join(w for _, w in self.words)}")
        kind = type(getattr(Problem, self.attr))  # the dataclass default's type
        if kind is bool:
            if part not in ("0", "1"):
                raise ValueError(f"{self.label} must be 0 or 1")
            return part == "1"
        if kind is int:
            if not part.isdigit() or len(part) > 10:
                raise ValueError(f"{self.label} must be a positive integer")
            return int(part)
        return part


def _words(mapping: dict) -> tuple:
    return tuple(mapping.items())


FIELDS: tuple[Field, ...] = (
    Field("train", None, "train", "forward only (fwd) or forward + backward (fwdbwd)",
          _words({False: "fwd", True: "fwdbwd"})),
    Field("dtype", None, "dtype", "fp16 | bf16 | fp32 | fp64", _words({d: d for d in DTYPES})),
    Field("batch", "B", "b", "batch (all leading dims folded)"),
    Field("hq", "Hq", "hq", "query heads"),
    Field("hkv", "Hkv", "hkv", "key/value heads"),
    Field("lq", "Lq", "lq", "query length"),
    Field("lk", "Lk", "lk", "key/value length"),
    Field("d", "D", "d", "head dim of q and k"),
    Field("dv", "Dv", "dv", "head dim of v"),
    Field("causal", None, "causal", "nocausal | causal (top-left, is_causal=True) | causal_br (bottom-right)",
          _words(_CAUSAL_WORDS)),
    Field("mask", "mask", "mask", "none | bool:PATTERN | float:PATTERN, PATTERN of B/H/Q/K with 1 for broadcast"),
    Field("dropout", "drop", "dropout", "dropout_p > 0"),
    Field("gqa", "gqa", "gqa", "enable_gqa=True"),
    Field("layout", "layout", "layout", " | ".join(LAYOUTS)),
    Field("deterministic", "det", "det", "deterministic algorithms on"),
    Field("tokens", "tok", "tokens", "jagged (NestedTensor) inputs: total query tokens, bucketed", optional=True),
    Field("structure", "struct", "struct", "the mask's structure (" + " | ".join(STRUCTURES) + "), if it has one",
          _words({w: w for w in ("none", *STRUCTURES)}), optional=True),
    Field("fill", "fill", "fill", "padded structures: valid keys in quarters (1: <= 25% ... 4: > 75%)",
          optional=True),
)


@dataclasses.dataclass(frozen=True)
class Problem:
    dtype: str = "fp32"
    batch: int = 1
    hq: int = 1
    hkv: int = 1
    lq: int = 1
    lk: int = 1
    d: int = 64
    dv: int = 64
    causal: str = CAUSAL_NONE
    mask: str = "none"
    dropout: bool = False
    gqa: bool = False
    train: bool = False
    layout: str = "bhld"
    deterministic: bool = False
    tokens: int = 0  # jagged inputs only: total query tokens (0 for dense inputs)
    structure: str = "none"  # a dense mask's structure (forms.structure), "none" for unstructured or no mask
    fill: int = 0  # padded structures: the share of valid keys in quarters, 1..4 (0 otherwise)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        for f in ("batch", "hq", "hkv", "lq", "lk", "d", "dv"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > 1 << 31:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.causal not in _CAUSAL_WORDS:
            raise ValueError(f"unknown causal kind {self.causal!r}")
        if not isinstance(self.mask, str) or not _MASK_RE.match(self.mask):
            raise ValueError(f"bad mask kind {self.mask!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} is not a multiple of hkv={self.hkv}")
        if (self.layout == "jagged") != (self.tokens > 0) or not isinstance(self.tokens, int) or self.tokens > 1 << 40:
            raise ValueError("tokens (total tokens) is set exactly for the jagged layout")
        if self.structure != "none" and (self.structure not in STRUCTURES or self.mask == "none"):
            raise ValueError(f"structure {self.structure!r} needs a mask and one of {', '.join(STRUCTURES)}")
        if not isinstance(self.fill, int) or isinstance(self.fill, bool) or not (
                1 <= self.fill <= 4 if self.structure in PADDED else self.fill == 0):
            raise ValueError(f"fill is 1..4 for padded structures and 0 otherwise, got {self.fill!r}")

    @property
    def key(self) -> str:
        return "|".join(f.format(getattr(self, f.attr)) for f in FIELDS
                        if not (f.optional and getattr(self, f.attr) == getattr(Problem, f.attr)))

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, key: str) -> "Problem":
        """Inverse of ``key``; raises ValueError on anything malformed (keys may come from files)."""
        parts = key.split("|") if isinstance(key, str) else []
        required = [f for f in FIELDS if not f.optional]
        if not len(required) <= len(parts) <= len(FIELDS):
            raise ValueError(f"malformed problem key {str(key)[:200]!r}: expected {len(required)} fields")
        # required fields by position, then the optional ones present, by label and in the key's order
        optional = iter(f for f in FIELDS if f.optional)
        fields = list(required)
        for part in parts[len(required):]:
            label = part.partition("=")[0]
            f = next((f for f in optional if f.label == label), None)
            if f is None:
                raise ValueError(f"malformed problem key {key[:200]!r}: unexpected field {label[:40]!r}")
            fields.append(f)
        values = {}
        for f, part in zip(fields, parts):
            try:
                values[f.attr] = f.parse(part)
            except ValueError as e:
                raise ValueError(f"malformed problem key {key[:200]!r}: field {f.spec}: {e}") from None
        return cls(**values)

    def bucketed(self, threshold: int | None = 16) -> "Problem":
        """The problem as the dispatcher keys it: batch and lengths bucketed. Decode-like problems (Lq up to
        ``DECODE_LQ``) bucket Lk from 1, so a decode loop re-tunes once per power of two."""
        if threshold is None:
            return self
        lk_threshold = 0 if self.lq <= DECODE_LQ else threshold
        return dataclasses.replace(self, batch=bucket(self.batch, threshold), lq=bucket(self.lq, threshold),
                                   lk=bucket(self.lk, lk_threshold))

    @classmethod
    def from_call(cls, call: Call, threshold: int | None = 16) -> "Problem":
        """The problem of a dense call (jagged calls: ``forms.problem_of``)."""
        q, k, v = call.query, call.key, call.value
        if q.is_nested:
            raise ValueError("a NestedTensor call: its problem comes from autosdpa.forms.problem_of")
        if q.dim() < 3:
            raise ValueError("attention inputs need at least 3 dimensions")
        if q.dim() == 3:
            batch, hq, hkv = q.shape[0], 1, 1
        else:
            batch, hq, hkv = math.prod(q.shape[:-3]), q.shape[-3], k.shape[-3]
        dtype = DTYPE_NAMES.get(q.dtype)
        if dtype is None:
            raise ValueError(f"unsupported dtype {q.dtype}")
        exact = cls(dtype=dtype, batch=batch, hq=hq, hkv=hkv, lq=q.shape[-2], lk=k.shape[-2], d=q.shape[-1],
                    dv=v.shape[-1], causal=call.causal, mask=_mask_kind(call), dropout=call.dropout_p > 0,
                    gqa=bool(call.enable_gqa), train=call.needs_grad, layout=layout_class(q),
                    deterministic=torch.are_deterministic_algorithms_enabled(),
                    structure=call.structure.word if call.structure is not None else "none",
                    fill=call.structure.fill if call.structure is not None else 0)
        return exact.bucketed(threshold)

    def with_(self, **changes) -> "Problem":
        return dataclasses.replace(self, **changes)

    @property
    def flops(self) -> float:
        """Forward FLOPs (2 matmuls), halved for causal; x3.5 with backward, as FlashAttention counts."""
        f = 2.0 * self.batch * self.hq * self.lq * self.lk * (self.d + self.dv)
        if self.causal != CAUSAL_NONE:
            f /= 2
        return f * (3.5 if self.train else 1.0)


def default_threshold() -> int | None:
    from .config import Settings

    return Settings.from_env().bucket_threshold
