"""The drift guard: the keyword arguments the course passes to the libraries it teaches, checked
against the installed libraries, so that a release which renames or removes one fails CI before it
breaks a learner's Colab (transformers 5 removed `from_pretrained(load_in_4bit=True)`).

    python -m qlearn.course.drift        # every call site checked; exit 1 when something drifted
    python -m pytest tests/test_drift.py # the same as a test (CI; `.ci/run --latest` runs it first)

Step 1 (collect): parse (ast) every qlearn/**/*.py and every notebook code cell; a call whose callee
    resolves through the file's imports into a WATCHED library is a CallSite with the keyword names
    it passes, including those of a `**kw` dict built in the same function (a literal, `dict(...)`,
    `kw["name"] = ...`, `kw.update(name=...)`).
Step 2 (resolve): import the callee from the installed library; a name that is gone is drift too.
Step 3 (accepted): the callee's named parameters; where it also takes **kwargs, only the names its
    source reads from them (`kwargs.pop("name")`, `.get`, `kwargs["name"]`), plus those of FORWARDS.
    BitsAndBytesConfig's **kwargs, for one, are only logged as unused: a misspelt keyword there
    changes nothing, silently, so it must fail here.
Step 4 (check): each keyword not accepted is a Drift naming the library, its version, the callee,
    the keyword, the place, and the closest accepted name.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import json
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..paths import ROOT

__all__ = ["WATCHED", "CallSite", "Drift", "accepted_keywords", "check", "collect", "collect_source"]

WATCHED = ("bitsandbytes", "peft", "transformers", "torchao")
# Callees that hand their **kwargs on to another callee, which then reads them (qualified names).
FORWARDS = {
    # AutoModelFor*.from_pretrained picks the model class, then calls its from_pretrained(**kwargs)
    "transformers.models.auto.auto_factory._BaseAutoModelClass.from_pretrained":
        ("transformers.modeling_utils.PreTrainedModel.from_pretrained",),
    # what from_pretrained does not read itself updates the loaded config: every config's attributes
    # (a model's own, e.g. LlamaConfig's use_cache=, are not known before the config is read: add them here)
    "transformers.modeling_utils.PreTrainedModel.from_pretrained":
        ("transformers.configuration_utils.PreTrainedConfig",),
}


@dataclass(frozen=True)
class CallSite:
    callee: str  # dotted, as the imports name it: "transformers.BitsAndBytesConfig"
    keywords: tuple[str, ...]
    where: str  # "qlearn/models.py:88" or "notebooks/07_qlora.ipynb, cell 12, line 3"


@dataclass(frozen=True)
class Drift:
    site: CallSite
    keyword: str | None  # None: the callee itself is gone
    accepted: tuple[str, ...] = ()

    @property
    def library(self) -> str:
        return self.site.callee.split(".")[0]

    def __str__(self) -> str:
        lib = f"{self.library} {_version(self.library)}"
        if self.keyword is None:
            return f"{lib}: {self.site.callee} no longer exists ({self.site.where})"
        close = difflib.get_close_matches(self.keyword, self.accepted, n=1)
        hint = f"; did you mean {close[0]}=?" if close else ""
        return (f"{lib}: {self.site.callee}() does not accept the keyword {self.keyword}= "
                f"({self.site.where}){hint}")


def _version(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "(not installed)"


# Step 1: collect ------------------------------------------------------------------------------------

def _imports(tree: ast.AST, aliases: dict[str, str]) -> None:
    """Add every import of `tree` (any depth: qlearn imports inside functions) to `aliases`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"


def _dotted(expr: ast.expr, aliases: dict[str, str]) -> str | None:
    attrs = []
    while isinstance(expr, ast.Attribute):
        attrs.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name) and expr.id in aliases:
        return ".".join([aliases[expr.id], *reversed(attrs)])
    return None


def _own_nodes(scope: ast.AST):
    """The nodes of `scope`, not descending into the functions defined inside it."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _literal_keys(expr: ast.expr) -> set[str]:
    if isinstance(expr, ast.Dict):
        return {k.value for k in expr.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "dict":
        return {kw.arg for kw in expr.keywords if kw.arg} | set().union(*map(_literal_keys, expr.args))
    return set()


def _dict_keys(scope: ast.AST, keys: dict[str, set[str]]) -> None:
    """Add the keys put into each name's dict within `scope` to `keys` ({name: {key, ...}})."""
    for node in _own_nodes(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and (found := _literal_keys(node.value)):
                    keys.setdefault(target.id, set()).update(found)
                elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                      and isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str)):
                    keys.setdefault(target.value.id, set()).add(target.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
              and isinstance(node.func.value, ast.Name)):
            found = {kw.arg for kw in node.keywords if kw.arg} | set().union(*map(_literal_keys, node.args))
            keys.setdefault(node.func.value.id, set()).update(found)


