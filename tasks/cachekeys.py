"""Stage cache keys: what a stage's output depends on, and nothing else (no flow-run id)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from functools import lru_cache

from tasks.store import digest_json

ML_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "accelerate")

# Modules whose source decides each stage's output. A change to any of them reruns the stage.
_COMMON = ("tasks.modeling", "tasks.training", "tasks.launch")
STAGE_CODE = {
    "pretrain": ("tasks.pretrain", "tasks.synthetic", *_COMMON),
    "prepare_data": ("tasks.data", "tasks.synthetic"),
    "sft": ("tasks.sft", *_COMMON),
    "reward": ("tasks.reward", "tasks.generation", *_COMMON),
    "align": ("tasks.align", *_COMMON),
    "evaluate": ("tasks.evaluate", "tasks.generation", *_COMMON),
}


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    versions = {}
    for name in ML_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@lru_cache(maxsize=None)
def code_digest(stage: str) -> str:
    h = hashlib.sha256()
    for module_name in STAGE_CODE[stage]:
        h.update(module_name.encode())
        h.update(Path(importlib.util.find_spec(module_name).origin).read_bytes())
    return h.hexdigest()


def stage_cache_key(stage: str, config: dict, input_digests: dict[str, str], seed: int) -> str:
    """Hash of the stage name, its config section, its inputs' digests, its code, library versions, seed."""
    payload = {
        "stage": stage,
        "config": config,
        "inputs": dict(sorted(input_digests.items())),
        "code": code_digest(stage),
        "libraries": library_versions(),
        "seed": seed,
    }
    return f"{stage}-{digest_json(payload)[:24]}"
