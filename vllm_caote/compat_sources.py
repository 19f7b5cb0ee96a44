"""The register of vLLM contacts, checked statically against another vLLM's sources.

:func:`vllm_caote.compat.check` verifies the *installed* vLLM at startup. This module checks a
vLLM that is not installed (the CUDA wheels of the releases next to the one we run): given a
folder holding its ``vllm/`` Python sources (an unpacked wheel, ``scripts/vllm-sources.sh``),
:func:`check_sources` resolves every contact symbol by parsing the module files with
:mod:`ast` (classes, their bases, nested attributes and methods, module-level functions, simple
re-exports such as ``from .x import Y`` and vLLM's lazy ``MODULE_ATTRS``), compares the leading
parameter names as :func:`~vllm_caote.compat.check_signature` does, and resolves every
``vllm.*`` module and name the plugin imports (``import_requirements``). Nothing is imported
from the sources, so CUDA-only code is never run.

A contact's ``symbol`` may list alternatives, ``"a:X|b:X"``: where vLLM moved a symbol, the
plugin imports whichever exists and the contact is satisfied by either. An import inside a
``try:`` whose handler catches ``ImportError`` is satisfied by the body's imports or by any
handler's.

``python -m vllm_caote.compat_sources --fetch [DEST]`` downloads the CUDA wheels of
:data:`CHECKED_VLLM` with pip and keeps only their ``vllm/**/*.py`` (``make setup`` runs it; a
release already there is skipped). ``python -m vllm_caote.compat_sources [FOLDER...]`` prints
the problems of each folder (default: every release under DEST and the installed vLLM).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vllm_caote.compat import CONTACTS, Contact
from vllm_caote.source_tree import (
    SourceTree,
    _Def,
    _dotted_name,
    _Unresolved,
)

PLUGIN_ROOT = Path(__file__).resolve().parent

#: the vLLM releases whose CUDA wheels' sources the register is checked against (the newest
#: patch release of each minor series from the oldest supported one on); a release outside
#: :data:`~vllm_caote.compat.SUPPORTED_VLLM` is listed in :data:`UNSUPPORTED` with the reason
CHECKED_VLLM = ("0.32.0", "0.33.0", "0.34.0")

#: checked releases the pin excludes, and why (the README's version matrix says the same)
UNSUPPORTED = {
    "0.34.0": "vLLM 0.34 removed the V1 model runner the plugin hooks "
    "(vllm/v1/worker/gpu_model_runner.py, block_table.py, gpu_input_batch.py, "
    "cudagraph_dispatcher.py and VllmConfig.use_v2_model_runner are gone; only the V2 runner "
    "remains), and moved cpu_attn_reshape_and_cache out of vllm._custom_ops",
}

#: string constants in the plugin that name a vLLM module or object by its dotted path
#: (resolved at run time: attention backends, worker classes, the API server's module)
_DOTTED = re.compile(r"^vllm(\.[A-Za-z_]\w*)+$")
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


# -- what the plugin needs -------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One vLLM name the plugin uses: satisfied if any alternative resolves. An alternative is
    a tuple of ``"module"`` / ``"module:name"`` symbols that must all resolve."""

    where: str  # "vllm_caote/engine/foo.py:12"
    alternatives: tuple[tuple[str, ...], ...]


