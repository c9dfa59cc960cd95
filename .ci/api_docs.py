"""Builds the API reference with pdoc (Google docstrings) and fails on what would make it wrong.

    python .ci/api_docs.py OUT [MODULE ...]

Writes the HTML into OUT and exits 1 after listing every warning, from pdoc
or from the checks below (each fault a warning naming the object). Every
docstring of the documented modules is checked for
- a reference in backticks (`mvm_cuda.ops.sample_rows`, `ops.sample_rows` for a
  documented module, or `torch.fx.GraphModule` from a name of the module's
  namespace) to a name that does not exist;
- a public function, method or class whose docstring lacks the Args section
  its parameters call for, names a parameter it does not have or misses one,
  lacks Returns (or Yields) where it returns a value, or lacks Raises where its
  own body raises.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pdoc
import pdoc.doc
import pdoc.render

# Not the API of the library a user imports: the reproduction harness and the
# tests' oracle.
NOT_API = {"mvm_cuda.eval", "mvm_cuda.reference"}

_REFERENCE = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")
_SECTION = re.compile(r"^(\w[\w ]*):\s*$")


def _resolves(dotted: str, namespace: dict) -> bool:
    """Whether dotted names an object: from a name of `namespace` (the module's globals) on,
    else as a module path and its attributes."""
    parts = dotted.split(".")
    if parts[0] in namespace:
        obj = namespace[parts[0]]
        for name in parts[1:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def check_references(where: str, docstring: str, modules: list[str], namespace: dict) -> None:
    short = {m.rsplit(".", 1)[-1]: m for m in modules if "." in m}
    for dotted in _REFERENCE.findall(docstring):
        head, _, rest = dotted.partition(".")
        if head in namespace or head == "mvm_cuda":
            target = dotted
        elif head in short:
            target = f"{short[head]}.{rest}"
        else:
            continue  # code (`h.permute`), or a name the module does not know
        if not _resolves(target, namespace):
            warnings.warn(f"{where}: the docstring names `{dotted}`, which does not exist")


def _sections(docstring: str) -> dict[str, list[str]]:
    """Google-style sections: title -> the section's lines, dedented."""
    sections, current = {}, None
    for line in inspect.cleandoc(docstring).splitlines():
        m = _SECTION.match(line)
        if m:
            current = sections.setdefault(m.group(1), [])
        elif current is not None and line and not line[0].isspace():
            current = None
        elif current is not None:
            current.append(line)
    return sections


def _own_raises(fn) -> bool:
    """Whether fn's own body (not nested functions) raises an exception it names."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    body = tree.body[0]
    todo, found = list(ast.iter_child_nodes(body)), False
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            found |= not (isinstance(exc, ast.Name) and exc.id == "NotImplementedError")
        todo.extend(ast.iter_child_nodes(node))
    return found


def check_sections(where: str, docstring: str, fn, returns_value: bool, args_titles=("Args",)) -> None:
    """args_titles: the sections that may list the parameters (a dataclass's: Attributes or Args)."""
    sections = _sections(docstring)
    args = next((title for title in args_titles if title in sections), args_titles[0])
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    named = {re.split(r"[ :(]", line.strip(), maxsplit=1)[0].lstrip("*")
             for line in sections.get(args, []) if re.match(r"^ {4}\*{0,2}\w+( \([^)]*\))?:", line)}
    if params and args not in sections:
        warnings.warn(f"{where}: the docstring has no {args} section")
    elif named != {p.name for p in params}:
        warnings.warn(f"{where}: {args} names {sorted(named)}, the signature has {[p.name for p in params]}")
    if returns_value and not {"Returns", "Yields"} & sections.keys():
        warnings.warn(f"{where}: the docstring has no Returns section")
    if _own_raises(fn) and "Raises" not in sections:
        warnings.warn(f"{where}: the function raises, but the docstring has no Raises section")


def _returns_value(fn) -> bool:
    annotation = inspect.signature(fn).return_annotation
    return annotation not in (inspect.Signature.empty, None, "None")


def _overrides_foreign(cls, name: str) -> bool:
    """Whether `name` is a method that cls inherits a meaning for from outside mvm_cuda (nn.Module.forward)."""
    return any(name in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith("mvm_cuda"))


def _public(module: pdoc.doc.Module):
    """The module's own public members (its __all__ where it has one) and their classes' own
    public members, as (qualified name, doc)."""
    for member in module.members.values():
        if member.taken_from[0] != module.fullname or member.name.startswith("_"):
            continue  # a re-export is checked where it is defined
        yield f"{module.fullname}.{member.qualname}", member
        if isinstance(member, pdoc.doc.Class):
            for inner in member.own_members:
                if not inner.name.startswith("_"):
                    yield f"{module.fullname}.{inner.qualname}", inner


def check_module(module: pdoc.doc.Module, modules: list[str]) -> None:
    namespace = vars(module.obj)
    check_references(module.fullname, module.docstring, modules, namespace)
    for where, member in _public(module):
        check_references(where, member.docstring, modules, namespace)
        if isinstance(member, pdoc.doc.Class):
            if not member.docstring:
                warnings.warn(f"{where}: no docstring")
            elif "__init__" in vars(member.obj):
                check_sections(where, member.docstring, member.obj.__init__, returns_value=False,
                               args_titles=("Attributes", "Args") if dataclasses.is_dataclass(member.obj) else ("Args",))
        elif isinstance(member, pdoc.doc.Function):
            owner = getattr(module.obj, member.qualname.split(".")[0])
            if inspect.isclass(owner) and member.obj.__doc__ is None and (
                    _overrides_foreign(owner, member.name) or member.docstring):
                continue  # torch's protocol (extra_repr), or a docstring inherited from our base
            if not member.docstring:
                warnings.warn(f"{where}: no docstring")
            else:
                check_sections(where, member.docstring, member.obj, _returns_value(member.obj))


def library_modules() -> list[str]:
    """mvm_cuda and its public modules, NOT_API aside."""
    package = importlib.import_module("mvm_cuda")
    names = [f"mvm_cuda.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return ["mvm_cuda"] + sorted(n for n in names if n not in NOT_API)


def main(out: str, modules: list[str]) -> int:
    with warnings.catch_warnings(record=True) as faults:
        warnings.simplefilter("always")
        pdoc.render.configure(docformat="google")
        modules = modules or library_modules()
        for name in modules:
            check_module(pdoc.doc.Module(importlib.import_module(name)), modules)
        pdoc.pdoc(*modules, output_directory=Path(out))
    for fault in faults:
        print(f"api_docs: {fault.category.__name__}: {fault.message}", file=sys.stderr)
    if faults:
        print(f"api_docs: FAILED: {len(faults)} warning(s)", file=sys.stderr)
        return 1
    print(f"api_docs: {', '.join(modules)} -> {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
