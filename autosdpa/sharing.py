"""Shareable tuning databases: info, export, import, merge and prune (the logic behind ``autosdpa db``).

This module is policy: which rows to take, which to keep, what to drop and how to report it. The SQL is the
store's (``Store.iter_rows``, ``evidence``, ``upsert_many``, ``prune``). Callers pass every database target
explicitly (None: the default cache file); nothing here reads the environment.

A tuning file is a plain SQLite database with the same schema as the user's database. Everything read from
one is data from elsewhere: every environment and every row is validated before it is used or copied
(see ``validated_rows``), and bad ones are skipped and counted, never trusted.

Conflict rule (``prefer``), per (environment, problem key, backend):
  keep the measurement with more evidence (more timing samples); on equal samples keep the newer one
  (``measured_at``); on a full tie keep what is already there. Rows are per environment: a row is only ever
  compared with a row of the *same* environment (same fingerprint and equal fields); an incoming environment
  whose fingerprint exists in the target with different fields is rejected with all its rows.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

from .config import DEFAULT_DB_TIMEOUT_S
from .records import ENV_FIELDS, Measurement
from .store import Store, StoreError, parse_target, seal_file
from .validation import environment_error, key_error, known_backends, measurement_error


class SharingError(StoreError):
    """A file or database cannot be used for sharing (missing, not SQLite, not autosdpa, newer schema...)."""


@dataclasses.dataclass
class Report:
    """What one command did. ``rejected`` counts rows skipped as bad data or conflicts (``reasons`` says why);
    ``dropped`` names the environments a prune removed as stale, and why."""
    added: int = 0
    replaced: int = 0
    kept: int = 0
    rejected: int = 0
    removed: int = 0
    environments_added: int = 0
    environments_removed: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped: list[str] = dataclasses.field(default_factory=list)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected += n
        self.reasons[reason] += n

    def __iadd__(self, other: "Report") -> "Report":
        for f in ("added", "replaced", "kept", "rejected", "removed", "environments_added", "environments_removed"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.reasons.update(other.reasons)
        self.dropped.extend(other.dropped)
        return self

    def line(self) -> str:
        s = f"added {self.added}, replaced {self.replaced}, kept {self.kept}, rejected {self.rejected}"
        if self.environments_added:
            s += f"; environments added {self.environments_added}"
        return s

    def prune_line(self, dry_run: bool = False) -> str:
        return (f"{'would remove' if dry_run else 'removed'} {self.removed} rows and {self.environments_removed} "
                f"environments; kept {self.kept} rows")

    def reason_lines(self) -> list[str]:
        return [f"  rejected {n}: {r}" for r, n in self.reasons.most_common()]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reasons"] = dict(self.reasons)
        return d


# -- opening ----------------------------------------------------------------------------------------------------

def open_source(target: str | os.PathLike, *, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Store:
    """Open a file (read-only, validated, never written) or a database URL for reading."""
    kind, where = parse_target(target)
    if kind == "memory":
        raise SharingError(f"{target!r}: name a database file or URL")
    if kind == "file":
        if not where.exists():
            raise SharingError(f"{target}: no such file")
        if not where.is_file():
            raise SharingError(f"{target}: not a file")
    try:
        return Store(target, readonly=True, timeout_s=timeout_s)
    except SharingError:
        raise
    except StoreError as e:
        raise SharingError(str(e)) from None


def _seal(path: Path) -> None:
    try:
        seal_file(path)
    except StoreError as e:
        raise SharingError(str(e)) from None


def _fresh_output(out: str | os.PathLike, force: bool) -> Path:
    """The path of a new output file: refused if it exists (without ``force``), is a URL, or cannot be made."""
    if "://" in str(out):
        raise SharingError("the output must be a file path (an exported file is a plain SQLite file)")
    p = Path(out).expanduser().absolute()
    try:
        if p.exists() or p.is_symlink():
            if not force:
                raise SharingError(f"{out} exists; pass --force to overwrite it")
            if not p.is_file():
                raise SharingError(f"{out} is not a file")
        if p.parent.exists() and not p.parent.is_dir():
            raise SharingError(f"cannot write {out}: {p.parent} is not a folder")
        p.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            q = Path(str(p) + suffix)
            if q.exists():
                q.unlink()
    except OSError as e:
        raise SharingError(f"cannot write {out}: {e.strerror or e}") from None
    return p


# -- reading with validation -------------------------------------------------------------------------------------

def parse_time(text: str, *, now: float | None = None) -> float:
    """``2025-01-31``, ``2025-01-31T12:00[:00]`` (local time unless it has an offset) or a relative age
    ``30d`` / ``12h`` / ``2w`` (that long ago) -> seconds since the epoch."""
    text = text.strip()
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD[THH:MM[:SS]]) or an age like 30d, 12h, 2w") from None


def env_matches(env: dict, pattern: str | None) -> bool:
    """The ``--gpu`` filter, the one rule for every command: a case-insensitive substring of the device name
    ("H100"), a device type ("cuda", "cpu"), or a fingerprint (or a prefix of at least 4 of its hex digits)."""
    if not pattern:
        return True
    p = pattern.strip().lower()
    fp = str(env.get("fingerprint", "")).lower()
    return (p in str(env.get("device_name", "")).lower() or p == str(env.get("device_type", "")).lower()
            or (len(p) >= 4 and fp.startswith(p)))


def validated_rows(src: Store, report: Report, *, gpu: str | None = None, since: float | None = None,
                   include_failed: bool = True, allow_unknown_backends: bool = False
                   ) -> Iterator[tuple[dict, str, Measurement]]:
    """Rows of ``src`` that are sane data, streamed; every other row is counted in ``report`` with its reason.
    (Rows come in environment, key order: each environment and each key is checked once.)"""
    known = known_backends()
    env_fp: object = object()
    env_bad: str | None = None
    env_skip = False
    last_key: object = object()
    key_bad: str | None = None
    for env, key, m in src.iter_rows(since=since):
        if env["fingerprint"] != env_fp:
            env_fp, env_bad = env["fingerprint"], environment_error(env)
            env_skip = env_bad is None and not env_matches(env, gpu)
        if env_bad:
            report.reject(env_bad)
            continue
        if env_skip:
            continue
        if key != last_key:
            last_key, key_bad = key, key_error(key)
        bad = key_bad or measurement_error(m)
        if bad is None and m.backend not in known and not allow_unknown_backends:
            bad = "unknown backend (pass --allow-unknown-backends to keep well-formed names)"
        if bad:
            report.reject(bad)
            continue
        if not include_failed and not m.ok:
            continue
        yield env, key, m


# -- the conflict rule and merging ----------------------------------------------------------------------------

def prefer(incoming: Measurement, existing: Measurement | tuple[int, float]) -> bool:
    """True when ``incoming`` should replace ``existing`` (same environment, key, backend): more samples wins,
    then the newer measurement; a full tie keeps the existing row."""
    es, et = (existing.samples, existing.measured_at) if isinstance(existing, Measurement) else existing
    if incoming.samples != es:
        return incoming.samples > es
    return incoming.measured_at > et


def _accepts_environment(target: Store, env: dict, report: Report) -> bool:
    """Whether ``env``'s rows may go into ``target``: a new environment, or one with exactly these fields."""
    have = target.environment(env["fingerprint"])
    if have is None:
        report.environments_added += 1
        return True
    return all(have[f] == env[f] for f in ENV_FIELDS)


