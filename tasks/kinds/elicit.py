"""`elicit` stage: ask for preference labels where they teach most (Dwaracherla et al., "Efficient Exploration
for LLMs", 2024).

A round samples prompts, generates `candidates` replies per prompt with the current policy, picks one pair per
prompt by a selection rule, asks a rater which reply is better, adds the labelled pair, and refits an epistemic
reward model: an ensemble of small heads over frozen features (the last hidden state of a reward model or of the
starting policy), each head regularised towards its own random initial weights, so the heads agree where the
labels have spoken and disagree elsewhere. Rules:

* `passive`: a random pair (the baseline: what a rating queue without a model does);
* `boltzmann`: two replies drawn without replacement from softmax(ensemble mean / temperature);
* `infomax`: the pair whose preference the heads disagree on most (variance of sigmoid(r_i - r_j) over heads);
* `double_ts`: double Thompson sampling: draw a head, take its best reply; draw heads again until one's best
  differs, else that head's second best.

Raters: `simulated` (a ground-truth scorer in TRL's reward-function form, e.g. the demo's arithmetic checker,
with a configurable label-flip noise; equal scores are a tie) or `judge` (any judge of tasks/blocks/judges.py).

Rounds are instances of the recipe loop (`rounds: N`): round k reads round k-1's output as its `data` input and
is cached on its own. The output is prepared data, so a `reward` or `dpo` stage can train on the elicited pairs:

  preference/train-*.parquet   the decided pairs so far (chosen / rejected)
  preference/eval-*.parquet, eval/, sft/ ...   passed through from the input
  elicit/queries.jsonl         every query so far: round, prompt, the two replies, the label (1, 0 or 0.5)
  elicit/history.json          per round: queries so far, held-out reward accuracy, best-of-K win rate
  elicit/policy/               the policy after DPO on the pairs so far (with `dpo` set); later rounds sample it

Metrics are logged with the number of queries so far as the MLflow step, so a run's curves are learning curves
in queries.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

from pydantic import Field, model_validator

from tasks.blocks.align import DPOStageConfig
from tasks.blocks.judges import judge_slots, missing_judge_input
from tasks.blocks.elicitation import (Ensemble, EnsembleSettings, Features, JudgeRater,
                                      RaterSettings, Rule, SimulatedRater, select_pair)
from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")

STATE = "elicit"


class ElicitConfig(Section):
    rule: Rule = Field("double_ts", description="How the pair shown to the rater is chosen: passive, boltzmann, "
                       "infomax or double_ts.")
    prompts_per_round: int = Field(32, ge=1, description="Prompts asked about per round (one query each); drawn "
                                   "without replacement from the `data` input's preference prompts, seeded.")
    candidates: int = Field(4, ge=2, description="Replies sampled per prompt; the rule picks two distinct ones (a "
                            "prompt whose samples are all the same is not asked about).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the candidates.")
    max_completion_length: int = Field(16, ge=1, description="Longest candidate, in tokens.")
    boltzmann_temperature: float = Field(1.0, gt=0, description="boltzmann: temperature of the softmax over the "
                                         "ensemble's mean rewards.")
    ts_draws: int = Field(30, ge=1, description="double_ts: head draws for a second reply that differs from the first "
                          "before falling back to the second best.")
    ensemble: EnsembleSettings = Field(default_factory=EnsembleSettings, description="The epistemic reward model.")
    rater: RaterSettings = Field(default_factory=RaterSettings, description="Who answers the queries.")
    eval_prompts: int = Field(100, ge=1, description="Held-out prompts (the eval split) for the best-of-K win rate.")
    eval_pairs: int = Field(500, ge=1, description="Held-out labelled pairs (preference/eval) for reward accuracy.")
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass (generation, features).")
    dpo: DPOStageConfig | None = Field(None, description="Also train the policy each round: DPO from the starting policy "
                                  "on the decided pairs so far; the next round samples its candidates from it.")

    @model_validator(mode="after")
    def _nested_dpo_trains_here(self) -> "ElicitConfig":
        # the round's DPO trains inside the elicit stage's own process, without store checkpoints: settings
        # that would ask for more are refused rather than ignored
        t = self.dpo.training if self.dpo is not None else None
        if t is not None and (t.processes != 1 or t.checkpoint_steps or t.launcher != "torchrun"):
            raise ValueError("dpo.training: the DPO inside elicit trains in the stage's process, without "
                             "checkpoints; processes, checkpoint_steps and launcher are not supported there "
                             f"(got processes={t.processes}, checkpoint_steps={t.checkpoint_steps}, "
                             f"launcher={t.launcher}); train a separate dpo stage on elicit's output for those")
        return self


def input_problems(cfg: ElicitConfig, inputs: dict[str, str]) -> list[str]:
    problem = missing_judge_input([cfg.rater.judge], inputs) if cfg.rater.kind == "judge" else None
    return [f"rater: {problem}"] if problem else []


# ---- the epistemic reward model ---------------------------------------------------------------------------------


# ---- features, raters ------------------------------------------------------------------------------------------


# ---- one round -------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pass_through(data: Path, out: Path) -> None:
    """Everything of the input data except the pairs this stage writes itself (preference/train)."""
    for item in Path(data).iterdir():
        if item.name in (STATE, "MANIFEST.json"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, ignore=(shutil.ignore_patterns("train-*.parquet")
                                                           if item.name == "preference" else None))
        else:
            shutil.copy2(item, out / item.name)


def _prompt_pool(data: Path) -> list[list[dict]]:
    """The prompts a first round may ask about: the preference prompts of the prepared data, each once."""
    from tasks.machinery.splits import load_split

    train = load_split(data, "preference", "train")
    if train is None:
        raise ValueError("elicit: the data input has no preference/train split to draw prompts from "
                         "(set the prepare_data stage's `preference` source)")
    seen, pool = set(), []
    for prompt in train["prompt"]:
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            pool.append(prompt)
    return pool


def _write_pairs(out: Path, queries: list[dict]) -> int:
    """The decided queries as preference pairs (preference/train), and the row count in stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.machinery.splits import schema

    rows = []
    for q in queries:
        if q["label"] == 0.5:
            continue
        chosen, rejected = (q["first"], q["second"]) if q["label"] > 0.5 else (q["second"], q["first"])
        rows.append({"prompt": q["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "task": "elicited",
                     "source": 0, "row": q["query"]})
    folder = out / "preference"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema("preference", tools=False)),
                   folder / "train-00000.parquet")
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats.setdefault("preference", {})["train_rows"] = len(rows)
    stats_path.write_text(json.dumps(stats, indent=2))
    return len(rows)


