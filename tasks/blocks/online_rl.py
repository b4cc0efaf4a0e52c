"""What the online RL methods (GRPO in tasks/kinds/rlhf.py, RLOO in tasks/kinds/rloo.py) share: sampling settings, and
the rewards their rollouts are scored by — a reward model, rules (verifiers) and judges, weighted and summed."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tasks.blocks.align import AlignmentSettings
from tasks.blocks.judges import JudgeSettings, check_function_spec, load_function, missing_judge_input
from tasks.machinery.stagekind import Slot
from tasks.machinery.training import Section


class Verifier(Section):
    function: str = Field(description="`module:function` computing rewards as TRL reward functions do: "
                          "f(prompts, completions, **columns) -> list[float]; its module's source is in the cache key.")
    weight: float = Field(1.0, ge=0, description="Weight of this reward in the sum the policy optimizes.")

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        return check_function_spec(value)


class OnlineRLSettings(AlignmentSettings):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group GRPO and RLOO "
                                 "compare each completion with).")
    max_completion_length: int = Field(256, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the rollouts.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts (mu); "
                                "above 1, PPO-style clipping bounds each pass.")
    verifiers: list[Verifier] = Field(
        default_factory=list, description="Rule-based rewards added to (or, without a `reward` input, instead of) "
        "the reward model's, e.g. [{function: 'tasks.machinery.synthetic:arithmetic_reward', weight: 1.0}].")
    judges: list[JudgeSettings] = Field(
        default_factory=list, description="AI judges scoring each completion (RLAIF): a local model (the `judge` "
        "input) or an OpenAI-compatible endpoint, each with its `weight`.")
    reward_model_weight: float = Field(1.0, ge=0, description="Weight of the reward model's score when verifiers "
                                       "or judges are used too.")

    @model_validator(mode="after")
    def _group_divides_batch(self):
        t = self.training
        if (t.batch_size * t.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(
                f"num_generations={self.num_generations} must divide the effective batch (training.batch_size x "
                f"gradient_accumulation_steps = {t.batch_size * t.gradient_accumulation_steps})"
            )
        return self


ONLINE_RL_INPUTS = {
    "data": Slot("data", "prepared data whose preference prompts are the RL prompts", data=("preference",)),
    "policy": Slot("policy", "the starting policy, also the KL reference"),
    "reward": Slot("reward", "the reward model that scores sampled completions (optional with verifiers or judges)",
                   required=False),
    "judge": Slot("policy", "the model an hf_model judge asks (optional)", required=False),
}


def reward_functions(cfg: OnlineRLSettings, inputs: dict, ctx) -> tuple[list, list[float], list]:
    """(reward_funcs, reward_weights, reward_processing_classes) for a TRL online trainer."""
    from tasks.blocks.judges import stage_judge
    from tasks.machinery.modeling import load_reward_model, load_tokenizer

    funcs, weights, tokenizers = [], [], []
    if inputs.get("reward") is not None:
        funcs.append(load_reward_model(inputs["reward"], ctx.trust_remote_code).requires_grad_(False).eval())
        tokenizers.append(load_tokenizer(inputs["reward"], ctx.trust_remote_code))
        weights.append(cfg.reward_model_weight)
    for verifier in cfg.verifiers:
        funcs.append(load_function(verifier.function))
        tokenizers.append(None)
        weights.append(verifier.weight)
    for index, judge_cfg in enumerate(cfg.judges):
        judge = stage_judge(judge_cfg, inputs, ctx, f"judge.{index}")
        funcs.append(judge.as_reward_function())
        tokenizers.append(None)
        weights.append(judge_cfg.weight)
    if not funcs:
        raise ValueError(f"{ctx.stage}: no reward: give a `reward` input, `verifiers` or `judges`")
    return funcs, weights, tokenizers


def online_trainer(cfg: OnlineRLSettings, inputs: dict, ctx, config_cls, trainer_cls, **method_args):
    """make_trainer for train_policy: TRL's GRPO or RLOO trainer with the shared sampling settings and rewards;
    `method_args` are the method's own config fields."""
    def make_trainer(base_args: dict, train, common: dict):
        funcs, weights, tokenizers = reward_functions(cfg, inputs, ctx)
        args = config_cls(**base_args, beta=cfg.beta, num_generations=cfg.num_generations,
                          max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                          num_iterations=cfg.num_iterations, reward_weights=weights, **method_args)
        return trainer_cls(args=args, train_dataset=train.select_columns(["prompt"]), reward_funcs=funcs,
                           reward_processing_classes=tokenizers, **common)

    return make_trainer


def reward_sources(cfg: OnlineRLSettings, tracking_uri: str | None = None) -> dict[str, dict]:
    """Each verifier's module source and each judge's prompt version as stage inputs: editing a rule or a prompt
    reruns the stage."""
    from tasks.blocks.judges import function_source, judge_sources

    refs = {f"verifier.{i}": function_source(v.function) for i, v in enumerate(cfg.verifiers)}
    for index, judge in enumerate(cfg.judges):
        refs |= judge_sources(judge, ("score",), f"judge.{index}", tracking_uri)
    return refs


def input_problems(cfg: OnlineRLSettings, inputs: dict[str, str]) -> list[str]:
    """An online-RL stage needs something to reward with, and its judges their inputs."""
    if "reward" not in inputs and not cfg.verifiers and not cfg.judges:
        return ["no reward: give a `reward` input (a reward model), `verifiers`, `judges`, or some of them"]
    problem = missing_judge_input(cfg.judges, inputs)
    return [problem] if problem else []