def merge_rows(target: Store, rows: Iterable[tuple[dict, str, Measurement]], report: Report | None = None,
               *, dry_run: bool = False, chunk: int = 2000) -> Report:
    """Apply the conflict rule to put ``rows`` (already validated) into ``target``, ``chunk`` rows at a time
    (memory stays bounded however large the source)."""
    report = report if report is not None else Report()
    envs: dict[str, dict | None] = {}  # fingerprint -> fields to write under (None: refused)
    batch: dict[tuple[str, str, str], Measurement] = {}

    def flush():
        by_env: dict[str, list[tuple[str, Measurement]]] = collections.defaultdict(list)
        for (fp, key, _b), m in batch.items():
            by_env[fp].append((key, m))
        for fp, items in by_env.items():
            have = target.evidence(fp, [(k, m.backend) for k, m in items])
            winners = []
            for key, m in items:
                old = have.get((key, m.backend))
                if old is not None and not prefer(m, old):
                    report.kept += 1
                    continue
                report.added += old is None
                report.replaced += old is not None
                winners.append((key, m))
            if winners and not dry_run:
                target.upsert_many(fp, envs[fp], winners)
        batch.clear()

    for env, key, m in rows:
        fp = env["fingerprint"]
        if fp not in envs:
            envs[fp] = {f: env[f] for f in ENV_FIELDS} if _accepts_environment(target, env, report) else None
        if envs[fp] is None:
            report.reject("environment conflict: same fingerprint, different fields in the target")
            continue
        k = (fp, key, m.backend)
        if k in batch:  # the same row twice in one source: the conflict rule picks one
            report.kept += 1
            if not prefer(m, batch[k]):
                continue
        batch[k] = m
        if len(batch) >= chunk:
            flush()
    flush()
    return report


# -- environments: what differs, what is stale --------------------------------------------------------------------

_DEVICE_FIELDS = ("device_type", "device_name")