def _distinct(replies: list[str]) -> list[str]:
    return list(dict.fromkeys(r for r in replies))


def elicit_round(cfg: ElicitConfig, data: Path, policy: Path | str, out: Path, seed: int, round_: int,
                 rater, features_model: Path | str | None = None, features_from_reward: bool = False,
                 log_step=None, trust_remote_code: bool = False) -> dict[str, float]:
    """One elicitation round from `data` (prepared data, or the previous round's output) into `out`."""
    import torch

    from tasks.machinery.splits import load_split
    from tasks.blocks.generation import sample_replies
    from tasks.machinery.modeling import free, load_causal_lm, load_tokenizer

    data, out = Path(data), Path(out)
    state_in, state = data / STATE, out / STATE
    out.mkdir(parents=True, exist_ok=True)
    _pass_through(data, out)
    state.mkdir(exist_ok=True)
    pool = [row["prompt"] for row in _read_jsonl(state_in / "pool.jsonl")] or _prompt_pool(data)
    _write_jsonl(state / "pool.jsonl", [{"prompt": p} for p in pool])
    queries = _read_jsonl(state_in / "queries.jsonl")
    history = json.loads((state_in / "history.json").read_text()) if (state_in / "history.json").exists() else []
    generator = state_in / "policy" if (state_in / "policy").exists() else policy
    held_pairs = load_split(data, "preference", "eval")
    eval_rows = load_split(data, "eval", "test")
    if held_pairs is None or eval_rows is None:
        raise ValueError("elicit: the data input needs held-out pairs (preference/eval: set data eval_fraction > 0) "
                         "and eval prompts (the `eval` source) to measure reward accuracy and win rate")
    held_pairs = held_pairs.select(range(min(cfg.eval_pairs, len(held_pairs))))
    eval_prompts = list(eval_rows.select(range(min(cfg.eval_prompts, len(eval_rows))))["prompt"])

    tokenizer = load_tokenizer(generator, trust_remote_code)
    model = load_causal_lm(generator, trust_remote_code, on_device=True)
    # the policy's own features come from the model already loaded to generate (one copy in memory, not two)
    shared = features_model is None and generator == policy
    features = (Features(model.eval(), tokenizer, cfg.batch_size) if shared else
                Features.load(features_model or policy, trust_remote_code, cfg.batch_size, features_from_reward))
    held_prompts = list(held_pairs["prompt"])
    held_chosen = features(held_prompts, [c[-1]["content"] for c in held_pairs["chosen"]])  # fixes the scaling
    held_rejected = features(held_prompts, [r[-1]["content"] for r in held_pairs["rejected"]])
    dim = held_chosen.shape[1]
    ensemble = Ensemble(cfg.ensemble, dim, seed)

    def fit(qs: list[dict]) -> float:
        if not qs:
            return ensemble.fit(torch.zeros(0, dim), torch.zeros(0, dim), [])
        prompts = [q["prompt"] for q in qs]
        return ensemble.fit(features(prompts, [q["first"] for q in qs]), features(prompts, [q["second"] for q in qs]),
                            [q["label"] for q in qs])

    fit(queries)
    rng = random.Random(f"{seed}-elicit-{round_}")
    asked = {json.dumps(q["prompt"], sort_keys=True) for q in queries}
    fresh = [p for p in pool if json.dumps(p, sort_keys=True) not in asked] or pool
    prompts = rng.sample(fresh, min(cfg.prompts_per_round, len(fresh)))

    samples = sample_replies(model, tokenizer, prompts, cfg.candidates, cfg.max_completion_length, cfg.temperature,
                             seed * 1000 + round_, cfg.batch_size)
    askable = [(prompt, _distinct(replies)) for prompt, replies in zip(prompts, samples)]
    askable = [(prompt, distinct) for prompt, distinct in askable if len(distinct) >= 2]
    every = ensemble.rewards(features([p for p, d in askable for _ in d], [r for _, d in askable for r in d]))
    chosen_pairs, start = [], 0
    for prompt, distinct in askable:
        rewards = every[:, start: start + len(distinct)]
        start += len(distinct)
        i, j = select_pair(cfg.rule, rewards, rng, cfg.boltzmann_temperature, cfg.ts_draws)
        chosen_pairs.append((prompt, distinct[i], distinct[j]))
    labels = rater.label([p for p, _, _ in chosen_pairs], [a for _, a, _ in chosen_pairs],
                         [b for _, _, b in chosen_pairs]) if chosen_pairs else []
    for (prompt, a, b), label in zip(chosen_pairs, labels):
        queries.append({"query": len(queries), "round": round_, "rule": cfg.rule, "prompt": prompt, "first": a,
                        "second": b, "label": label})
    loss = fit(queries)
    decided = _write_pairs(out, queries)

    if cfg.dpo is not None and decided:
        if not shared:
            free(model)
        _train_dpo(cfg.dpo, out, policy, state / "policy", seed, trust_remote_code)
        generator = state / "policy"
        tokenizer = load_tokenizer(generator, trust_remote_code)
        model = load_causal_lm(generator, trust_remote_code, on_device=True)
    elif (state_in / "policy").exists():
        shutil.copytree(state_in / "policy", state / "policy")

    mean = ensemble.rewards(held_chosen).mean(0) - ensemble.rewards(held_rejected).mean(0)
    rm_accuracy = float((mean > 0).float().mean())
    rates = _best_of_k_win_rates(cfg, ensemble, features, model, tokenizer, policy, generator, eval_prompts, rater,
                                 seed, trust_remote_code)
    win_rate = rates["win_rate"]
    free(model)
    if features.model is not model:
        features.close()
    this_round = len(chosen_pairs)
    point = {"round": round_, "queries": len(queries), "rm_accuracy": rm_accuracy, **rates, "decided": decided,
             "ties": sum(q["label"] == 0.5 for q in queries)}
    history.append(point)
    (state / "history.json").write_text(json.dumps(history, indent=2))
    _write_jsonl(state / "queries.jsonl", queries)
    torch.save(ensemble.state(), state / "ensemble.pt")
    if log_step is not None:
        for p in history:  # the whole curve so far, so the last round's run shows it all
            log_step({f"elicit/{k}": float(v) for k, v in p.items() if k != "queries"}, p["queries"])
    logger.info("[elicit] round %d (%s): %d queries (%d this round, %d decided), reward accuracy %.3f, best-of-%d "
                "win rate %.3f", round_, cfg.rule, len(queries), this_round, decided, rm_accuracy, cfg.candidates,
                win_rate)
    return {"elicit/queries": float(len(queries)), "elicit/round_queries": float(this_round),
            "elicit/decided": float(decided), "elicit/ties": float(point["ties"]), "elicit/rm_accuracy": rm_accuracy,
            **{f"elicit/{k}": v for k, v in rates.items()}, "elicit/fit_loss": loss}


