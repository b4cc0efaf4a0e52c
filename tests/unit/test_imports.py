"""The import direction: flows/ orchestrates tasks/, never the other way round; no circle among the stage
machinery; kind modules do not pull in Prefect at import."""

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


def test_tasks_never_import_flows():
    for path in sorted((ROOT / "tasks").glob("*.py")):
        bad = sorted(m for m in _imports(path) if m == "flows" or m.startswith("flows."))
        assert not bad, f"{path.name} imports {bad}"


def test_no_import_circle_among_the_stage_machinery():
    machinery = ["stage", "launch", "training", "checkpoints", "modeling", "ray_engine"]
    graph = {m: {i.split(".")[1] for i in _imports(ROOT / "tasks" / f"{m}.py")
                 if i.startswith("tasks.") and i.split(".")[1] in machinery and i.split(".")[1] != m}
             for m in machinery}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = [m for m in machinery if reaches(m, m)]
    assert not circles, f"import circle through {circles}: {graph}"


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


def test_no_import_circle_in_flows():
    modules = {p.stem for p in (ROOT / "flows").glob("*.py")}
    graph = {m: {i.split(".")[1] for i in _runtime_imports(ROOT / "flows" / f"{m}.py")
                 if i.startswith("flows.") and i.split(".")[1] in modules and i.split(".")[1] != m}
             for m in modules}

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for m in sorted(modules) if (c := circle_from(m))]
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_tasks_read_nothing_that_only_flows_adds():
    """A kind's config is validated alone (tasks/) or as a recipe instance (flows/ adds kind, inputs, rounds);
    what a config needs from its inputs is the kind's `input_problems`, not a field only flows/ provides."""
    for path in sorted((ROOT / "tasks").glob("*.py")):
        text = path.read_text()
        for field in ("inputs", "rounds"):
            assert f'getattr(self, "{field}"' not in text, f"{path.name} reads the instance field {field!r}"


def test_kinds_never_import_other_kinds():
    """What several kinds share lives in a shared module (tasks/align.py, splits.py, scoring.py, teachers.py,
    ...), so a kind's cache key covers the code it runs, not another kind's."""
    from tasks.kinds import kinds

    modules = {kind.module for kind in kinds().values()}
    for module in sorted(modules):
        imported = _runtime_imports(ROOT / Path(*module.split(".")).with_suffix(".py"))
        others = sorted(m for m in imported if m in modules - {module})
        assert not others, f"{module} imports the kinds {others}"
