"""Stage cache keys: what a stage's output depends on, and nothing else (no flow-run id, no instance name).

The code part is derived from imports: the kind's module and every project module it imports,
directly or inside a function, transitively. Modules that only record or move results (tracking,
the store, fault points) are left out: editing them does not change what a stage computes.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

from tasks.machinery.store import digest_json

ML_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "accelerate", "pyarrow", "rensa",
                "ahocorasick-rs")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("tasks",)
# Bookkeeping: they record, move or key results; they do not compute them.
# The packages' own files are their docstrings and the kind registry.
NOT_RESULT_CODE = frozenset({"tasks", "tasks.kinds", "tasks.blocks", "tasks.machinery", "tasks.stage",
                             *(f"tasks.machinery.{name}" for name in ("tracking", "store", "faults", "hardware",
                                                                       "cachekeys", "checkpoints", "logs",
                                                                       "stagekind", "context"))})


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    versions = {}
    for name in ML_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _module_file(module: str, root: Path) -> Path | None:
    path = root.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(source: str, root: Path) -> set[str]:
    """Project modules named by the import statements anywhere in `source` (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tasks import data` names the module tasks.kinds.prepare_data; `from tasks.kinds.prepare_data import x` names tasks.kinds.prepare_data
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PROJECT_PACKAGES and _module_file(n, root)}
    return found


def code_modules(module: str, root: Path = PROJECT_ROOT) -> list[str]:
    """`module` and the project modules it imports, transitively, less the bookkeeping ones."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(_imported_modules(_module_file(name, root).read_text(encoding="utf-8"), root) - seen)
    return sorted(n for n in seen if n == module or n not in NOT_RESULT_CODE)


def code_files(module: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{relative path: sha256} of the code a kind's module runs."""
    return {_module_file(m, root).relative_to(root).as_posix():
            hashlib.sha256(_module_file(m, root).read_bytes()).hexdigest() for m in code_modules(module, root)}


def kind_module(kind: str) -> str:
    """A kind's module: tasks/kinds/ holds one module per kind, named as the kind is (the registry checks it)."""
    return f"tasks.kinds.{kind}"


@lru_cache(maxsize=None)
def code_digest(kind: str) -> str:
    return digest_json(code_files(kind_module(kind)))


def stage_cache_key(kind: str, config: dict, input_digests: dict[str, str], seed: int, round_: int = 1) -> str:
    """Hash of the kind, its settings, its inputs' digests, its code, library versions, seed and round."""
    payload = {
        "stage": kind,
        "config": config,
        "inputs": dict(sorted(input_digests.items())),
        "code": code_digest(kind),
        "libraries": library_versions(),
        "seed": seed,
        **({"round": round_} if round_ > 1 else {}),
    }
    return f"{kind}-{digest_json(payload)[:24]}"
