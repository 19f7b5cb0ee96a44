"""The wheel is the plugin (issue #33.2).

The built wheel holds ``vllm_caote/`` runtime modules and nothing else (the benchmarks and load
tests stay in the repository, top-level ``benchmarks/`` and ``loadtest/``); its required
dependencies are what serving needs, the demo model's converter being the ``[demo]`` extra; and
the plugin imports and registers through its entry points with none of the extras installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_caote"
#: Distributions of the extras that the plugin must not need at import or registration.
EXTRAS_ONLY = ("gguf", "accelerate", "matplotlib")
#: The repository's harness: never part of what vLLM loads.
HARNESS = ("benchmarks", "loadtest")
_SKIP = {".git", ".venv", "build", "dist", "__pycache__", "results", ".pytest_cache"}


def _copy_tree(dst: Path) -> None:
    """The source tree without VCS, venv, build outputs and benchmark results (an sdist-like
    copy, so that a build here never reads or leaves files in the checkout)."""

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "vllm-caote"
    _copy_tree(src)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin", "HOME": str(out)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("vllm_caote-*.whl")
    return whl


def test_wheel_holds_only_the_runtime_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"vllm_caote"}, sorted(tops)
    modules = {n for n in names if n.startswith("vllm_caote/")}
    for n in modules:
        parts = n.split("/")
        assert not set(parts) & {"bench", *HARNESS, "tests", "results"}, n
        assert n.endswith(".py") or n.endswith(".typed"), n  # no data, logs or reports
    source = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    assert {n for n in modules if n.endswith(".py")} == source


def test_wheel_requires_only_what_serving_needs(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(meta_name).decode())
    required, extras = [], {}
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        name = spec.strip().split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
        name = name.strip().lower()
        if "extra ==" in marker:
            extras.setdefault(marker.split("extra ==")[1].strip().strip("'\""), []).append(name)
        else:
            required.append(name)
    assert not set(required) & {*EXTRAS_ONLY, "transformers"}, required
    assert {"gguf", "accelerate"} <= set(extras.get("demo", [])), extras
    assert "matplotlib" in extras.get("bench", []), extras


_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class Hide:
    \"\"\"A finder as if the blocked top-level packages were not installed (``find_spec`` is None,
    ``import`` raises ModuleNotFoundError), as seen by ``importlib.util.find_spec`` too.\"\"\"

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
import importlib.util
assert all(importlib.util.find_spec(m) is None for m in BLOCKED), BLOCKED
"""

_CHECK = """
import importlib, pkgutil, sys
from importlib.metadata import entry_points

import vllm_caote

# every runtime module imports (models.py converts only on demand)
for m in pkgutil.walk_packages(vllm_caote.__path__, "vllm_caote."):
    importlib.import_module(m.name)

eps = {(ep.group, ep.name): ep for g in ("vllm.general_plugins", "vllm.stat_logger_plugins")
       for ep in entry_points(group=g) if ep.value.startswith("vllm_caote")}
assert set(eps) == {("vllm.general_plugins", "caote"), ("vllm.stat_logger_plugins", "caote")}, eps
register = eps["vllm.general_plugins", "caote"].load()
register()
eps["vllm.stat_logger_plugins", "caote"].load()

from vllm.plugins import load_general_plugins

load_general_plugins()  # vLLM's own loading, as every vLLM process does it

import vllm_caote.plugin as plugin
assert plugin._REGISTERED
bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not bad, bad
print("ok", vllm_caote.__file__)
"""


def test_plugin_registers_with_only_the_runtime_dependencies(tmp_path):
    """In a fresh interpreter where the extras' packages and the repository's harness cannot be
    imported, every module of the package imports and the plugin registers through its
    entry points and through vLLM's own plugin loading."""
    blocked = (*EXTRAS_ONLY, *HARNESS)
    code = _BLOCKER.format(blocked=blocked) + _CHECK
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # not the repository root: benchmarks/ and loadtest/ are not importable
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),  # this checkout's package, not another editable install's
            "CAOTE_DISABLE": "0",
        },
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"ok {PACKAGE / '__init__.py'}"
