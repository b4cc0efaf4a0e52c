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
    machinery = ["stage", "launch", "training", "checkpoints", "modeling"]
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
