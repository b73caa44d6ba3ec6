"""Workloads for offline tuning: ``--shape`` specs, workload files (TOML/JSON), shipped presets and
``AUTOSDPA_RECORD`` recordings, all turned into :class:`~autosdpa.problem.Problem` objects.

Shape spec (one problem, comma-separated ``field=value`` items and bare flags)::

    b=8,hq=32,hkv=8,lq=4096,lk=4096,d=128,dtype=bf16,causal,train

The fields are those of the problem key (``autosdpa.problem.FIELDS``, by their ``spec`` names), with the
defaults and spellings of the spec language in ``FIELDS`` below (printed by ``autosdpa tune --help``, and in
docs/cli.md). Bare flags also accept ``=0/1/true/false``. A full problem key (``fwd|bf16|B=8|...``) is
accepted as a spec too.

Workload file (TOML or JSON, the same structure)::

    name = "my-model"                  # optional
    source = "where the shapes come from"  # optional
    [defaults]                         # applied to every problem (optional)
    dtype = "bf16"
    b = 1
    [[problems]]
    label = "self-attention"          # optional
    hq = 32
    hkv = 8
    lq = [1024, 4096]                  # a list expands: one problem per value (product over lists)
    d = 128
    causal = true
    [[problems]]
    shape = "hq=8,lq=77,d=64"          # or a spec string
    [[problems]]
    key = "fwd|fp16|B=1|..."           # or a problem key

JSON: ``{"defaults": {...}, "problems": [{...}, "b=1,hq=2,lq=64", ...]}`` or just a list of problems.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:  # pragma: no cover
        tomllib = None  # type: ignore[assignment]

from .problem import DTYPES, FIELDS as KEY_FIELDS, LAYOUTS, Problem

__all__ = ["WorkloadError", "WorkItem", "parse_shape", "problem_from_fields", "load_file", "list_presets",
           "load_preset", "load_recording", "shard", "parse_shard", "dedupe_canonical", "canonical", "apply_overrides", "normalize_dtype",
           "FIELDS"]


class WorkloadError(ValueError):
    """A spec, file, preset or recording that cannot be turned into problems; the message says why."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    problem: Problem
    label: str = ""     # e.g. "llama3-8b: prefill 4096"
    origin: str = ""    # "--shape", "file.toml", "preset llama3-8b", "rec.jsonl:3"


#: What a shape spec means where the key's own help would not say it: flags, spellings, aliases.
_SPEC_HELP = {
    "train": "flag: time forward + backward",
    "dtype": "fp16|bf16|fp32|fp64 (aliases: half, float16, ...)",
    "hq": "query heads (alias h)",
    "lq": "query length (alias l)",
    "causal": "flag: top-left causal; causal=br: bottom-right",
    "mask": "none | bool:PATTERN | float:PATTERN (e.g. bool:B11K)",
    "dropout": "flag or dropout=P (P>0 means dropout)",
    "gqa": "flag: enable_gqa=True",
    "deterministic": "flag: deterministic algorithms",
    "tokens": "jagged layout only: total query tokens",
    "structure": "the mask's structure: all | causal | causal_br | kpad_r | kpad_l | cpad_r | cpad_l "
                 "(needs a mask; bool:B1QK if none is given)",
    "fill": "padded structures: valid keys in quarters, 1..4 (default 3)",
}
#: Defaults of the spec language (they differ from Problem's: lk follows lq, hkv follows hq, ...).
_SPEC_DEFAULTS = {"train": "off", "dtype": "bf16 on CUDA, fp32 on CPU", "batch": "1", "hq": "1", "hkv": "hq",
                  "lq": "required", "lk": "lq", "d": "64", "dv": "d", "causal": "none", "mask": "none",
                  "dropout": "off", "gqa": "auto (hq != hkv)", "layout": "bhld", "deterministic": "off",
                  "tokens": "-", "structure": "none", "fill": "3 (padded structures)"}
