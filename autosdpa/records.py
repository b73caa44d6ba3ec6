"""Plain records shared by the tuner, the environment fingerprint and the store (no SQL, no torch).

Whether a record read from elsewhere is sane data is ``autosdpa.validation``'s business, not these classes'.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

STATUSES = ("ok", "rejected", "skipped")

#: The fields of an environment, in the order the fingerprint hashes them.
ENV_FIELDS = ("device_type", "device_name", "capability", "cores", "memory_gb", "torch", "cuda", "cudnn",
              "triton", "kernels")
#: Integer environment fields (the others are strings).
ENV_INT_FIELDS = ("cores", "memory_gb")
#: The stored fields of a measurement (besides its environment and problem key).
MEASUREMENT_FIELDS = ("backend", "status", "median_s", "spread_s", "samples", "max_error", "detail",
                      "tuned_shape", "measured_at")


@dataclasses.dataclass
class Measurement:
    """One backend's result for one problem in one environment."""

    backend: str
    status: str  # ok | rejected | skipped
    median_s: float | None = None
    spread_s: float | None = None
    samples: int = 0
    max_error: float | None = None
    detail: str = ""
    tuned_shape: str = ""
    measured_at: float = dataclasses.field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_s is not None and self.median_s > 0


def fingerprint_of(fields: dict) -> str:
    """The environment's fingerprint: 16 hex digits of the SHA-256 of its ``ENV_FIELDS``."""
    info = {f: fields[f] for f in ENV_FIELDS}
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def blank_environment() -> dict:
    """Every ``ENV_FIELDS`` at its empty value (0 or "")."""
    return {f: 0 if f in ENV_INT_FIELDS else "" for f in ENV_FIELDS}
