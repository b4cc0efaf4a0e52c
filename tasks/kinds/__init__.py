"""The stage kinds: one module per kind (one method per module, as TRL keeps one trainer per file), named as
the kind is. Each module declares `KIND = StageKind(...)` (tasks/machinery/stagekind.py) with its name, typed
config, input slots, output type, headline metrics and work function. The flow, recipe validation, the CLI
table, the run summary, reproduce, work-pool placement and the tests read this registry, which finds the
kinds by listing this package: adding a kind is adding its module here.

A kind module may import the method building blocks (tasks/blocks/) and the machinery (tasks/machinery/),
never another kind and never this registry: what several kinds share lives in a shared room, so a kind's
cache key (tasks/machinery/cachekeys.py) covers only the code it runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from tasks.machinery.stagekind import StageKind


def kind_modules() -> tuple[str, ...]:
    """The kind modules of this package, by name."""
    return tuple(f"{__name__}.{info.name}" for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
                 if not info.name.startswith("_"))


class UnknownKind(KeyError):
    pass


@lru_cache(maxsize=None)
def kinds() -> dict[str, StageKind]:
    registry: dict[str, StageKind] = {}
    for module_name in kind_modules():
        kind = importlib.import_module(module_name).KIND
        if kind.name != module_name.rsplit(".", 1)[1]:
            raise RuntimeError(f"{module_name} declares the kind {kind.name!r}: a kind module is named as its kind")
        if kind.name in registry:
            raise RuntimeError(f"stage kind {kind.name!r} is declared twice ({registry[kind.name].module}, {module_name})")
        registry[kind.name] = kind
    return registry


def get(name: str) -> StageKind:
    try:
        return kinds()[name]
    except KeyError:
        raise UnknownKind(f"unknown stage kind {name!r}; kinds are {', '.join(kinds())}") from None