def _best_of_k_win_rates(cfg, ensemble, features, model, tokenizer, policy, generator, prompts, rater, seed,
                         trust_remote_code) -> dict[str, float]:
    """The policy this round yields (best of K samples of the current generator under the ensemble's mean reward)
    against one sample of the starting policy, judged by the rater without label noise; ties count half. With a
    simulated rater also the oracle's: the best of the same K by the ground truth (what a perfect reward model
    would win)."""
    from tasks.blocks.generation import sample_replies
    from tasks.machinery.modeling import free, load_causal_lm, load_tokenizer

    samples = sample_replies(model, tokenizer, prompts, cfg.candidates, cfg.max_completion_length, cfg.temperature,
                             seed * 1000 + 999, cfg.batch_size)
    if generator == policy:
        baseline = [s[0] for s in samples]
    else:
        start = load_causal_lm(policy, trust_remote_code, on_device=True)
        baseline = [s[0] for s in sample_replies(start, load_tokenizer(policy, trust_remote_code), prompts, 1,
                                                 cfg.max_completion_length, cfg.temperature, seed * 1000 + 999,
                                                 cfg.batch_size)]
        free(start)
    flat_prompts = [p for p, s in zip(prompts, samples) for _ in s]
    mean = ensemble.rewards(features(flat_prompts, [r for s in samples for r in s])).mean(0)
    k = cfg.candidates
    best = [samples[i][int(mean[i * k: (i + 1) * k].argmax())] for i in range(len(prompts))]
    verdicts = rater.label(prompts, best, baseline, noisy=False)
    rates = {"win_rate": sum(verdicts) / max(len(verdicts), 1)}
    if isinstance(rater, SimulatedRater):  # the headroom: best of the same K picked by the ground truth itself
        truth = rater.scores(flat_prompts, [r for s in samples for r in s])
        oracle = [samples[i][max(range(k), key=lambda c: truth[i * k + c])] for i in range(len(prompts))]
        verdicts = rater.label(prompts, oracle, baseline, noisy=False)
        rates["oracle_win_rate"] = sum(verdicts) / max(len(verdicts), 1)
    return rates


