"""`rlhf` stage: online RL against a reward model with TRL's GRPOTrainer. Completions sampled from the
policy for the preference prompts are scored by the reward model; `beta` weights the KL penalty to
the starting policy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.align import AlignmentSettings, run_alignment, train_policy
from tasks.kinds import Slot, StageKind
from tasks.training import Section, stage_training

GRPOTraining = stage_training("GRPOTraining", "TRL GRPOConfig (lr 1e-6, batch 8 completions), one epoch",
                              learning_rate=1e-6, epochs=1.0)


class Verifier(Section):
    function: str = Field(description="`module:function` computing rewards as TRL reward functions do: "
                          "f(prompts, completions, **columns) -> list[float]; its module's source is in the cache key.")
    weight: float = Field(1.0, ge=0, description="Weight of this reward in the sum GRPO optimizes.")

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        module, _, name = value.partition(":")
        if not module or not name.isidentifier():
            raise ValueError(f"{value!r}: expected module:function, e.g. tasks.synthetic:arithmetic_reward")
        return value

    def load(self):
        import importlib

        module, _, name = self.function.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"verifier {self.function}: cannot load it ({e})") from None


class RLHFStageConfig(AlignmentSettings):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group size).")
    max_completion_length: int = Field(256, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the rollouts.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts (GRPO's mu); "
                                "above 1, PPO-style clipping bounds each pass.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "none",
        description="GRPO advantage scaling. 'none' keeps the reward model's scale, so near-ties the reward "
        "model cannot tell apart are not blown up into large advantages (less reward hacking).",
    )
    verifiers: list[Verifier] = Field(
        default_factory=list, description="Rule-based rewards added to (or, without a `reward` input, instead of) "
        "the reward model's, e.g. [{function: 'tasks.synthetic:arithmetic_reward', weight: 1.0}].")
    reward_model_weight: float = Field(1.0, ge=0, description="Weight of the reward model's score when verifiers "
                                       "are used too.")
    training: GRPOTraining = Field(
        default_factory=GRPOTraining,
        description="Hyperparameters of the RL run; batch_size counts completions and must be a multiple of "
        "num_generations.",
    )

    @model_validator(mode="after")
    def _has_a_reward(self) -> "RLHFStageConfig":
        inputs = getattr(self, "inputs", None)  # present when validated as a recipe instance
        if inputs is not None and "reward" not in inputs and not self.verifiers:
            raise ValueError("no reward: give a `reward` input (a reward model), `verifiers`, or both")
        return self

    @model_validator(mode="after")
    def _group_divides_batch(self) -> "RLHFStageConfig":
        t = self.training
        if (t.batch_size * t.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(
                f"num_generations={self.num_generations} must divide the effective batch (training.batch_size x "
                f"gradient_accumulation_steps = {t.batch_size * t.gradient_accumulation_steps})"
            )
        return self


def _train(cfg: RLHFStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    def make_trainer(base_args: dict, train, common: dict):
        from trl import GRPOConfig, GRPOTrainer

        from tasks.modeling import load_reward_model, load_tokenizer

        funcs, weights, tokenizers = [], [], []
        if inputs.get("reward") is not None:
            funcs.append(load_reward_model(inputs["reward"], ctx.trust_remote_code).requires_grad_(False).eval())
            tokenizers.append(load_tokenizer(inputs["reward"], ctx.trust_remote_code))
            weights.append(cfg.reward_model_weight)
        for verifier in cfg.verifiers:
            funcs.append(verifier.load())
            tokenizers.append(None)
            weights.append(verifier.weight)
        if not funcs:
            raise ValueError(f"{ctx.stage}: no reward: give a `reward` input, `verifiers`, or both")
        args = GRPOConfig(**base_args, beta=cfg.beta, num_generations=cfg.num_generations,
                          max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                          scale_rewards=cfg.scale_rewards, num_iterations=cfg.num_iterations, reward_weights=weights)
        return GRPOTrainer(args=args, train_dataset=train.select_columns(["prompt"]), reward_funcs=funcs,
                           reward_processing_classes=tokenizers, **common)

    return train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, make_trainer)


def _work(cfg: RLHFStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx)


KIND = StageKind(
    name="rlhf",
    description="RLHF: GRPO (TRL GRPOTrainer) from a policy against a reward model, on the preference prompts.",
    config=RLHFStageConfig,
    inputs={
        "data": Slot("data", "prepared data whose preference prompts are the RL prompts", data=("preference",)),
        "policy": Slot("policy", "the starting policy, also the KL reference"),
        "reward": Slot("reward", "the reward model that scores sampled completions (optional with verifiers)",
                       required=False),
    },
    output="policy",
    work=_work,
    headline=("train/final_reward", "train/final_kl"),
    source_inputs=lambda cfg: verifier_sources(cfg),
)


def verifier_sources(cfg: RLHFStageConfig) -> dict[str, dict]:
    """Each verifier's module source as a stage input: editing the rule reruns the stage."""
    import importlib.util

    from tasks.sources import file_digest

    refs = {}
    for index, verifier in enumerate(cfg.verifiers):
        spec = importlib.util.find_spec(verifier.function.partition(":")[0])
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise ValueError(f"verifier {verifier.function}: no such module")
        refs[f"verifier.{index}"] = {"uri": verifier.function, "digest": file_digest(Path(spec.origin)),
                                     "kind": "source"}
    return refs
