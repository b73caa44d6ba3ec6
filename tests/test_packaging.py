"""The repository as a user's process sees it: run from the repo root (where `python -c`, `python -m pytest` and
the quickstart put you), nothing here shadows another distribution's top-level module, and the test pins
never move the venv's torch."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import constraints  # noqa: E402


def _run_at_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_kernels_folder_is_not_an_importable_package():
    """With the repo root first on sys.path and nothing installed (-S: no site-packages), `import kernels`
    must not find this project's Triton kernels: PyPI's `kernels` (which transformers >= 5.25 needs) has that
    name. At most the bare folder is a namespace package, which any installed `kernels` takes precedence over."""
    r = _run_at_root("import kernels, sys; print(getattr(kernels, '__file__', None), hasattr(kernels, 'flash'))",
                     "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "False"], r.stdout


def test_autosdpa_kernels_is_the_installed_name():
    spec = importlib.util.find_spec("autosdpa_kernels")
    assert spec is not None and spec.origin.endswith(os.path.join("kernels", "autosdpa_kernels", "__init__.py"))


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="PyPI's kernels is not installed")
def test_pypi_kernels_is_what_the_repo_root_imports():
    r = _run_at_root("import kernels; from kernels import CUDAProperties; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert "site-packages" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_hub_kernels_imports_from_the_repo_root():
    r = _run_at_root("import transformers.integrations.hub_kernels, autosdpa.integrations.hf as hf; "
                     "print(hf.register())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "autosdpa"


def test_constraints_pin_every_test_dependency():
    """Every package the dev extra brings (directly) is pinned to one version, so a release tomorrow cannot
    change what CI installs."""
    import importlib.metadata as md
    import re

    pins = {}
    for line in open(os.path.join(ROOT, "tests", "constraints.txt"), encoding="utf-8"):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)$", line.strip())
        if m:
            pins[constraints._norm(m[1])] = m[2]
    dev = [r for r in md.requires("autosdpa") or [] if 'extra == "dev"' in r]
    names = {constraints._norm(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in dev}
    assert names and names <= set(pins), names - set(pins)
    assert "torch" not in pins


def test_usable_constraints_never_pin_torch_or_its_dependencies(tmp_path):
    closure = constraints.torch_closure()
    assert "torch" in closure and "sympy" in closure  # what a CUDA torch pins tightly itself
    f = tmp_path / "c.txt"
    f.write_text("# comment\ntorch==0.1\nsympy==0.1\nTyping_Extensions==0.1\npytest==8.0.0\n")
    assert constraints.usable(str(f)).split() == ["pytest==8.0.0"]



def test_no_extra_replaces_the_venvs_torch(tmp_path):
    """Installing autosdpa with every extra into this venv (a dry run against the package index) keeps its
    torch: no extra may pull another torch build (e.g. a multi-GB CUDA one into a CPU venv)."""
    import json
    import re

    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    block = text[text.index("[project.optional-dependencies]"):text.index("[project.scripts]")]
    extras = ",".join(re.findall(r"^(\w+) = \[", block, re.M))
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
                        "--disable-pip-version-check", "-e", f"{ROOT}[{extras}]"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("Could not find" in r.stderr or "connection" in r.stderr.lower()):
        pytest.skip(f"no package index reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    names = {constraints._norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert "autosdpa" in names and ("matplotlib" in names or importlib.util.find_spec("matplotlib"))  # resolved
    assert not {n for n in names if n == "torch" or n.startswith("nvidia-")}, names