def _train_dpo(cfg: DPOStageConfig, data: Path, policy, out: Path, seed: int, trust_remote_code: bool) -> None:
    """DPO (TRL DPOTrainer) from the starting policy on the decided pairs so far."""
    from tasks.blocks.align import train_policy
    from tasks.blocks.align import dpo_trainer
    from tasks.machinery.context import StageContext

    ctx = StageContext(seed=seed, env=None, run_id=None, stage="elicit-dpo")
    train_policy(cfg, data, policy, out, ctx, dpo_trainer(cfg))


def build_rater(cfg: ElicitConfig, inputs: dict, ctx):
    if cfg.rater.kind == "simulated":
        return SimulatedRater(cfg.rater, ctx.seed * 1000 + ctx.round)
    from tasks.blocks.judges import stage_judge

    return JudgeRater(stage_judge(cfg.rater.judge, inputs, ctx, "rater"))


def _work(cfg: ElicitConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking

    rater = build_rater(cfg, inputs, ctx)
    try:
        metrics = elicit_round(cfg, inputs["data"], inputs["policy"], out, ctx.seed, ctx.round, rater,
                               inputs.get("features"), "features" in inputs, ctx.log_step if ctx.run_id else None,
                               ctx.trust_remote_code)
    finally:
        rater.close()
    if ctx.run_id:
        for name in ("queries.jsonl", "history.json"):
            tracking.log_artifact(ctx.env.tracking_uri, ctx.run_id, out / STATE / name, "elicit")
    return metrics


def rater_sources(cfg: ElicitConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    from tasks.blocks.judges import function_source, judge_sources

    if cfg.rater.kind == "simulated":
        return {"rater.truth": function_source(cfg.rater.truth)}
    return judge_sources(cfg.rater.judge, ("compare",), "rater", tracking_uri)


KIND = StageKind(
    name="elicit",
    description="Feedback elicitation: rounds of sample K replies -> pick the pair that teaches most (passive, "
    "boltzmann, infomax, double Thompson sampling over a reward ensemble) -> ask a rater -> refit; optional DPO.",
    config=ElicitConfig,
    input_problems=input_problems,
    inputs={
        "data": Slot("data", "prepared data: preference prompts to ask about, held-out pairs and eval prompts to "
                     "measure with (a later round: the previous round's output)", data=("preference", "eval")),
        "policy": Slot("policy", "the policy whose replies are compared (and, with dpo, the starting point)"),
        "features": Slot("reward", "a reward model whose last hidden state the ensemble heads read (default: the "
                         "policy's)", required=False),
        **judge_slots("rater judge"),
    },
    output="data",
    work=_work,
    headline=("elicit/queries", "elicit/rm_accuracy", "elicit/win_rate"),
    step="elicit/queries",
    provides=lambda cfg: {"preference", "eval"},
    source_inputs=rater_sources,
)
