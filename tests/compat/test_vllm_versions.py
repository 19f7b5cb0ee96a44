"""The register of vLLM contacts against other vLLM releases (issue 33, item 5).

``compat.check()`` verifies the installed vLLM at startup; here every contact and every vLLM
import of the plugin is checked statically (``vllm_caote.compat_sources``: ``ast``, nothing
imported) against the Python files of the CUDA wheels of each release in
``compat_sources.CHECKED_VLLM`` (``make setup`` unpacks them into ``.venv/vllm-sources``), and
the pin must cover exactly the releases that check clean.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
from helpers import missing
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_caote import compat, compat_sources
from vllm_caote.compat_sources import (
    CHECKED_VLLM,
    UNSUPPORTED,
    Requirement,
    SourceTree,
    check_contacts,
    check_imports,
    check_sources,
    import_requirements,
)

ROOT = Path(__file__).resolve().parents[2]


def _installed_root() -> Path:
    import vllm

    return Path(vllm.__file__).resolve().parents[1]


@pytest.mark.parametrize("version", CHECKED_VLLM)
def test_register_and_imports_against_vllm_sources(version):
    folder = compat_sources.sources_dir(version)
    if folder is None:
        missing(f"vLLM {version} sources", "make setup")
    problems = check_sources(folder)
    if Version(version) in SpecifierSet(compat.SUPPORTED_VLLM):
        assert problems == [], "\n".join(problems)
    else:  # excluded from the pin: the register must say why (and still fail there)
        assert version in UNSUPPORTED, f"vLLM {version} is outside the pin but not UNSUPPORTED"
        assert problems, f"vLLM {version} checks clean: widen SUPPORTED_VLLM to it"


@pytest.mark.parametrize(
    "version", [v for v in CHECKED_VLLM if Version(v) in SpecifierSet(compat.SUPPORTED_VLLM)]
)
def test_api_server_modules_bind_build_app_by_name(version):
    """api/server.py rebinds ``build_app`` in the modules that imported it by name."""
    from vllm_caote.api import server

    folder = compat_sources.sources_dir(version)
    if folder is None:
        missing(f"vLLM {version} sources", "make setup")
    src = SourceTree(folder)
    app = src.resolve(f"{server._APP_MODULE}:build_app")
    for importer in server._IMPORTERS:
        assert src.resolve(f"{importer}:build_app").node is app.node, importer


def test_installed_vllm_checks_clean_statically():
    assert check_sources(_installed_root()) == []


def test_static_parameters_match_inspect_on_the_installed_vllm():
    """The parser reads the same parameters as ``inspect.signature`` on every contact."""
    src = SourceTree(_installed_root())
    for c in compat.CONTACTS:
        if c.params is None:
            continue  # nothing compared at load either
        try:
            obj = compat._resolve(c.symbol)
        except (ImportError, AttributeError):
            continue  # the other platform's worker
        try:
            expected = [p for p in inspect.signature(obj).parameters if p != "self"]
        except (TypeError, ValueError):
            expected = None
        _, found = compat_sources._resolve_any(src, c.symbol)
        got = src.parameters(found)
        if got is None or expected is None:
            assert c.params in (None, ()), (c.symbol, got, expected)
        else:
            assert got == expected, c.symbol


def test_pin_is_what_the_static_check_proves():
    pin = SpecifierSet(compat.SUPPORTED_VLLM)
    for version in CHECKED_VLLM:
        assert (Version(version) in pin) == (version not in UNSUPPORTED), version
    # every minor series the pin admits has a checked release
    minors = {Version(v).minor for v in CHECKED_VLLM if Version(v) in pin}
    lo = min(minors)
    for minor in range(lo, max(minors) + 2):
        if Version(f"0.{minor}.0") in pin:
            assert minor in minors, f"vLLM 0.{minor} is admitted by the pin but never checked"


def test_docs_version_matrix_names_the_checked_releases():
    for doc in ("docs/compatibility.md", "README.md"):
        text = (ROOT / doc).read_text()
        row = next(line for line in text.splitlines() if line.startswith("| vLLM |"))
        assert compat.SUPPORTED_VLLM in row, doc
        for version in CHECKED_VLLM:
            assert version.rsplit(".", 1)[0] in row, (doc, version)


# -- the checker itself, on a made-up vLLM --------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> SourceTree:
    for name, text in {"vllm/__init__.py": "", "vllm/_version.py": "__version__ = '9.9.9'\n",
                       **files}.items():  # fmt: skip
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return SourceTree(tmp_path)


def _contact(symbol: str, params=None) -> compat.Contact:
    return compat.Contact(symbol, "api", "-", "-", "-", params)


FAKE = {
    "vllm/core/__init__.py": "from .sched import Scheduler as Scheduler\n",
    "vllm/core/base.py": """
        class Base:
            def step(self, request, when, *, flag=False):
                pass
    """,
    "vllm/core/sched.py": """
        from dataclasses import dataclass
        from vllm.core.base import Base

        class Scheduler(Base):
            @classmethod
            def make(cls, config):
                pass
            @property
            def size(self):
                return 1
            class Inner:
                def run(self, x):
                    pass

        @dataclass
        class State:
            req_id: str
            block_ids: list

        def helper(a, b):
            pass
    """,
}


def test_checker_resolves_reexports_bases_and_signatures(tmp_path):
    src = _tree(tmp_path, FAKE)
    assert src.version() == "9.9.9"
    ok = [
        _contact("vllm.core:Scheduler.step", ("request", "when")),  # re-export, inherited
        _contact("vllm.core.sched:Scheduler.make", ("config",)),  # classmethod: cls dropped
        _contact("vllm.core.sched:Scheduler.size", ()),
        _contact("vllm.core.sched:Scheduler.Inner.run", ("x",)),
        _contact("vllm.core.sched:State", ("req_id", "block_ids")),  # dataclass fields
        _contact("vllm.core.sched:helper", ("a", "b")),
        _contact("vllm.core.base:Base"),
        _contact("vllm.gone:helper|vllm.core.sched:helper", ("a",)),  # an alternative
    ]
    assert check_contacts(src, tuple(ok)) == []
    bad = [
        _contact("vllm.core:Scheduler.step", ("req", "when")),
        _contact("vllm.core.sched:Scheduler.missing"),
        _contact("vllm.gone:helper|vllm.core.sched:nope"),
    ]
    problems = check_contacts(src, tuple(bad))
    assert len(problems) == 3, problems
    assert problems[0] == (
        "vLLM 9.9.9: vllm.core:Scheduler.step has parameters ['request', 'when', 'flag'] "
        "(defined in vllm.core.base); the plugin relies on ['req', 'when']"
    )
    assert "Scheduler.missing is missing" in problems[1]
    assert "vllm.gone does not exist" in problems[2] and "has no nope" in problems[2]


def test_checker_resolves_plugin_imports_with_fallbacks(tmp_path):
    src = _tree(tmp_path, FAKE)
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "mod.py").write_text(
        textwrap.dedent("""
        import logging
        from vllm.core import Scheduler

        logger = logging.getLogger("vllm.plugin_logger")
        TARGET = "vllm.core.sched.Scheduler.Inner"

        def lazy():
            from vllm.core.sched import helper, State
            try:
                from vllm.new_place import helper
            except ImportError:
                from vllm.core.sched import helper
            try:
                from vllm.moved import thing
            except ImportError:
                from vllm.also_moved import thing
    """)
    )
    reqs = import_requirements(plugin)
    assert all(isinstance(r, Requirement) for r in reqs)
    problems = check_imports(src, reqs)
    assert len(problems) == 1, problems  # only the import neither release has
    assert "plugin/mod.py:14 imports vllm.moved:thing" in problems[0]
    assert "vllm.also_moved:thing" in problems[0]


def test_plugin_imports_are_collected():
    where = {r.where.split(":")[0] for r in import_requirements()}
    assert {"vllm_caote/engine/scheduler.py", "vllm_caote/engine/worker.py"} <= where
    symbols = {s for r in import_requirements() for alt in r.alternatives for s in alt}
    assert "vllm.v1.core.sched.scheduler:Scheduler" in symbols
    assert "dotted:vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend" in symbols
    assert not any("vllm_caote" in s for s in symbols)  # logger names are not references


def test_runtime_resolve_takes_the_first_alternative_there_is():
    from vllm.config import VllmConfig

    assert compat._resolve("vllm.nowhere:VllmConfig|vllm.config:VllmConfig") is VllmConfig
    with pytest.raises(AttributeError):
        compat._resolve("vllm.nowhere:VllmConfig|vllm.config:Nowhere")
