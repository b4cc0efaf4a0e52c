"""The bake-off: every post-training method from one SFT model and one reward model, per seed, and each
method's stage time against its bare TRL trainer.

    python bench/bakeoff.py [--seeds 0 1 2] [--parallel 2] [--threads 1] [--bare-seed 0]
                            [--json bench/results/bakeoff.json]

For each seed: `posttrain run --config configs/bakeoff.yaml --set seed=N` (DPO, KTO, RLHF = GRPO against the
reward model, RLOO, RLAIF = two judged online-DPO rounds, SPIN = two self-play rounds on the sloppy
demonstrations), then `configs/spin.yaml` (SPIN on correct demonstrations from an under-trained SFT model,
against SFT trained for the same extra steps). Prints task accuracy on the 150 held-out prompts per method and
seed, mean and min, and each method's margin over SFT; the methods that should beat SFT must do so by >= 0.05
on every seed (METHODS_THAT_BEAT_SFT).

For --bare-seed, right after its pipeline (and under the same thread settings), each method's trainer is run
again as a bare TRL script on the same prepared data, starting models and settings: load the model, build the
TRL trainer, train. The table gives stage seconds / bare seconds. The stage also materializes and verifies its
inputs, logs the training split and curves to MLflow, saves, hashes and commits its output; SPIN and RLAIF
rounds also generate (and judge) their pairs, which the bare DPOTrainer is handed ready-made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ENV, ROOT, posttrain_run, stop_server

METHODS = ("dpo", "kto", "rlhf", "rloo", "rlaif", "spin")
METHODS_THAT_BEAT_SFT = ("dpo", "rlhf", "rloo", "rlaif")  # the others are explained in the README
MARGIN = 0.05
ANNOTATOR_ACCURACY_NOTE = "the sloppy annotator's own accuracy on the held-out sums"


def annotator_accuracy() -> float:
    """How often the demo's sloppy annotator is right on the eval prompts: every sum below 10, and the others
    unless it forgot the carry (tasks.machinery.synthetic's default carry_error_rate)."""
    import inspect

    sys.path.insert(0, str(ROOT))
    from tasks.machinery.synthetic import generate

    error_rate = inspect.signature(generate).parameters["carry_error_rate"].default
    evals = generate("eval", seed=0)
    carries = sum(1 for r in evals if int(r["reference"]) >= 10)
    return 1 - error_rate * carries / len(evals)


def one_seed(work: Path, seed: int, threads: int, bare: bool) -> dict:
    home = work / f"seed-{seed}"
    home.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    try:
        _, bakeoff = posttrain_run(home, "bakeoff", f"seed={seed}", env=env, config=str(ROOT / "configs/bakeoff.yaml"))
        _, spin = posttrain_run(home, "spin", f"seed={seed}", env=env, config=str(ROOT / "configs/spin.yaml"))
        _, peft = posttrain_run(home, "peft", f"seed={seed}", env=env, config=str(ROOT / "configs/peft.yaml"))
    finally:
        stop_server(home)
    m, s = bakeoff["metrics"], spin["metrics"]
    stages = {st["name"]: st for st in bakeoff["stages"]}
    row = {"seed": seed, "sft": m["eval/sft/task_accuracy"], **{k: m[f"eval/{k}/task_accuracy"] for k in METHODS},
           "kl": {k: m.get(f"eval/{k}/kl_to_sft") for k in METHODS},
           "spin_matched": [stages[f"spin.round{r}"]["metrics"]["spin/matched_fraction"] for r in (1, 2)],
           "clean_sft": s["eval/sft/task_accuracy"], "clean_spin": s["eval/spin/task_accuracy"],
           "clean_sft_more": s["eval/sft_more/task_accuracy"],
           "peft": {name: {"accuracy": peft["metrics"][f"eval/{name}/task_accuracy"], "seconds": st["seconds"],
                           **{k.split("/")[1]: v for k, v in st["metrics"].items() if k.startswith("model/")}}
                    for st in peft["stages"] for name in [st["name"]] if name.startswith("sft_")},
           "stage_seconds": {name: st["seconds"] for name, st in stages.items()}}
    print(f"seed {seed}: pipelines done in {time.monotonic() - started:.0f} s", flush=True)
    if bare:
        out = home / "bare.json"
        with open(home / "bare.log", "w") as log:
            subprocess.run([sys.executable, __file__, "--bare", str(home / "bakeoff.json"), "--seed", str(seed),
                            "--json", str(out)], env={**ENV, **env, "POSTTRAIN_HOME": str(home)}, check=True,
                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        row["bare_seconds"] = json.loads(out.read_text())
    return row


# ---- bare TRL trainers ---------------------------------------------------------------------------------------

def bare_trainers(summary_path: Path, seed: int) -> dict[str, float]:
    """Each method's TRL trainer alone on the run's own inputs: {stage: seconds}."""
    sys.path.insert(0, str(ROOT))
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig,
                     RLOOTrainer)

    from flows.config import load_config
    from tasks.kinds.kto import unpaired_rows
    from tasks.machinery.context import materialize_input
    from tasks.machinery.store import ArtifactStore
    from tasks.machinery.training import trainer_kwargs

    summary = json.loads(summary_path.read_text())
    cfg = load_config(ROOT / "configs" / "bakeoff.yaml", [f"seed={seed}"]).resolved()
    store = ArtifactStore(cfg.storage.root)
    stages = {st["name"]: st for st in summary["stages"]}
    local = {name: materialize_input(store, {"uri": st["output_uri"], "digest": st["output_digest"]})
             for name, st in stages.items()}

    def split(kind: str):
        files = sorted(str(p) for p in (local["data"] / kind).glob("train-*.parquet"))
        return datasets.Dataset.from_parquet(files).select_columns(
            {"sft": ["prompt", "completion"], "preference": ["prompt", "chosen", "rejected"],
             "unpaired": ["prompt", "completion", "label"]}[kind])

    def pairs(name: str):
        records = [json.loads(line) for line in (local[name] / "pairs.jsonl").read_text().splitlines()]
        rows = [r for r in records if r["kept"]]
        if "demonstration" in rows[0]:  # spin
            return datasets.Dataset.from_dict({
                "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                "chosen": [[{"role": "assistant", "content": r["demonstration"]}] for r in rows],
                "rejected": [[{"role": "assistant", "content": r["reply"]}] for r in rows]})
        best = [max(range(len(r["scores"])), key=r["scores"].__getitem__) for r in rows]
        worst = [min(range(len(r["scores"])), key=r["scores"].__getitem__) for r in rows]
        return datasets.Dataset.from_dict({
            "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
            "chosen": [[{"role": "assistant", "content": r["replies"][b]}] for r, b in zip(rows, best)],
            "rejected": [[{"role": "assistant", "content": r["replies"][w]}] for r, w in zip(rows, worst)]})

    def run(name: str, policy: Path, build) -> float:
        s = cfg.stages[name.split(".")[0]]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            common = trainer_kwargs(s.training, Path(scratch), seed)
            model = AutoModelForCausalLM.from_pretrained(policy)
            tokenizer = AutoTokenizer.from_pretrained(policy)
            build(s, common, model, tokenizer).train()
        seconds = time.perf_counter() - started
        print(f"bare {name}: {seconds:.1f} s", flush=True)
        return seconds

    def dpo_on(data):
        return lambda s, common, model, tok: DPOTrainer(
            model=model, processing_class=tok, train_dataset=data,
            args=DPOConfig(**common, beta=s.beta, max_length=s.training.max_length, loss_type=s.loss_type,
                           loss_weights=s.loss_weights))

    def online(config_cls, trainer_cls):
        def build(s, common, model, tok):
            reward = AutoModelForSequenceClassification.from_pretrained(local["reward"], num_labels=1)
            extra = {"scale_rewards": s.scale_rewards} if hasattr(s, "scale_rewards") else {}
            args = config_cls(**common, beta=s.beta, num_generations=s.num_generations, temperature=s.temperature,
                              max_completion_length=s.max_completion_length, num_iterations=s.num_iterations, **extra)
            return trainer_cls(model=model, processing_class=tok, reward_funcs=[reward],
                               reward_processing_classes=[AutoTokenizer.from_pretrained(local["reward"])],
                               train_dataset=split("preference").select_columns(["prompt"]), args=args)
        return build

    seconds = {
        "dpo": run("dpo", local["sft"], dpo_on(split("preference"))),
        "kto": run("kto", local["sft"], lambda s, common, model, tok: KTOTrainer(
            model=model, processing_class=tok, train_dataset=unpaired_rows(split(s.data_kind), s.data_kind, seed),
            args=KTOConfig(**common, beta=s.beta, max_length=s.training.max_length,
                           desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight))),
        "rlhf": run("rlhf", local["sft"], online(GRPOConfig, GRPOTrainer)),
        "rloo": run("rloo", local["sft"], online(RLOOConfig, RLOOTrainer)),
    }
    for method in ("rlaif", "spin"):
        for r in (1, 2):
            name = f"{method}.round{r}"
            start = local["sft"] if r == 1 else local[f"{method}.round{r - 1}"]
            seconds[name] = run(name, start, dpo_on(pairs(name)))
    return seconds


# ---- report ---------------------------------------------------------------------------------------------------

def report(rows: list[dict]) -> list[str]:
    cols = ("sft", *METHODS)
    print(f"\n| seed | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    for name, agg in (("mean", statistics.mean), ("min", min)):
        print(f"| **{name}** | " + " | ".join(f"{agg(r[c] for r in rows):.3f}" for c in cols) + " |")
    print("| **min − SFT** | — | " + " | ".join(f"{min(r[c] - r['sft'] for r in rows):+.3f}" for c in METHODS) + " |")
    print("| **mean − SFT** | — | " + " | ".join(f"{statistics.mean(r[c] - r['sft'] for r in rows):+.3f}"
                                               for c in METHODS) + " |")
    print("\nKL to SFT (evaluate's Monte-Carlo estimate), per seed: "
          + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["kl"].items() if v is not None)
                      for r in rows))
    print("\nSPIN on the sloppy demonstrations (the control): share of SFT prompts where the model's reply equals "
          "the annotator's, before round 1 / before round 2: "
          + "; ".join(f"seed {r['seed']}: {r['spin_matched'][0]:.3f} / {r['spin_matched'][1]:.3f}" for r in rows)
          + f"; {ANNOTATOR_ACCURACY_NOTE}: {annotator_accuracy():.3f}")
    print("\nSPIN on correct demonstrations (configs/spin.yaml): under-trained SFT -> SPIN round 2 vs SFT + the "
          "same extra steps")
    print("| seed | SFT (2 epochs) | SPIN round 2 | SFT + 96 steps | SPIN − SFT | SPIN − (SFT + steps) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['clean_sft']:.3f} | {r['clean_spin']:.3f} | {r['clean_sft_more']:.3f} | "
              f"{r['clean_spin'] - r['clean_sft']:+.3f} | {r['clean_spin'] - r['clean_sft_more']:+.3f} |")
    print("\nFull fine-tuning, LoRA (r 16, embed_tokens trained too) and prompt tuning (16 virtual tokens) on the "
          "demo's SFT data (configs/peft.yaml): task accuracy per seed, stored output vs full model size")
    print("| method | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean | stored MB | full MB | "
          "trainable parameters | stage s (seed 0) |")
    print("|---" * (len(rows) + 6) + "|")
    for name in ("sft_full", "sft_lora", "sft_prompt"):
        first = rows[0]["peft"][name]
        stored = first.get("adapter_mb", first["full_mb"])
        print(f"| {name} | " + " | ".join(f"{r['peft'][name]['accuracy']:.3f}" for r in rows)
              + f" | {statistics.mean(r['peft'][name]['accuracy'] for r in rows):.3f} | {stored:.3f} | "
              f"{first['full_mb']:.3f} | {int(first.get('trainable_parameters', 0)) or 'all'} | {first['seconds']:.1f} |")
    timed = [r for r in rows if "bare_seconds" in r]
    for r in timed:
        print(f"\nStage seconds vs the bare TRL trainer (seed {r['seed']}, same run):")
        print("| stage | stage s | bare TRL s | ratio |")
        print("|---|---|---|---|")
        for name, bare in r["bare_seconds"].items():
            stage = r["stage_seconds"][name]
            print(f"| {name} | {stage:.1f} | {bare:.1f} | {stage / bare:.2f} |")
    failed = [f"{m} - sft = {min(r[m] - r['sft'] for r in rows):+.3f} < {MARGIN}" for m in METHODS_THAT_BEAT_SFT
              if min(r[m] - r["sft"] for r in rows) < MARGIN]
    clean = min(r["clean_spin"] - r["clean_sft"] for r in rows)
    if clean < MARGIN:
        failed.append(f"spin (clean data) - sft = {clean:+.3f} < {MARGIN}")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--parallel", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--bare-seed", type=int, default=0, help="the seed whose stages are timed against bare TRL")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "bakeoff.json"))
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: time the bare trainers of one run
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        Path(args.json).write_text(json.dumps(bare_trainers(Path(args.bare), args.seed)))
        return
    work = Path(tempfile.mkdtemp(prefix="posttrain-bakeoff-"))
    print(f"work folder: {work}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda s: one_seed(work, s, args.threads, s == args.bare_seed), args.seeds))
    failed = report(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n" + ("every margin holds" if not failed else "MARGINS MISSED: " + "; ".join(failed)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
