"""The import direction: flows/ orchestrates tasks/, never the other way round; inside tasks/, kinds ->
blocks -> machinery; no import circle anywhere; kind modules do not pull in Prefect at import."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in ("tasks", "flows") for p in sorted((ROOT / folder).rglob("*.py"))}


def test_tasks_never_import_flows():
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        bad = sorted(m for m in _runtime_imports(path) if m == "flows" or m.startswith("flows."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


ROOMS = {"machinery": {"machinery"}, "blocks": {"blocks", "machinery"}, "kinds": {"blocks", "machinery"}}


def test_rooms_import_in_one_direction():
    """kinds -> blocks -> machinery, never back; the registry (tasks/kinds/__init__.py) reads only machinery;
    only the stage task and flows/ look kinds up."""
    for room, allowed in ROOMS.items():
        for path in sorted((ROOT / "tasks" / room).glob("*.py")):
            imported = {m.split(".")[1] for m in _runtime_imports(path) if m.startswith("tasks.")} - {"MOVED_MODULES"}
            may = {"machinery"} if path.name == "__init__.py" else allowed
            wrong = sorted(imported - may)
            assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports tasks.{wrong}: it may import {sorted(may)}"


def test_every_kind_lives_in_the_kinds_package_and_is_found_there():
    from tasks.kinds import kind_modules, kinds

    files = sorted(p.stem for p in (ROOT / "tasks" / "kinds").glob("*.py") if p.name != "__init__.py")
    assert [m.rsplit(".", 1)[1] for m in kind_modules()] == files
    assert sorted(kinds()) == files, "each module declares the kind it is named after"


def test_no_import_circle_anywhere():
    """Over tasks/ and flows/, function-level imports included, and the registry's loading of every kind."""
    modules = _project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {r for i in _runtime_imports(path) if i.split(".")[0] in ("tasks", "flows")
                 if (r := resolve(i)) and r != m} for m, path in modules.items()}
    graph["tasks.kinds"] |= {m for m in modules if m.startswith("tasks.kinds.")}  # kinds() loads each kind

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for m in sorted(graph) if (c := circle_from(m))]
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_recipe_validation_does_not_import_prefect_or_torch():
    code = ("import sys; from flows.config import load_config; load_config(); "
            "print(sorted(m for m in ('prefect', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (function-level imports included, `if TYPE_CHECKING:` left out)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_tasks_read_nothing_that_only_flows_adds():
    """A kind's config is validated alone (tasks/) or as a recipe instance (flows/ adds kind, inputs, rounds);
    what a config needs from its inputs is the kind's `input_problems`, not a field only flows/ provides."""
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        text = path.read_text()
        for field in ("inputs", "rounds"):
            assert f'getattr(self, "{field}"' not in text, f"{path.name} reads the instance field {field!r}"


def test_kinds_never_import_other_kinds():
    """What several kinds share lives in a shared module (tasks/blocks/align.py, splits.py, scoring.py, teachers.py,
    ...), so a kind's cache key covers the code it runs, not another kind's."""
    from tasks.kinds import kinds

    modules = {kind.module for kind in kinds().values()}
    for module in sorted(modules):
        imported = _runtime_imports(ROOT / Path(*module.split(".")).with_suffix(".py"))
        others = sorted(m for m in imported if m in modules - {module})
        assert not others, f"{module} imports the kinds {others}"


def test_module_function_settings_written_before_the_rooms_still_load():
    """A judge rule, verifier or rater truth named by the old flat module path loads the moved function."""
    import importlib.util

    from tasks import MOVED_MODULES
    from tasks.blocks.judges import function_source, load_function

    old, new = "tasks.synthetic:arithmetic_reward", "tasks.machinery.synthetic:arithmetic_reward"
    assert load_function(old) is load_function(new)
    assert function_source(old)["digest"] == function_source(new)["digest"]
    for before, now in MOVED_MODULES.items():
        assert importlib.util.find_spec(now) is not None, f"{before} -> {now}"
