"""An example of composing stages in your own Prefect flow (flows/api.py): SFT once, DPO for each beta,
one evaluation of all of them, and the beta whose policy wins most often against SFT.

    python -m flows.example_flow                      # the demo's data and tiny base model
    python -m flows.example_flow --betas 0.05 0.1 0.5

Every stage is the same cached task a recipe runs: rerun with one more beta and only that DPO stage
and the evaluation run.
"""

from __future__ import annotations

from prefect import flow

from flows.api import PipelineRun


@flow(name="posttrain-beta-sweep")
def beta_sweep(
    betas: list[float] = (0.1, 0.5),
    seed: int = 0,
    base_settings: dict | None = None,
    sft_training: dict | None = None,
    reward_training: dict | None = None,
    dpo_training: dict | None = None,
    evaluate_settings: dict | None = None,
) -> dict:
    """SFT -> one DPO per beta -> evaluation; returns {"best_beta", "win_rates", "summary"}. Settings not
    given are the demo recipe's (configs/demo.yaml)."""
    from flows.config import DEFAULT_RECIPE, instance_settings, load_config

    demo = {name: instance_settings(inst) for name, inst in load_config(DEFAULT_RECIPE).stages.items()}
    with PipelineRun("beta-sweep", seed=seed) as run:
        data = run.stage("prepare_data", "data", **demo["prepare_data"])
        base = run.stage("pretrain", "base", **(base_settings or demo["pretrain"]))
        sft = run.stage("sft", "sft", inputs={"data": data, "base": base},
                        training=sft_training or demo["sft"]["training"])
        reward = run.stage("reward", "reward", inputs={"data": data, "init": sft},
                           **{**demo["reward"], "training": reward_training or demo["reward"]["training"]})
        policies = {}
        for beta in betas:
            name = f"dpo_beta{str(beta).replace('.', '')}"
            policies[name] = run.stage("dpo", name, inputs={"data": data, "policy": sft},
                                       **{**demo["align"], "beta": beta,
                                          "training": dpo_training or demo["align"]["training"]})
        report = run.stage("evaluate", "evaluate", inputs={"data": data, "reward": reward, "base": base, "sft": sft,
                                                           **policies}, **(evaluate_settings or {"max_new_tokens": 8}))
    win_rates = {beta: report.metrics[f"{name}/win_rate_vs_sft"] for beta, name in zip(betas, policies)}
    return {"best_beta": max(win_rates, key=win_rates.get), "win_rates": win_rates, "summary": run.summary}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = beta_sweep(betas=args.betas, seed=args.seed)
    print(f"win rate vs SFT by beta: {result['win_rates']}; best beta: {result['best_beta']}")
