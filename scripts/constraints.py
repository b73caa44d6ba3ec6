#!/usr/bin/env python3
"""The test dependencies' pins (tests/constraints.txt): the versions the suite last passed with.

    python scripts/constraints.py usable tests/constraints.txt > OUT   # what scripts/_venv.sh installs with
    python scripts/constraints.py freeze > tests/constraints.txt      # move the pins, on purpose, in a commit

``usable`` drops the pins of torch and of everything the installed torch depends on (transitively): a venv's
torch -- a CUDA build with its own triton and sympy, say -- is never replaced or fought over by a test pin.
``freeze`` writes what this venv has, less autosdpa itself and that same torch closure.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> set[str]:
    """torch and every installed package it needs, directly or not (none when torch is not installed)."""
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [_NAME.match(r)[0] for r in reqs if "extra ==" not in r and _NAME.match(r)]
    return seen


def usable(path: str) -> str:
    keep = torch_closure()
    out = []
    for line in open(path, encoding="utf-8"):
        m = _NAME.match(line.strip())
        if m and _norm(m[0]) not in keep:
            out.append(line.strip())
    return "\n".join(out) + "\n"


def freeze() -> str:
    skip = torch_closure() | {"autosdpa", "pip", "setuptools", "wheel"}
    pins = sorted((_norm(d.metadata["Name"]), d.version) for d in md.distributions())
    lines = [f"{n}=={v}" for n, v in dict(pins).items() if n not in skip]
    head = ("# Test dependencies at the versions the suite last passed with (scripts/_venv.sh installs with these).\n"
            "# Moving a pin is a commit of its own: python scripts/constraints.py freeze > tests/constraints.txt\n"
            "# torch and what it needs are not pinned here: the venv's torch (CPU or CUDA) is kept as it is.\n")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["usable"] and len(sys.argv) == 3:
        sys.stdout.write(usable(sys.argv[2]))
    elif sys.argv[1:] == ["freeze"]:
        sys.stdout.write(freeze())
    else:
        sys.exit(__doc__)
