"""What the modules of the compiled build (setup.py's ``COMPILED``) must not do: patterns
that mypyc compiles without a word and then runs differently from CPython.

- **A bare ``raise``, or ``log.exception``, after an ``await`` in an ``except`` block.**
  A compiled coroutine does not keep its own "exception being handled" across a suspension:
  when it resumes, the thread's is whatever another task left there, so a bare ``raise``
  re-raised another task's exception (an agent's StreamError instead of the ProblemError
  being handled, for one). Name the exception and raise or log that.
- **One name bound by ``except … as`` to exceptions of different types in one function.**
  mypyc gives the name the first handler's type and the second handler fails with a
  TypeError ("LinkRefused object expected; got TransportClosed").
- **A dataclass's generated ``__init__``.** mypyc compiles the class but keeps the
  ``__init__`` the decorator generates, which the interpreter runs (about 0.6 µs for four
  frozen fields, against 0.03 compiled). Dataclasses made per request or per frame declare
  ``init=False`` and write their own; :data:`MADE_RARELY` lists those made once per tunnel,
  connection or error.
- **Async generators** (mypyc refuses them, as does FastAPI's signature reading of compiled
  functions): the build would fail; this says which module and why before a build does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            modules: list[str] = ast.literal_eval(node.value)
            return modules
    raise AssertionError("setup.py has no COMPILED list")


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _own_nodes(handler: ast.ExceptHandler) -> list[ast.AST]:
    """The handler's nodes, not those of functions defined inside it."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(handler.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return found


def _is_log_exception(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "exception"
    )


#: Dataclasses of the compiled modules made once per tunnel, connection, error or token
#: lookup, whose generated ``__init__`` costs nothing that matters.
MADE_RARELY = frozenset({"Settings", "LiveTunnel", "ErrorEvent", "Plan", "Principal"})


def _generates_init(cls: ast.ClassDef) -> bool:
    """A ``@dataclass`` whose ``__init__`` the decorator writes."""
    for decorator in cls.decorator_list:
        name = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(name).split(".")[-1] != "dataclass":
            continue
        if isinstance(decorator, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in decorator.keywords
        ):
            return False
        return not any(
            isinstance(item, ast.FunctionDef) and item.name == "__init__" for item in cls.body
        )
    return False


def violations(source: str, path: str) -> list[str]:
    tree = ast.parse(source)
    found: list[str] = []
    for handler in (n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)):
        nodes = _own_nodes(handler)
        awaits = [n.lineno for n in nodes if isinstance(n, ast.Await)]
        if not awaits:
            continue
        first = min(awaits)
        for node in nodes:
            after = getattr(node, "lineno", 0) > first
            where = f"{path}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Raise) and node.exc is None and after:
                found.append(f"{where}: bare raise after an await in an except block")
            if _is_log_exception(node) and after:
                found.append(f"{where}: .exception() after an await in an except block")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if cls.name not in MADE_RARELY and _generates_init(cls):
            found.append(f"{path}:{cls.lineno}: dataclass {cls.name} with a generated __init__")
    for function in _functions(tree):
        names: dict[str, set[str]] = {}
        for handler in (n for n in ast.walk(function) if isinstance(n, ast.ExceptHandler)):
            if handler.name:
                kind = ast.unparse(handler.type) if handler.type else "BaseException"
                names.setdefault(handler.name, set()).add(kind)
        for name, kinds in names.items():
            if len(kinds) > 1:
                found.append(
                    f"{path}:{function.lineno}: {function.name} binds {name!r} to {sorted(kinds)}"
                )
        if isinstance(function, ast.AsyncFunctionDef) and any(
            isinstance(n, ast.Yield | ast.YieldFrom) for n in ast.walk(function)
        ):
            found.append(f"{path}:{function.lineno}: async generator {function.name}")
    return found


@pytest.mark.parametrize("module", compiled_modules())
def test_compiled_module_avoids_what_mypyc_runs_differently(module: str) -> None:
    assert violations((ROOT / module).read_text(), module) == []


def test_the_rules_catch_each_pattern() -> None:
    source = """
async def a():
    try:
        pass
    except ValueError:
        await b()
        raise

async def c():
    try:
        pass
    except ValueError as exc:
        await b()
        log.exception("x")
    try:
        pass
    except KeyError as exc:
        pass

async def d():
    yield 1

async def fine():
    try:
        pass
    except ValueError as exc:
        await b()
        raise exc

@dataclass(frozen=True)
class Made:
    x: int

@dataclasses.dataclass(frozen=True, init=False)
class Written:
    x: int
    def __init__(self, x: int) -> None:
        object.__setattr__(self, "x", x)
"""
    found = violations(source, "m.py")
    assert found == [
        "m.py:7: bare raise after an await in an except block",
        "m.py:14: .exception() after an await in an except block",
        "m.py:31: dataclass Made with a generated __init__",
        "m.py:9: c binds 'exc' to ['KeyError', 'ValueError']",
        "m.py:20: async generator d",
    ]
