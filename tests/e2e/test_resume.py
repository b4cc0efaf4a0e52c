"""A training stage killed with SIGKILL resumes from its newest stored checkpoint and ends with the
same weights as an uninterrupted run (exactly, on CPU)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.kinds.sft as sft
from flows.config import instance_settings
from tasks.machinery.context import RunEnv, StageContext
from tasks.machinery.store import ArtifactStore

from .conftest import ROOT

pytestmark = pytest.mark.e2e

KILL_AT_STEP = 7
KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
import tasks.kinds.sft as sft
from tasks.machinery.context import RunEnv, StageContext

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

spec = json.loads(sys.argv[1])
ctx = StageContext(seed=0, env=RunEnv(**spec["env"]), run_id=None, stage="sft", cache_key=spec["key"])
ctx.callbacks = lambda: [KillAt()]
sft._train(sft.SFTStageConfig.model_validate(spec["config"]), {{"data": Path(spec["data"]), "base": Path(spec["base"])}}, Path(spec["out"]), ctx)
""".format(step=KILL_AT_STEP)


def _env(root: Path) -> dict:
    return RunEnv(storage_root=str(root), tracking_uri="unused", experiment_id="0", parent_run_id="unused").to_dict()


def _config(cfg) -> dict:
    config = sft.SFTStageConfig.model_validate(instance_settings(cfg.stages["sft"]))
    config.training.max_steps, config.training.checkpoint_steps = 12, 4
    return config.model_dump(mode="json")


def _train_here(cfg, prepared_root: Path, store_root: Path, out: Path, key: str) -> dict:
    out.mkdir(parents=True)
    ctx = StageContext(seed=0, env=RunEnv(**_env(store_root)), run_id=None, stage="sft", cache_key=key)
    return sft._train(sft.SFTStageConfig.model_validate(_config(cfg)), {"data": prepared_root / "data", "base": prepared_root / "base"}, out, ctx)


def test_killed_training_resumes_from_its_checkpoint_and_matches(prepared, tmp_path):
    cfg, root = prepared
    reference = _train_here(cfg, root, tmp_path / "store-a", tmp_path / "uninterrupted", key="sft-k")
    assert "train/resumed_from_step" not in reference

    spec = {"env": _env(tmp_path / "store-b"), "key": "sft-k", "config": _config(cfg), "data": str(root / "data"),
            "base": str(root / "base"), "out": str(tmp_path / "killed")}
    (tmp_path / "killed").mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(spec)], cwd=ROOT, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    store = ArtifactStore(str(tmp_path / "store-b"))
    assert store.list_keys("sft.checkpoints") == ["sft-k-step000000004"], "one complete checkpoint, at step 4"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = _train_here(cfg, root, tmp_path / "store-b", tmp_path / "resumed", key="sft-k")
    assert resumed["train/resumed_from_step"] == 4 and resumed["train/steps"] == 12
    assert resumed["eval/loss"] == reference["eval/loss"]
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "uninterrupted" / "model.safetensors").read_bytes()