def _imports_in(stmts: list[ast.stmt]) -> list[tuple[str, int]]:
    """vLLM imports (as symbols, with their line) in ``stmts``, not descending into nested
    ``try`` statements that catch ImportError (those are requirements of their own)."""
    found = []
    for stmt in stmts:
        for node in _walk_no_guarded_try(stmt):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module == "vllm" or node.module.startswith("vllm."):
                    for alias in node.names:
                        found.append((f"{node.module}:{alias.name}", node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "vllm" or alias.name.startswith("vllm."):
                        found.append((alias.name, node.lineno))
    return found


def _guards_import(node: ast.Try) -> bool:
    for h in node.handlers:
        if h.type is None:
            return True
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(_dotted_name(t) in _IMPORT_ERRORS for t in types):
            return True
    return False


def _walk_no_guarded_try(root: ast.AST):
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Try) and _guards_import(node) and node is not root:
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


@cache
def import_requirements(root: Path = PLUGIN_ROOT) -> tuple[Requirement, ...]:
    """Every ``vllm`` import in the plugin's sources (at any depth, lazy ones included), and
    every string constant that names a vLLM module or class by its dotted path."""
    reqs: list[Requirement] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(root.parent).as_posix()
        for sym, line in _imports_in([tree]):
            reqs.append(Requirement(f"{rel}:{line}", ((sym,),)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and _guards_import(node):
                branches = [node.body] + [h.body for h in node.handlers]
                alts = tuple(tuple(s for s, _ in _imports_in(b)) for b in branches)
                if alts[0]:
                    alts = tuple(a for a in alts if a)
                    reqs.append(Requirement(f"{rel}:{node.lineno}", alts))
            elif isinstance(node, ast.Call) and _dotted_name(node.func) in (
                "logging.getLogger",
                "getLogger",
            ):
                for arg in node.args:  # logger names ("vllm.vllm_caote") are not references
                    arg._caote_logger_name = True  # type: ignore[attr-defined]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _DOTTED.match(node.value)
                and not getattr(node, "_caote_logger_name", False)
                and node.value not in _ENTRY_POINT_GROUPS
            ):
                reqs.append(Requirement(f"{rel}:{node.lineno}", ((f"dotted:{node.value}",),)))
    return tuple(reqs)


#: dotted names that are not Python objects (entry-point groups, ...)
_ENTRY_POINT_GROUPS = {"vllm.general_plugins", "vllm.stat_logger_plugins", "vllm.platform_plugins"}


# -- the check -------------------------------------------------------------------------------


def alternatives(symbol: str) -> list[str]:
    """``"a:X|b:X"`` -> ``["a:X", "b:X"]``."""
    return [s.strip() for s in symbol.split("|") if s.strip()]


def _resolve_any(src: SourceTree, symbol: str) -> tuple[str, _Def]:
    errors = []
    for alt in alternatives(symbol):
        try:
            if alt.startswith("dotted:"):
                return alt, src.resolve_dotted(alt.removeprefix("dotted:"))
            return alt, src.resolve(alt)
        except _Unresolved as e:
            errors.append(str(e))
    raise _Unresolved("; ".join(errors))


def check_contacts(src: SourceTree, contacts: tuple[Contact, ...] = CONTACTS) -> list[str]:
    version = src.version()
    problems = []
    for c in contacts:
        try:
            alt, found = _resolve_any(src, c.symbol)
        except _Unresolved as e:
            problems.append(f"vLLM {version}: {c.symbol} is missing ({e})")
            continue
        if c.params is None:
            continue
        names = src.parameters(found)
        if names is None:
            if c.params and found.kind != "function":
                problems.append(
                    f"vLLM {version}: {alt} is a {found.kind} there, not a function: its "
                    f"parameters {list(c.params)} cannot be checked"
                )
            continue
        if names[: len(c.params)] != list(c.params):
            problems.append(
                f"vLLM {version}: {alt} has parameters {names} (defined in {found.module}); "
                f"the plugin relies on {list(c.params)}"
            )
    return problems


def check_imports(
    src: SourceTree, requirements: tuple[Requirement, ...] | None = None
) -> list[str]:
    version = src.version()
    problems = []
    for req in import_requirements() if requirements is None else requirements:
        errors = []
        for alt in req.alternatives:
            missing = []
            for sym in alt:
                try:
                    _resolve_any(src, sym)
                except _Unresolved as e:
                    missing.append(f"{sym.removeprefix('dotted:')} ({e})")
            if not missing:
                break
            errors.append(", ".join(missing))
        else:
            problems.append(f"vLLM {version}: {req.where} imports {' | '.join(errors)}")
    return problems


def check_sources(root: Path | str, contacts: tuple[Contact, ...] = CONTACTS) -> list[str]:
    """Every problem the register and the plugin's imports have with the vLLM sources under
    ``root`` (a folder holding ``vllm/``); empty when all resolve."""
    src = _source_tree(str(Path(root).resolve()))
    return check_contacts(src, contacts) + check_imports(src)


@cache
def _source_tree(root: str) -> SourceTree:
    return SourceTree(root)


# -- the sources -----------------------------------------------------------------------------


def default_sources_dir() -> Path:
    """Where ``make setup`` puts the unpacked releases: ``$CAOTE_VLLM_SOURCES``, else
    ``vllm-sources/`` in the running environment (``.venv/vllm-sources``)."""
    env = os.environ.get("CAOTE_VLLM_SOURCES", "").strip()
    return Path(env) if env else Path(sys.prefix) / "vllm-sources"


def sources_dir(version: str, dest: Path | None = None) -> Path | None:
    """The unpacked sources of ``version`` (a folder holding ``vllm/``), None if not fetched."""
    folder = (dest or default_sources_dir()) / version
    return folder if (folder / ".complete").exists() else None


def fetch(version: str, dest: Path | None = None, python: str = sys.executable) -> Path:
    """Download vLLM ``version``'s CUDA wheel with pip (no dependencies, never installed),
    keep its ``vllm/**/*.py`` under ``dest/version`` and delete the wheel. Idempotent."""
    dest = dest or default_sources_dir()
    done = sources_dir(version, dest)
    if done is not None:
        return done
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{version}-") as tmp:
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
               "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               f"vllm=={version}", "-d", tmp]  # fmt: skip
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("vllm-*.whl"))
        out = Path(tmp) / "src"
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.filename.startswith("vllm/") and info.filename.endswith(".py"):
                    z.extract(info, out)
        wheel.unlink()
        (out / ".complete").write_text(f"vllm=={version} ({wheel.name}), vllm/**/*.py only\n")
        shutil.rmtree(dest / version, ignore_errors=True)
        out.rename(dest / version)
    return dest / version


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fetch"]:
        dest = Path(argv[1]) if len(argv) > 1 else None
        for version in CHECKED_VLLM:
            print(f"vLLM {version} sources: {fetch(version, dest)}")
        return 0
    if not argv:
        argv = [str(d) for v in CHECKED_VLLM if (d := sources_dir(v))]
        import vllm  # the installed release (its package folder's parent)

        argv.append(str(Path(vllm.__file__).resolve().parents[1]))
    failed = 0
    for folder in argv:
        problems = check_sources(folder)
        version = SourceTree(folder).version()
        print(f"vLLM {version} ({folder}): {'clean' if not problems else 'PROBLEMS'}")
        for p in problems:
            print(f"  {p}")
        failed |= bool(problems)
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