#: spec name -> (help, default): one row per field of the problem key, in the key's order.
FIELDS: dict[str, tuple[str, str]] = {f.spec: (_SPEC_HELP.get(f.attr, f.help), _SPEC_DEFAULTS[f.attr])
                                      for f in KEY_FIELDS}
_ATTR = {f.spec: f.attr for f in KEY_FIELDS}  # spec name -> Problem attribute
_ALIASES = {"batch": "b", "h": "hq", "heads": "hq", "l": "lq", "seq": "lq", "kv_heads": "hkv",
            "head_dim": "d", "drop": "dropout", "deterministic": "det", "bwd": "train", "enable_gqa": "gqa",
            "is_causal": "causal"}
_INT_FIELDS = tuple(f.spec for f in KEY_FIELDS if type(getattr(Problem, f.attr)) is int)
_BOOL_FIELDS = tuple(f.spec for f in KEY_FIELDS if type(getattr(Problem, f.attr)) is bool and f.attr != "dropout")
_DTYPE_ALIASES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
                  "bf16": "bf16", "bfloat16": "bf16",
                  "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
                  "fp64": "fp64", "float64": "fp64", "double": "fp64", "f64": "fp64"}
_CAUSAL = {"": "top_left", "1": "top_left", "true": "top_left", "yes": "top_left", "tl": "top_left",
           "top_left": "top_left", "causal": "top_left",
           "br": "bottom_right", "bottom_right": "bottom_right", "causal_br": "bottom_right",
           "lower_right": "bottom_right",
           "0": "none", "false": "none", "no": "none", "none": "none", "nocausal": "none"}
_META_KEYS = ("label", "name", "shape", "key")


