"""A vLLM release's Python sources read without importing them: the symbol resolver behind
:mod:`vllm_caote.compat_sources` (classes, their bases, nested attributes and methods,
module-level functions, simple re-exports such as ``from .x import Y`` and vLLM's lazy
``MODULE_ATTRS``, all by :mod:`ast`)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


class _Unresolved(Exception):
    pass


@dataclass(frozen=True)
class _Def:
    """What a name resolves to in the sources."""

    kind: str  # "module" | "class" | "function" | "value"
    module: str
    node: ast.AST | None = None
    decorators: tuple[str, ...] = ()


class SourceTree:
    """The ``vllm`` package of one unpacked release, parsed on demand."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not (self.root / "vllm" / "__init__.py").exists():
            raise FileNotFoundError(f"no vllm/__init__.py under {self.root}")
        self._parsed: dict[str, ast.Module | None] = {}

    def version(self) -> str:
        """The release the sources are (vllm/_version.py, else the folder's name)."""
        tree = self.tree("vllm._version")
        for stmt in tree.body if tree else ():
            if (
                isinstance(stmt, ast.Assign)
                and any("__version__" in _target_names(t) for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant)
            ):
                return str(stmt.value.value)
        return self.root.name

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def is_package(self, module: str) -> bool:
        return (self.root.joinpath(*module.split(".")) / "__init__.py").is_file()

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._parsed:
            path = self.module_file(module)
            self._parsed[module] = ast.parse(path.read_text(), str(path)) if path else None
        return self._parsed[module]

    # -- name resolution -------------------------------------------------------------------

    def resolve(self, symbol: str) -> _Def:
        """``"module:Qual.name"`` (or a plain module) to its definition; raises _Unresolved."""
        module, _, qual = symbol.partition(":")
        if self.tree(module) is None:
            raise _Unresolved(f"module {module} does not exist")
        found = _Def("module", module)
        for part in qual.split(".") if qual else ():
            found = self._attribute(found, part)
        return found

    def resolve_dotted(self, dotted: str) -> _Def:
        """``"a.b.C.meth"``: the longest prefix that is a module, the rest attributes."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            if self.tree(module) is not None:
                return self.resolve(f"{module}:{'.'.join(parts[i:])}" if i < len(parts) else module)
        raise _Unresolved(f"module {parts[0]} does not exist")

    def _attribute(self, owner: _Def, name: str, _seen: frozenset = frozenset()) -> _Def:
        if owner.kind == "module":
            return self._module_name(owner.module, name, _seen)
        if owner.kind == "class":
            return self._class_attribute(owner, name, _seen)
        raise _Unresolved(f"{name} looked up on a {owner.kind} in {owner.module}")

    def _module_name(self, module: str, name: str, seen: frozenset) -> _Def:
        key = (module, name)
        if key in seen:
            raise _Unresolved(f"{module}.{name}: circular re-export")
        seen = seen | {key}
        tree = self.tree(module)
        if tree is None:
            raise _Unresolved(f"module {module} does not exist")
        for stmt in _flatten(tree.body):
            hit = self._binding(module, stmt, name, seen)
            if hit is not None:
                return hit
        lazy = _module_attrs(tree).get(name)  # vllm/__init__.py's MODULE_ATTRS + __getattr__
        if lazy is not None:
            target, _, attr = lazy.partition(":")
            return self._attribute(_Def("module", _absolute(module, target, True)), attr, seen)
        if self.is_package(module) and self.tree(f"{module}.{name}") is not None:
            return _Def("module", f"{module}.{name}")  # a submodule: "from pkg import mod"
        raise _Unresolved(f"{module} has no {name}")

    def _binding(self, module: str, stmt: ast.stmt, name: str, seen: frozenset) -> _Def | None:
        if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if stmt.name == name:
                kind = "class" if isinstance(stmt, ast.ClassDef) else "function"
                return _Def(kind, module, stmt, _decorator_names(stmt))
        elif isinstance(stmt, ast.Assign):
            if any(name in _target_names(t) for t in stmt.targets):
                return self._value(module, stmt.value, seen)
        elif isinstance(stmt, ast.AnnAssign):
            if name in _target_names(stmt.target):
                return (
                    self._value(module, stmt.value, seen) if stmt.value else _Def("value", module)
                )
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == name and alias.name != "*":
                    source = _absolute(module, "." * stmt.level + (stmt.module or ""),
                                       self.is_package(module))  # fmt: skip
                    return self._attribute(_Def("module", source), alias.name, seen)
            for alias in stmt.names:
                if alias.name == "*":
                    source = _absolute(module, "." * stmt.level + (stmt.module or ""),
                                       self.is_package(module))  # fmt: skip
                    try:
                        return self._module_name(source, name, seen)
                    except _Unresolved:
                        pass
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname == name:
                    return _Def("module", alias.name)
        return None

    def _value(self, module: str, value: ast.expr | None, seen: frozenset) -> _Def:
        """``X = Y`` / ``X = mod.Y``: follow a simple alias, else an opaque value."""
        dotted = _dotted_name(value) if value is not None else None
        if dotted:
            head, *rest = dotted.split(".")
            try:
                found = self._module_name(module, head, seen)
                for part in rest:
                    found = self._attribute(found, part, seen)
                return found
            except _Unresolved:
                pass
        return _Def("value", module, value)

    def _class_attribute(self, cls: _Def, name: str, seen: frozenset) -> _Def:
        for c in self._mro(cls):
            for stmt in _flatten(c.node.body):
                if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    if stmt.name == name:
                        kind = "class" if isinstance(stmt, ast.ClassDef) else "function"
                        return _Def(kind, c.module, stmt, _decorator_names(stmt))
                elif isinstance(stmt, ast.Assign | ast.AnnAssign):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    if any(name in _target_names(t) for t in targets):
                        return _Def("value", c.module, stmt.value)
        raise _Unresolved(f"{_qualname(cls)} has no {name}")

    def _mro(self, cls: _Def) -> list[_Def]:
        """The class, then its bases depth-first (as far as the sources name them)."""
        order, stack = [], [cls]
        while stack:
            c = stack.pop(0)
            if any(o.node is c.node for o in order):
                continue
            order.append(c)
            bases = []
            for base in c.node.bases:
                dotted = _dotted_name(base.value if isinstance(base, ast.Subscript) else base)
                if not dotted:
                    continue
                head, *rest = dotted.split(".")
                try:
                    found = self._module_name(c.module, head, frozenset())
                    for part in rest:
                        found = self._attribute(found, part)
                except _Unresolved:
                    continue  # a base outside vllm (torch, typing, ABC, ...)
                if found.kind == "class":
                    bases.append(found)
            stack[:0] = bases
        return order

    # -- parameters ------------------------------------------------------------------------

    def _dataclass_fields(self, cls: _Def) -> list[str] | None:
        """A dataclass's ``__init__`` parameters: its annotated fields, bases' first."""
        mro = self._mro(cls)
        if not any("dataclass" in _decorator_names(c.node) for c in mro):
            return None
        names: list[str] = []
        for c in reversed(mro):
            for stmt in c.node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    ann = _dotted_name(
                        stmt.annotation.value
                        if isinstance(stmt.annotation, ast.Subscript)
                        else stmt.annotation
                    )
                    if ann and ann.rsplit(".", 1)[-1] in ("ClassVar", "InitVar"):
                        continue
                    if stmt.target.id not in names:
                        names.append(stmt.target.id)
        return names

    def parameters(self, found: _Def) -> list[str] | None:
        """Parameter names as ``inspect.signature`` on the resolved object gives them, minus
        ``self``; None where there is nothing to compare (a value, a property)."""
        if found.kind == "class":
            try:
                init = self._class_attribute(found, "__init__", frozenset())
            except _Unresolved:
                return self._dataclass_fields(found)
            return self.parameters(init)
        if found.kind != "function":
            return None
        if "property" in found.decorators or "cached_property" in found.decorators:
            return None
        a = found.node.args
        names = [p.arg for p in (*a.posonlyargs, *a.args)]
        if a.vararg:
            names.append(a.vararg.arg)
        names += [p.arg for p in a.kwonlyargs]
        if a.kwarg:
            names.append(a.kwarg.arg)
        if "classmethod" in found.decorators and names:
            names = names[1:]  # bound to the class: cls is not a parameter
        return [n for n in names if n != "self"]


# -- helpers ---------------------------------------------------------------------------------


def _flatten(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a module or class body, with those under ``if``/``try``/``with``."""
    out = []
    for stmt in body:
        if isinstance(stmt, ast.If):
            out += _flatten(stmt.body) + _flatten(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            out += _flatten(stmt.body)
            for h in stmt.handlers:
                out += _flatten(h.body)
            out += _flatten(stmt.orelse) + _flatten(stmt.finalbody)
        elif isinstance(stmt, ast.With):
            out += _flatten(stmt.body)
        else:
            out.append(stmt)
    return out


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Tuple | ast.List):
        return set().union(*(_target_names(t) for t in target.elts))
    return set()


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted_name(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _decorator_names(node: ast.AST) -> tuple[str, ...]:
    names = []
    for d in getattr(node, "decorator_list", ()):
        dotted = _dotted_name(d.func if isinstance(d, ast.Call) else d)
        if dotted:
            names.append(dotted.rsplit(".", 1)[-1])
    return tuple(names)


def _module_attrs(tree: ast.Module) -> dict[str, str]:
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODULE_ATTRS" for t in stmt.targets
        ):
            try:
                value = ast.literal_eval(stmt.value)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def _absolute(module: str, target: str, is_package: bool) -> str:
    """``from .x import`` inside ``module`` to an absolute module name."""
    level = len(target) - len(target.lstrip("."))
    if not level:
        return target
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    rest = target[level:]
    return ".".join(parts + ([rest] if rest else []))


def _qualname(found: _Def) -> str:
    return f"{found.module}:{getattr(found.node, 'name', '?')}"