def _calls(scope: ast.AST, aliases: dict[str, str], keys: dict[str, set[str]], where) -> list[tuple]:
    """(line, column, CallSite) of every watched call in `scope`, in source order."""
    keys = {k: set(v) for k, v in keys.items()}
    _dict_keys(scope, keys)
    sites = []
    for node in _own_nodes(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            sites += _calls(node, aliases, keys, where)  # a function sees its own dicts and the module's
        elif (isinstance(node, ast.Call) and (callee := _dotted(node.func, aliases))
              and callee.split(".")[0] in WATCHED):
            names = [kw.arg for kw in node.keywords if kw.arg]
            for kw in node.keywords:
                if kw.arg is None:  # **something: a dict literal, or a name whose keys were collected
                    names += sorted(_literal_keys(kw.value) if not isinstance(kw.value, ast.Name)
                                    else keys.get(kw.value.id, set()))
            sites.append((node.lineno, node.col_offset, CallSite(callee, tuple(names), where(node.lineno))))
    return sorted(sites, key=lambda t: t[:2])


def collect_source(source: str, where: str, cell: int | None = None, aliases: dict[str, str] | None = None,
                   keys: dict[str, set[str]] | None = None) -> list[CallSite]:
    """Step 1 on one file (`where`) or one notebook cell (`cell`, its index). `aliases` and `keys`
    carry a notebook's imports and dicts from cell to cell."""
    aliases = {} if aliases is None else aliases
    keys = {} if keys is None else keys
    tree = ast.parse(source)
    _imports(tree, aliases)
    place = (lambda line: f"{where}:{line}") if cell is None else (lambda line: f"{where}, cell {cell}, line {line}")
    sites = [site for *_, site in _calls(tree, aliases, keys, place)]
    _dict_keys(tree, keys)  # module-level dicts stay visible to later cells
    return sites


def _python(cell_source: str) -> str:
    """A code cell as plain Python (IPython's own transform turns %magics and !commands into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell_source)


def collect(root: Path = ROOT) -> list[CallSite]:
    """Step 1 over the course: qlearn/**/*.py, then notebooks/*.ipynb."""
    sites = []
    for path in sorted((root / "qlearn").rglob("*.py")):
        sites += collect_source(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        aliases, keys = {}, {}
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                sites += collect_source(_python(source), str(path.relative_to(root)), i, aliases, keys)
    return sites


# Steps 2-4 ------------------------------------------------------------------------------------------

def _resolve(dotted: str):
    """The installed object a dotted name stands for, or None when it does not exist."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _functions(obj) -> list:
    """The plain functions behind a class (its __init__ and __new__), a bound or class method, or a function."""
    found = [obj.__init__, obj.__new__] if inspect.isclass(obj) else [obj]
    return [getattr(f, "__func__", f) for f in found if inspect.isfunction(getattr(f, "__func__", f))]


def _kwargs_reads(fn) -> set[str]:
    """Names `fn`'s source reads from its **kwargs (`kwargs.pop("x")`, `.get("x")`, `kwargs["x"]`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        var = next(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.VAR_KEYWORD)
    except (OSError, TypeError, ValueError, StopIteration, SyntaxError):
        return set()
    reads = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("pop", "get")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == var and node.args
                and isinstance(node.args[0], ast.Constant)):
            reads.add(node.args[0].value)
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == var
              and isinstance(node.slice, ast.Constant)):
            reads.add(node.slice.value)
    return reads


def accepted_keywords(obj) -> set[str] | None:
    """Step 3: the keyword names `obj` accepts, or None when its signature cannot be read."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return names
    for fn in _functions(obj):
        names |= _kwargs_reads(fn)
        for target in FORWARDS.get(f"{fn.__module__}.{fn.__qualname__}", ()):
            names |= accepted_keywords(_resolve(target)) or set()
    return names


def check(sites: list[CallSite]) -> list[Drift]:
    """Steps 2-4: every keyword of every call site that the installed library does not accept."""
    drifts, cache = [], {}
    for site in sites:
        if site.callee not in cache:
            obj = _resolve(site.callee)
            cache[site.callee] = (obj is not None, accepted_keywords(obj) if obj is not None else None)
        exists, accepted = cache[site.callee]
        if not exists:
            drifts.append(Drift(site, None))
            continue
        if accepted is None:
            continue  # a builtin without a readable signature: nothing to check against
        drifts += [Drift(site, kw, tuple(sorted(accepted))) for kw in site.keywords if kw not in accepted]
    return drifts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qlearn.course.drift", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="the course's folder (default: this checkout)")
    sites = collect(ap.parse_args(argv).root)
    drifts = check(sites)
    libs = sorted({s.callee.split(".")[0] for s in sites})
    print(f"{len(sites)} calls into {', '.join(f'{lib} {_version(lib)}' for lib in libs)} checked, "
          f"{sum(len(s.keywords) for s in sites)} keywords")
    for drift in drifts:
        print(f"DRIFT {drift}")
    return 1 if drifts else 0


if __name__ == "__main__":
    sys.exit(main())
