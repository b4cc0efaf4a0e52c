"""The demo's stages as plain function calls in one process: no Prefect, no MLflow, no artifact store.
The yardstick for bench/overhead.py (what the same trainers cost without the workflow around them).

    python bench/bare_demo.py --out DIR [--json PATH] [--config configs/demo.yaml]
"""

from __future__ import annotations

import time

started = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--json")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()

    import torch  # noqa: F401  (the same libraries the stages import, timed as start-up)
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from flows.config import load_config
    from tasks.kinds import dpo
    from tasks.machinery.context import StageContext
    from tasks.kinds.prepare_data import DatasetSource, prepare_data
    from tasks.machinery.sources import read_rows
    from tasks.kinds.evaluate import evaluate
    from tasks.kinds.pretrain import pretrain
    from tasks.kinds.reward import train_reward
    from tasks.kinds.sft import train_sft

    imports = time.perf_counter() - started
    cfg, out, seed = load_config(args.config), Path(args.out), 0
    folders = {name: out / name for name in ("data", "base", "sft", "reward", "policy", "evaluation")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def stage(name, fn):
        t = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.1f} s", flush=True)

    s = cfg.stages
    stage("prepare_data", lambda: prepare_data(s["prepare_data"], folders["data"], seed))
    texts = [r["text"] for _, r in read_rows(DatasetSource(source=s["pretrain"].corpus)) if r.get("text")]
    stage("pretrain", lambda: pretrain(s["pretrain"], texts, folders["base"], seed))
    stage("sft", lambda: train_sft(s["sft"], folders["data"], folders["base"], folders["sft"], seed))
    stage("reward", lambda: train_reward(s["reward"], folders["data"], folders["sft"], folders["reward"], seed))
    ctx = StageContext(seed=seed, env=None, run_id=None, stage="align")
    stage("align", lambda: dpo._train(s["align"], {"data": folders["data"], "policy": folders["sft"]},
                                      folders["policy"], ctx))
    models = {"base": folders["base"], "sft": folders["sft"], "policy": folders["policy"]}
    stage("evaluate", lambda: evaluate(s["evaluate"], folders["data"], models, folders["reward"],
                                       folders["evaluation"], seed))
    print(f"imports {imports:.1f} s, stages {sum(seconds.values()):.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"imports": imports, "stages": seconds}))


if __name__ == "__main__":
    main()
