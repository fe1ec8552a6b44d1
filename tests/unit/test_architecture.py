"""The package's shape, checked: imports flow one way between the sub-packages, the entry point
imports nothing slow, every event emitted is declared with its fields, and docs/events.md is the
generated reference."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import events

PACKAGE = Path(__file__).resolve().parents[2] / "daemon"
REPO = PACKAGE.parent
# Lower layers never import higher ones (at run time: imports for type annotations are exempt).
LAYERS = [
    {"daemon.errors", "daemon.events"},
    {"daemon.config"},
    {"daemon.service"},
    {"daemon.ckpt"},
    {"daemon.dist"},
    {"daemon.train"},
    {"daemon.builtin"},
    {"daemon.ops"},
    {"daemon", "daemon.entry", "daemon.__main__"},
]


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, layer in enumerate(LAYERS):
            if prefix in layer:
                return index
    raise AssertionError(f"{module} is in no layer")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> list[str]:
    """The daemon modules a module imports when it runs, anywhere in it (a function's lazy import
    too), leaving out `if TYPE_CHECKING:` blocks."""
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon"):
            found += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("daemon")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_flow_from_higher_layers_to_lower_ones(path):
    own = module_name(path)
    upward = [name for name in runtime_imports(ast.parse(path.read_text())) if layer_of(name) > layer_of(own)]
    assert not upward, f"{own} (layer {layer_of(own)}) imports {upward}"


def test_the_layering_check_catches_an_upward_import():
    tree = ast.parse("from daemon.train.loop import Trainer\nif TYPE_CHECKING:\n    from daemon.ops import cli\n")
    assert runtime_imports(tree) == ["daemon.train.loop.Trainer"]
    assert layer_of("daemon.train.loop") > layer_of("daemon.ckpt.store")


def test_sub_packages_import_nothing_of_their_own():
    """An empty `__init__.py` keeps the entry point's start-up window as it is."""
    inits = sorted(PACKAGE.glob("*/__init__.py"))
    assert inits, "no sub-packages found"
    for init in inits:
        assert init.read_text() == "", f"{init} is not empty"


def test_the_entry_point_imports_nothing_slow_before_its_handlers():
    code = "import sys, daemon.entry; print(sorted(m for m in ('torch', 'structlog', 'yaml', 'dataclasses') if m in sys.modules))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "[]"


def emitted() -> list[tuple[str, str, list[str], int]]:
    """Every `events.NAME.emit(...)` in the package: file, NAME, its keyword names, its line."""
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("emit", "emit_with_traceback"):
                continue
            target = node.func.value
            if not (
                isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "events"
            ):
                continue
            names = [keyword.arg for keyword in node.keywords if keyword.arg]
            for keyword in node.keywords:  # **{"from": ...}: a literal's keys count as named
                if keyword.arg is None and isinstance(keyword.value, ast.Dict):
                    names += [key.value for key in keyword.value.keys if isinstance(key, ast.Constant)]
            calls.append((str(path.relative_to(REPO)), target.attr, names, node.lineno))
    return calls


def test_every_emitted_event_is_declared_with_the_fields_it_carries():
    calls = emitted()
    assert len(calls) > 30
    for where, name, fields, line in calls:
        event = getattr(events, name, None)
        assert isinstance(event, events.Event), f"{where}:{line}: events.{name} is not declared"
        allowed = set(event.fields) | (set(events.POSITION) if event.at_position else set())
        undeclared = set(fields) - allowed
        assert not undeclared, f"{where}:{line}: {event.name} carries undeclared fields {sorted(undeclared)}"


def test_every_declared_event_is_emitted_somewhere():
    used = {name for _, name, _, _ in emitted()}
    for path in SOURCES:  # the errors' events, emitted by TrainerError.report()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "event" for t in node.targets):
                used.add(ast.unparse(node.value).removeprefix("events."))
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "event":
                used.add(ast.unparse(node.value).removeprefix("events."))
    declared = {name for name, value in vars(events).items() if isinstance(value, events.Event)}
    assert declared - used == set()
    assert len({event.name for event in events.ALL}) == len(events.ALL), "an event name declared twice"


def test_docs_events_is_the_generated_reference():
    assert (REPO / "docs" / "events.md").read_text() == events.as_markdown(), (
        "run: python -m daemon.events > docs/events.md"
    )