def normalize_dtype(value: Any) -> str:
    s = str(value).strip().lower().removeprefix("torch.")
    if s not in _DTYPE_ALIASES:
        raise WorkloadError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return _DTYPE_ALIASES[s]


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("", "1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise WorkloadError(f"{name}={value!r}: expected a flag (true/false/1/0)")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise WorkloadError(f"{name}={value!r}: expected a positive integer")
    if isinstance(value, int):
        n = value
    else:
        s = str(value).strip().replace("_", "")
        try:
            n = int(s)
        except ValueError:
            raise WorkloadError(f"{name}={value!r}: expected a positive integer") from None
    if n < 1:
        raise WorkloadError(f"{name}={value!r}: expected a positive integer")
    return n


def _valid_mask(mask: str) -> bool:
    """Whether ``mask`` is a mask kind the problem key accepts (Problem's own rule, not a copy of it)."""
    try:
        Problem(mask=mask)
    except ValueError:
        return False
    return True


def spec_help() -> str:
    """Every shape-spec field: ``name: help, default D`` joined by ``; ``."""
    return "; ".join(f"{name}: {help_}, default {default}" for name, (help_, default) in FIELDS.items())


def problem_from_fields(fields: dict[str, Any], *, default_dtype: str = "fp32", where: str = "") -> Problem:
    """Spec fields (already split; values may be str, int, bool) -> Problem. Raises WorkloadError."""
    pre = f"{where}: " if where else ""
    norm: dict[str, Any] = {}
    for raw_name, value in fields.items():
        name = _ALIASES.get(str(raw_name).strip().lower(), str(raw_name).strip().lower())
        if name not in FIELDS:
            raise WorkloadError(f"{pre}unknown field {raw_name!r}; known fields: {', '.join(FIELDS)}")
        if name in norm:
            raise WorkloadError(f"{pre}field {name!r} given twice")
        norm[name] = value
    try:
        ints = {n: _as_int(n, norm[n]) for n in _INT_FIELDS if n in norm}
        if "lq" not in ints:
            raise WorkloadError("lq (query length) is required, e.g. lq=1024")
        hq = ints.get("hq", 1)
        hkv = ints.get("hkv", hq)
        d = ints.get("d", 64)
        dtype = normalize_dtype(norm["dtype"]) if "dtype" in norm else default_dtype
        causal_v = norm.get("causal", "none")
        causal_s = ("top_left" if causal_v else "none") if isinstance(causal_v, bool) else \
            _CAUSAL.get(str(causal_v).strip().lower())
        if causal_s is None:
            raise WorkloadError(f"causal={causal_v!r}: expected a flag, or causal=none|tl|br")
        mask = str(norm.get("mask", "none")).strip()
        if mask.lower() == "none":
            mask = "none"
        elif not _valid_mask(mask):
            raise WorkloadError(f"mask={mask!r}: expected none, bool:PATTERN or float:PATTERN where PATTERN is "
                                "B/1, H/1, Q/1, K/1 in that order, 1 = broadcast (e.g. bool:B11K)")
        drop_v = norm.get("dropout", False)
        if isinstance(drop_v, bool):
            dropout = drop_v
        else:
            try:
                p = float(str(drop_v).strip() or "1")
            except ValueError:
                raise WorkloadError(f"dropout={drop_v!r}: expected a flag or a probability") from None
            if not 0 <= p < 1 and not (p == 1 and str(drop_v).strip() in ("", "1")):
                raise WorkloadError(f"dropout={drop_v!r}: expected a probability in [0, 1)")
            dropout = p > 0
        flags = {n: _as_bool(n, norm[n]) for n in _BOOL_FIELDS if n in norm}
        gqa = flags.get("gqa", hq != hkv)
        if hq != hkv and not gqa:
            raise WorkloadError(f"hq={hq} != hkv={hkv} needs gqa (enable_gqa=True)")
        layout = str(norm.get("layout", "bhld")).strip().lower()
        if layout not in LAYOUTS:
            raise WorkloadError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
        if causal_s != "none" and mask != "none":
            raise WorkloadError("causal and mask cannot be combined (PyTorch rejects is_causal with attn_mask)")
        if layout == "nd3" and (hq != 1 or hkv != 1):
            raise WorkloadError("layout=nd3 means (N, L, E) inputs with one head: hq=hkv=1")
        structure = str(norm.get("struct", "none")).strip().lower()
        if structure != "none" and mask == "none":
            mask = "bool:B1QK"  # a structured mask needs a mask: a padded batch's, unless given
        return Problem(dtype=dtype, batch=ints.get("b", 1), hq=hq, hkv=hkv, lq=ints["lq"],
                       lk=ints.get("lk", ints["lq"]), d=d, dv=ints.get("dv", d), causal=causal_s, mask=mask,
                       dropout=dropout, gqa=gqa, train=flags.get("train", False), layout=layout,
                       deterministic=flags.get("det", False), tokens=ints.get("tokens", 0), structure=structure,
                       fill=ints.get("fill", 0 if structure in ("none", "all", "causal", "causal_br") else 3))
    except WorkloadError as e:
        raise WorkloadError(f"{pre}{e}") from None
    except ValueError as e:  # Problem's own validation
        raise WorkloadError(f"{pre}{e}") from None


def _split_spec(spec: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not name or (eq and not value.strip() and name.lower() not in ("causal",)):
            raise WorkloadError(f"bad item {item!r}: expected field=value or a flag")
        if name in fields:
            raise WorkloadError(f"field {name!r} given twice")
        fields[name] = value.strip() if eq else ""
        if not eq and _ALIASES.get(name.lower(), name.lower()) in _INT_FIELDS + ("dtype", "mask", "layout"):
            raise WorkloadError(f"{name!r} needs a value ({name}=...)")
    return fields


def parse_shape(spec: str, *, default_dtype: str = "fp32") -> Problem:
    """A ``--shape`` spec (or a full problem key) -> Problem; raises WorkloadError with the reason."""
    spec = spec.strip()
    if not spec:
        raise WorkloadError("empty shape spec")
    if "|" in spec:
        try:
            return Problem.parse(spec)
        except ValueError as e:
            raise WorkloadError(str(e)) from None
    fields = _split_spec(spec)
    # bare flags: causal -> "", train -> ""; dtype shorthand: a bare "bf16" item means dtype=bf16
    for name in list(fields):
        if fields[name] == "" and name.lower() in _DTYPE_ALIASES and "dtype" not in fields:
            del fields[name]
            fields["dtype"] = name
    return problem_from_fields(fields, default_dtype=default_dtype)


# -- files ----------------------------------------------------------------------------------------------------

def _expand(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Lists in a problem entry expand to one entry per combination."""
    keys = [k for k, v in entry.items() if isinstance(v, list)]
    if not keys:
        return [entry]
    out = []
    for combo in itertools.product(*(entry[k] for k in keys)):
        e = dict(entry)
        e.update(zip(keys, combo))
        out.append(e)
    return out


def _fmt_label(label: str, fields: dict[str, Any]) -> str:
    try:
        return label.format(**fields)
    except (KeyError, IndexError, ValueError):
        return label


def problems_from_data(data: Any, *, where: str, default_dtype: str = "fp32") -> list[WorkItem]:
    """A parsed workload document (dict or list) -> work items."""
    if isinstance(data, list):
        data = {"problems": data}
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: expected a table/object with 'problems' (or a list of problems)")
    unknown = set(data) - {"name", "description", "source", "defaults", "problems", "problem"}
    if unknown:
        raise WorkloadError(f"{where}: unknown top-level keys {sorted(unknown)}; expected name, description, "
                            "source, defaults, problems")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise WorkloadError(f"{where}: 'defaults' must be a table/object")
    entries = data.get("problems", data.get("problem"))
    if not isinstance(entries, list) or not entries:
        raise WorkloadError(f"{where}: no problems (expected a non-empty 'problems' list)")
    items = []
    for i, entry in enumerate(entries, 1):
        at = f"{where}: problem {i}"
        if isinstance(entry, str):
            entry = {"shape": entry}
        if not isinstance(entry, dict):
            raise WorkloadError(f"{at}: expected a table/object or a spec string, got {type(entry).__name__}")
        for combo in _expand({**defaults, **entry}):
            label = str(combo.get("label") or combo.get("name") or "")
            if "key" in combo:
                try:
                    p = Problem.parse(str(combo["key"]))
                except ValueError as e:
                    raise WorkloadError(f"{at}: {e}") from None
            else:
                fields = {k: v for k, v in combo.items() if k not in _META_KEYS}
                if "shape" in combo:
                    try:
                        spec_fields = _split_spec(str(combo["shape"]))
                    except WorkloadError as e:
                        raise WorkloadError(f"{at}: {e}") from None
                    fields = {**{k: v for k, v in fields.items() if k not in spec_fields}, **spec_fields}
                p = problem_from_fields(fields, default_dtype=default_dtype, where=at)
                label = _fmt_label(label, {**combo, "key": p.key})
            items.append(WorkItem(p, label, f"{where}#{i}"))
    return items


def _read_doc(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}: invalid JSON: {e}") from None
    if suffix in (".toml", ".tml"):
        if tomllib is None:
            raise WorkloadError("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise WorkloadError(f"{path}: invalid TOML: {e}") from None
    if suffix == ".jsonl":
        raise WorkloadError(f"{path}: looks like a recording; use --from {path}")
    raise WorkloadError(f"{path}: unknown workload format {suffix!r}; use a .toml or .json file")


def load_file(path: str | os.PathLike, *, default_dtype: str = "fp32") -> list[WorkItem]:
    """A workload file (TOML or JSON) -> work items."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {p}: {e.strerror or e}") from None
    return problems_from_data(_read_doc(p, text), where=p.name, default_dtype=default_dtype)


# -- presets --------------------------------------------------------------------------------------------------

def _preset_dir():
    return resources.files("autosdpa").joinpath("presets")


def _preset_docs() -> dict[str, dict]:
    out = {}
    d = _preset_dir()
    if not d.is_dir():
        return out
    for f in sorted(d.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".toml"):
            if tomllib is None:
                raise WorkloadError("reading presets on Python 3.10 needs the 'tomli' package (pip install tomli)")
            out[f.name[:-5]] = tomllib.loads(f.read_text(encoding="utf-8"))
    return out


def list_presets() -> list[dict[str, Any]]:
    """[{name, description, source, problems}] for every shipped preset."""
    out = []
    for name, doc in _preset_docs().items():
        out.append({"name": name, "description": doc.get("description", ""), "source": doc.get("source", ""),
                    "problems": len(problems_from_data(doc, where=f"preset {name}"))})
    return out


def load_preset(name: str, *, default_dtype: str = "bf16") -> list[WorkItem]:
    """The problems of a shipped preset. Presets name their dtype; ``default_dtype`` fills in where not."""
    docs = _preset_docs()
    key = name.strip().lower()
    if key not in docs:
        raise WorkloadError(f"unknown preset {name!r}; available: {', '.join(docs) or '(none)'}")
    items = problems_from_data(docs[key], where=f"preset {key}", default_dtype=default_dtype)
    return [dataclasses.replace(it, label=f"{key}: {it.label}" if it.label else key) for it in items]


# -- recordings -----------------------------------------------------------------------------------------------

def load_recording(path: str | os.PathLike) -> list[WorkItem]:
    """A JSONL file written by running a program with ``AUTOSDPA_RECORD=FILE`` -> work items (in order).

    Each line is ``{"problem": KEY, "time": T}``; blank lines are skipped, anything else is an error naming
    the line (a truncated last line, from a program killed mid-write, is skipped with the rest kept)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise WorkloadError(f"cannot read recording {p}: {e.strerror or e}") from None
    items = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == last and items:
                continue  # truncated final line
            raise WorkloadError(f"{p}:{i + 1}: not a JSON line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("problem"), str):
            raise WorkloadError(f"{p}:{i + 1}: expected {{\"problem\": KEY, ...}}")
        try:
            prob = Problem.parse(rec["problem"])
        except ValueError as e:
            raise WorkloadError(f"{p}:{i + 1}: {e}") from None
        items.append(WorkItem(prob, "", f"{p.name}:{i + 1}"))
    if not items:
        raise WorkloadError(f"{p}: no recorded problems (was the program run with AUTOSDPA_RECORD={p}?)")
    return items


# -- transforms -----------------------------------------------------------------------------------------------

def apply_overrides(items: Iterable[WorkItem], *, dtype: str | None = None, train: bool = False) -> list[WorkItem]:
    out = []
    for it in items:
        changes: dict[str, Any] = {}
        if dtype:
            changes["dtype"] = normalize_dtype(dtype)
        if train:
            changes["train"] = True
        out.append(dataclasses.replace(it, problem=it.problem.with_(**changes)) if changes else it)
    return out


def canonical(problem: Problem, threshold: int | None | str = "env") -> Problem:
    """The problem as the dispatcher keys it: batch and lengths bucketed (``AUTOSDPA_BUCKET``)."""
    from .problem import bucket, default_threshold

    t = default_threshold() if threshold == "env" else threshold
    return problem.with_(batch=bucket(problem.batch, t), lq=bucket(problem.lq, t), lk=bucket(problem.lk, t))


def dedupe_canonical(items: Iterable[WorkItem]) -> list[WorkItem]:
    """Drop items whose bucketed key was already seen (they would share one tuning result)."""
    seen: set[str] = set()
    out = []
    for it in items:
        k = canonical(it.problem).key
        if k not in seen:
            seen.add(k)
            out.append(it)
    return out


def shard_of(key: str, n: int) -> int:
    """Stable shard index of a problem key (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n -> (i, n)."""
    i_s, sep, n_s = spec.partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise WorkloadError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise WorkloadError(f"--shard {spec!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def shard(items: Iterable[WorkItem], i: int, n: int) -> list[WorkItem]:
    """Items of shard ``i`` of ``n``: split by a hash of the bucketed key, so every machine agrees."""
    return [it for it in items if shard_of(canonical(it.problem).key, n) == i]