def _show(v) -> str:
    return str(v) if v not in ("", None) else "(none)"


def env_change(old: dict, new: dict) -> str:
    """What differs from ``old`` to ``new`` (two environments of one device), e.g. ``torch 2.12.0 → 2.13.0``."""
    diffs = [f"{f} {_show(old.get(f))} → {_show(new.get(f))}" for f in ENV_FIELDS
             if f not in _DEVICE_FIELDS and old.get(f) != new.get(f)]
    return ", ".join(diffs) or "same fields"


def env_differences(envs: Iterable[dict]) -> dict[str, str]:
    """For environments sharing a device with an older one: ``{fingerprint: "vs <older fp>: <change>"}``."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in envs:
        groups[tuple(e.get(f) for f in _DEVICE_FIELDS)].append(e)
    out = {}
    for group in groups.values():
        group.sort(key=lambda e: (e.get("created_at") or 0, e["fingerprint"]))
        for prev, cur in zip(group, group[1:]):
            out[cur["fingerprint"]] = f"vs {prev['fingerprint'][:8]}: {env_change(prev, cur)}"
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v).split("+")[0])[:4])


def stale_reason(env: dict, machine: Iterable[dict]) -> str | None:
    """Why this machine can never match ``env`` again, or None. ``machine``: this machine's environments with
    ``kernels=True`` (see ``autosdpa.environment``). Only environments of a device this machine has can be
    stale: an older torch, CUDA or cuDNN than installed, or kernels / Triton that differ from the installed
    ones (rows of this project's kernels). A newer version elsewhere may still be installed here later."""
    cur = next((m for m in machine if all(m[f] == env[f] for f in _DEVICE_FIELDS)), None)
    if cur is None:
        return None
    for f in ("torch", "cuda", "cudnn"):
        if env[f] != cur[f] and _version(env[f]) < _version(cur[f]):
            return f"{f} {_show(env[f])} older than the installed {cur[f]}"
    for f in ("kernels", "triton"):
        if env[f] and env[f] != cur[f]:
            return f"{f} {env[f]}, installed {_show(cur[f])}"
    return None


def machine_environments() -> list[dict]:
    """This machine's environments as the kernels see them (every field filled): the CPU and each CUDA device."""
    import torch

    from .environment import environment

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [environment(d, kernels=True)[1] for d in devices]


# -- the commands ------------------------------------------------------------------------------------------------

def _environment_summaries(src: Store) -> dict[str, dict]:
    out = {}
    for env in src.iter_environments():
        out[env["fingerprint"]] = {**env, "invalid": environment_error(env), "problems": 0, "ok": 0,
                                   "rejected": 0, "skipped": 0, "unknown_backends": 0}
    diffs = env_differences(e for e in out.values() if e["invalid"] is None)
    for fp, text in diffs.items():
        out[fp]["differs"] = text
    return out


def info(target: str | os.PathLike, *, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> dict:
    """Summary of a file or database: schema version, environments with row counts (and what differs between
    environments of one device), rows that would be rejected on import (with reasons). Never writes to it.
    Rows are streamed: memory does not grow with the number of rows."""
    src = open_source(target, timeout_s=timeout_s)
    try:
        report = Report()
        known = known_backends()
        per_env = _environment_summaries(src)
        valid, newest, last = 0, None, None
        for env, key, m in validated_rows(src, report, allow_unknown_backends=True):
            e = per_env.get(env["fingerprint"])
            if e is None:
                continue
            valid += 1
            e[m.status] += 1
            e["unknown_backends"] += m.backend not in known
            if (env["fingerprint"], key) != last:  # rows come grouped by environment, then key
                e["problems"] += 1
                last = (env["fingerprint"], key)
            newest = m.measured_at if newest is None else max(newest, m.measured_at)
        out = {"database": str(target), "schema_version": src.version, "counts": src.counts(),
               "valid_rows": valid, "newest_measurement": newest,
               "environments": list(per_env.values()), **report.as_dict()}
        if src.path is not None:
            out["bytes"] = src.path.stat().st_size
        return out
    finally:
        src.close()


def export(source: str | os.PathLike | None, out: str | os.PathLike, *, gpu: str | None = None,
           since: float | None = None, include_failed: bool = True, force: bool = False,
           timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Report:
    """Write the validated rows of ``source`` (None: the default cache file) matching the filters to a new
    SQLite file ``out`` (journal_mode=DELETE: one self-contained file, readable by any SQLite tool)."""
    src = open_source(source if source is not None else parse_target(None)[1], timeout_s=timeout_s)
    try:
        if src.same_database(out):
            raise SharingError("the output file is the source database")
        path = _fresh_output(out, force)
        report = Report()
        dst = Store(path, wal=False, timeout_s=timeout_s)
        try:
            merge_rows(dst, validated_rows(src, report, gpu=gpu, since=since, include_failed=include_failed,
                                           allow_unknown_backends=True), report)
        finally:
            dst.close()
        _seal(path)
        return report
    finally:
        src.close()


def import_file(source: str | os.PathLike, target: str | os.PathLike | None = None, *,
                allow_unknown_backends: bool = False, dry_run: bool = False,
                timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Report:
    """Merge the validated rows of a file into ``target`` (None: the default cache file), applying the
    conflict rule. An older-schema file is read as it is and its rows land in the current schema."""
    src = open_source(source, timeout_s=timeout_s)
    try:
        dst = Store(target, timeout_s=timeout_s)
        try:
            if dst.same_database(src):
                raise SharingError("cannot import a database into itself")
            report = Report()
            merge_rows(dst, validated_rows(src, report, allow_unknown_backends=allow_unknown_backends), report,
                       dry_run=dry_run)
            return report
        finally:
            dst.close()
    finally:
        src.close()


def merge_files(sources: list[str | os.PathLike], out: str | os.PathLike, *, force: bool = False,
                allow_unknown_backends: bool = False, timeout_s: float = DEFAULT_DB_TIMEOUT_S
                ) -> tuple[Report, list[tuple[str, Report]]]:
    """Merge files into a new file ``out``, in order, with the conflict rule. (total, per-file reports)."""
    srcs: list[Store] = []
    try:
        for s in sources:  # open (and so validate) every input before writing anything
            srcs.append(open_source(s, timeout_s=timeout_s))
        if any(s.same_database(out) for s in srcs):
            raise SharingError("the output file is one of the inputs")
        path = _fresh_output(out, force)
        total, each = Report(), []
        dst = Store(path, wal=False, timeout_s=timeout_s)
        try:
            for name, src in zip(sources, srcs):
                r = Report()
                merge_rows(dst, validated_rows(src, r, allow_unknown_backends=allow_unknown_backends), r)
                each.append((str(name), r))
                total += r
        finally:
            dst.close()
        _seal(path)
        return total, each
    finally:
        for s in srcs:
            s.close()


def prune(target: str | os.PathLike | None = None, *, stale: bool = False, other_torch: bool = False,
          old_kernels: bool = False, failed: bool = False, older_than: float | None = None,
          decisions: bool = False, gpu: str | None = None, dry_run: bool = False,
          machine: list[dict] | None = None, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Report:
    """Drop stale data from ``target`` (None: the default cache file): environments this machine can never
    match again (``stale``, see ``stale_reason``), of another torch version (``other_torch``) or other kernels
    (``old_kernels``: a kernels hash that is not the installed one); rows that did not measure ok (``failed``),
    rows measured before ``older_than``, all rank decisions (``decisions``). ``gpu`` limits it to matching
    environments; ``machine`` stands for this machine's environments (default: computed). Environments left
    without rows go too. ``removed`` counts measurement rows, ``kept`` what remains, ``dropped`` says which
    environments went as stale and why."""
    store = Store(target, timeout_s=timeout_s)
    report = Report()
    try:
        if stale or other_torch or old_kernels:
            machine = machine_environments() if machine is None else machine
        envs = [e for e in store.iter_environments() if env_matches(e, gpu)]
        why = {e["fingerprint"]: _drop_reason(e, machine or [], stale, other_torch, old_kernels) for e in envs}
        why = {fp: r for fp, r in why.items() if r}
        res = store.prune(scope=[e["fingerprint"] for e in envs], stale=why, failed=failed, older_than=older_than,
                          decisions=decisions, dry_run=dry_run)
        report.removed, report.kept = res.removed, res.kept
        report.environments_removed = len(res.environments_removed)
        by_fp = {e["fingerprint"]: e for e in envs}
        for fp, r in why.items():
            e = by_fp[fp]
            report.dropped.append(f"{fp[:8]} {e['device_name']} (torch {_show(e['torch'])}): {r}; "
                                  f"{res.removed_by_environment.get(fp, 0)} rows")
        return report
    finally:
        store.close()


def _drop_reason(env: dict, machine: list[dict], stale: bool, other_torch: bool, old_kernels: bool) -> str | None:
    if stale and (r := stale_reason(env, machine)):
        return r
    installed = machine[0] if machine else {}
    if other_torch and env["torch"] != installed.get("torch"):
        return f"torch {_show(env['torch'])}, installed {installed.get('torch')}"
    if old_kernels and env["kernels"] and env["kernels"] != installed.get("kernels"):
        return f"kernels {env['kernels']}, installed {_show(installed.get('kernels'))}"
    return None
