"""Periodic training checkpoints kept in the artifact store, so a killed stage resumes where it was.

A checkpoint of stage S with cache key K at global step N is the store output
`<root>/S.checkpoints/K-stepN/`, committed atomically like any output. The next attempt of the same
stage (same key: same config, inputs, code and seed) resumes from the newest complete one; HF's
Trainer restores the weights, optimizer, scheduler, RNG states and the position in the data. Only
the newest two checkpoints of a key are kept (the older one is the fallback if the newest turns out
corrupted), and all of them are deleted once the stage's output is committed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.machinery.store import ArtifactError, ArtifactStore

logger = logging.getLogger("posttrain")


class StoreCheckpoints:
    def __init__(self, store: ArtifactStore, stage: str, cache_key: str):
        self.store, self.area, self.key = store, f"{stage}.checkpoints", cache_key

    def _name(self, step: int) -> str:
        return f"{self.key}-step{step:09d}"

    def names(self) -> list[str]:
        """This key's checkpoints (complete or not), oldest first."""
        return sorted(self.store.list_keys(self.area, prefix=f"{self.key}-step"))

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints of this key."""
        names = self.names()
        for name in names[: max(len(names) - keep, 0)]:
            self.store.delete(self.area, name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this stage and key, as a local folder."""
        for name in reversed(self.names()):
            ref = self.store.lookup(self.area, name)
            if ref is None:
                continue
            try:
                return self.store.materialize(ref)
            except ArtifactError as e:  # corrupted: set it aside and fall back to an older one
                aside = self.store.quarantine(ref.uri, str(e))
                logger.warning("checkpoint %s is unusable (%s); moved its manifest to %s", name, e, aside)
        return None

    def callback(self):
        from transformers import TrainerCallback

        from tasks.machinery.ranks import is_main_process

        outer = self

        class _Upload(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if not is_main_process():
                    return
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                _wait_for_rank_states(local, args.world_size)
                with outer.store.write(outer.area, outer._name(state.global_step)) as out:
                    try:
                        shutil.copytree(local, out.path, dirs_exist_ok=True)
                    except shutil.Error as e:  # a list of (src, dst, why): name the first failure plainly
                        src, _, why = e.args[0][0]
                        raise OSError(f"checkpoint at step {state.global_step}: writing {Path(src).name} into the "
                                      f"store failed: {why}") from e
                outer.prune(keep=2)  # the newest, and one to fall back on if the newest is corrupted

        return _Upload()


def _wait_for_rank_states(folder: Path, world_size: int, timeout: float = 600) -> None:
    """Each rank writes rng_state_<rank>.pth into the shared checkpoint folder on its own time."""
    if world_size <= 1:
        return
    import time

    deadline = time.monotonic() + timeout
    missing = [r for r in range(world_size) if not (folder / f"rng_state_{r}.pth").exists()]
    while missing and time.monotonic() < deadline:
        time.sleep(0.1)
        missing = [r for r in missing if not (folder / f"rng_state_{r}.pth").exists()]
    if missing:
        raise TimeoutError(f"ranks {missing} wrote no RNG state into {folder} within {timeout:.0f} s")
