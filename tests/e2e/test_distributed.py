"""A training stage with 2 processes (torchrun, gloo on CPU) against the same stage in 1 process.

Same effective batch (2 x 8 vs 1 x 16), same steps and seed. accelerate shards each global batch of
16 across the ranks, so both runs see the same samples per step; they still cannot be bit-equal, as
the loss is averaged per rank before DDP averages gradients (ranks' token counts differ) and sums run
in another order. Measured: equal held-out loss to 4 decimals; we allow 1% relative, and require
that the run really had 2 processes and learned."""

import pytest

from flows.config import instance_settings
from tasks.machinery.launch import run_training
from tasks.kinds.sft import SFTStageConfig, _train
from tasks.machinery.context import RunEnv, StageContext
from tasks.machinery.store import ArtifactStore

pytestmark = pytest.mark.e2e
STEPS = 40


def _sft(cfg, root, name, processes, batch_size, ctx=None, checkpoint_steps=0):
    config = SFTStageConfig.model_validate(instance_settings(cfg.stages["sft"]))
    config.training.processes, config.training.batch_size, config.training.max_steps = processes, batch_size, STEPS
    config.training.checkpoint_steps = checkpoint_steps
    out = root / name
    out.mkdir()
    metrics = run_training(_train, config.training, config,
                           {"data": root / "data", "base": root / "base"}, out,
                           ctx or StageContext(seed=0, env=None, run_id=None))
    return metrics, out


@pytest.fixture(scope="module")
def two_processes(prepared):
    cfg, root = prepared
    return _sft(cfg, root, "two", processes=2, batch_size=8)


def test_two_processes_match_one_within_tolerance(prepared, two_processes):
    cfg, root = prepared
    single, single_out = _sft(cfg, root, "one", processes=1, batch_size=16)
    double, double_out = two_processes
    print(f"eval loss: 1 process {single['eval/loss']:.6f}, 2 processes {double['eval/loss']:.6f}")
    assert single["train/processes"] == 1 and double["train/processes"] == 2
    assert single["train/steps"] == double["train/steps"] == STEPS
    assert double["eval/loss"] == pytest.approx(single["eval/loss"], rel=0.01)
    assert double["train/final_loss"] < 0.8 * double["train/first_loss"]
    assert (double_out / "model.safetensors").exists() and (single_out / "model.safetensors").exists()


def test_two_processes_killed_mid_training_resume_from_the_stored_checkpoint(prepared, two_processes, tmp_path,
                                                                               monkeypatch):
    """Both ranks are SIGKILLed after step 15; the checkpoint of step 10 in the store holds both ranks'
    RNG states, and the rerun resumes from it and ends exactly where an uninterrupted run does."""
    cfg, root = prepared
    env = RunEnv(storage_root=str(tmp_path / "store"), tracking_uri="unused", experiment_id="0",
                 parent_run_id="unused")
    ctx = StageContext(seed=0, env=env, run_id=None, stage="sft", cache_key="sft-ddp")
    monkeypatch.setenv("POSTTRAIN_KILL_AT", "sft:step-15")
    with pytest.raises(RuntimeError, match="torchrun with 2 processes failed"):
        _sft(cfg, root, "two-killed", processes=2, batch_size=8, ctx=ctx, checkpoint_steps=10)
    store = ArtifactStore(env.storage_root)
    assert store.list_keys("sft.checkpoints") == ["sft-ddp-step000000010"]
    files = store.read_manifest(store.uri_for("sft.checkpoints", "sft-ddp-step000000010"))["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files), sorted(files)

    monkeypatch.delenv("POSTTRAIN_KILL_AT")
    resumed, resumed_out = _sft(cfg, root, "two-resumed", processes=2, batch_size=8, ctx=ctx, checkpoint_steps=10)
    uninterrupted, uninterrupted_out = two_processes
    assert resumed["train/resumed_from_step"] == 10 and resumed["train/steps"] == STEPS
    assert resumed["train/processes"] == 2
    assert resumed["eval/loss"] == uninterrupted["eval/loss"]
    assert (resumed_out / "model.safetensors").read_bytes() == (uninterrupted_out / "model.safetensors").read_bytes()


def _fail_on_rank_one(cfg, inputs, out, ctx):
    import os

    if os.environ["RANK"] == "1":
        raise (ConnectionError if inputs.get("how") == "network" else ValueError)(f"bad thing on rank 1 ({inputs})")
    return {}


@pytest.mark.parametrize("how", ["value", "network"])
def test_a_failed_rank_is_named_and_classified(tmp_path, how):
    from tasks.machinery.launch import RankFailed
    from tasks.machinery.context import is_transient

    config = SFTStageConfig()
    config.training.processes = 2
    with pytest.raises(RankFailed, match=r"rank 1 of 2 \(torchrun\) failed: (ValueError|ConnectionError): bad thing") as info:
        run_training(_fail_on_rank_one, config.training, config, {"how": how}, tmp_path,
                     StageContext(seed=0, env=None, run_id=None))
    assert is_transient(info.value) == (how == "network"), "a network error on a rank is retried like any other"
