"""The pictures of an evaluation and of a run: model comparison with error bars, the pairwise win-rate matrix,
reward distributions per model, and a panel of each training stage's curves.

Each figure is a PNG whose text chunk `posttrain` holds the data it plots as JSON (the models, values and
intervals), so a reader or a test can tell what a picture shows without looking at pixels; the same data is
written beside it as <name>.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COMPARED = ("task_accuracy", "mean_reward", "judge_score", "response_tokens")
DATA_KEY = "posttrain"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, data: dict) -> Path:
    """Write the figure as PNG with its data in the PNG text chunk, and the data as JSON beside it."""
    plt = _pyplot()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={DATA_KEY: json.dumps(data, sort_keys=True)})
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def comparison(metrics: dict[str, float], models: list[str], out: Path, confidence: float = 0.95) -> Path | None:
    """One panel per headline metric present: a bar per model with its bootstrap interval as error bar."""
    shown = [m for m in COMPARED if any(f"{model}/{m}" in metrics for model in models)]
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 3.6), squeeze=False)
    data = {"models": models, "confidence": confidence, "metrics": {}}
    for ax, metric in zip(axes[0], shown):
        names = [m for m in models if f"{m}/{metric}" in metrics]
        values = [metrics[f"{m}/{metric}"] for m in names]
        lows = [metrics.get(f"{m}/{metric}_ci_low", v) for m, v in zip(names, values)]
        highs = [metrics.get(f"{m}/{metric}_ci_high", v) for m, v in zip(names, values)]
        errors = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric.replace("_", " "))
        if metric == "task_accuracy":
            ax.set_ylim(0, 1)
        data["metrics"][metric] = {m: {"value": v, "ci_low": lo, "ci_high": hi}
                                   for m, v, lo, hi in zip(names, values, lows, highs)}
    fig.suptitle(f"Models on the held-out prompts (bars: {confidence:.0%} bootstrap intervals)")
    fig.tight_layout()
    return save(fig, out / "comparison.png", data)


def win_rate_matrix(matrix: dict, out: Path) -> Path | None:
    """Heatmap: row model's win rate against column model (ties count half), with the value in each cell."""
    models = matrix["models"]
    if len(models) < 2:
        return None
    plt = _pyplot()
    n = len(models)
    grid = [[math.nan if a == b else matrix["win_rate"][a][b] for b in models] for a in models]
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 0.9 * n + 1.8))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            if a != b:
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if abs(grid[i][j] - 0.5) > 0.3 else "black")
    ax.set_xticks(range(n), models, rotation=30, ha="right")
    ax.set_yticks(range(n), models)
    ax.set_xlabel("against")
    ax.set_title(f"Win rate of row vs column (judge: {matrix['judge']})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save(fig, out / "win_rates.png", matrix)


def reward_distributions(rewards: dict[str, list[float]], out: Path) -> Path | None:
    """Box plot of each model's reward-model scores over the held-out prompts."""
    if not rewards:
        return None
    plt = _pyplot()
    models = list(rewards)
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 2.5, 3.6))
    ax.boxplot([rewards[m] for m in models], showmeans=True)
    ax.set_xticks(range(1, len(models) + 1), models, rotation=30, ha="right")
    ax.set_ylabel("reward-model score")
    ax.set_title("Reward distribution per model (triangle: mean)")
    fig.tight_layout()
    data = {"models": models, "rewards": {m: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}
                                          for m, v in rewards.items()}}
    return save(fig, out / "reward_distributions.png", data)


def training_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> Path | None:
    """A panel per training stage: its loss curve(s) by step (and its reward curve where it logs one)."""
    stages = [s for s, c in curves.items() if c]
    if not stages:
        return None
    plt = _pyplot()
    cols = min(4, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for name, points in curves[stage].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                    marker="." if len(points) < 30 else None)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    data = {"stages": {s: {name: len(points) for name, points in curves[s].items()} for s in stages}}
    return save(fig, out / "training_curves.png", data)


def sample_efficiency(curves: dict[str, dict[str, list[tuple[int, float, float, float]]]], out: Path,
                      title: str = "Feedback elicitation") -> Path | None:
    """A panel per quality measure against the number of queries: a line per selection rule (its mean over
    seeds) with the band from the lowest to the highest seed. curves[measure][rule] = [(queries, mean, lo, hi)]."""
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (measure, rules) in zip(axes[0], curves.items()):
        for i, (rule, points) in enumerate(rules.items()):
            xs, mean, lo, hi = zip(*points)
            ax.plot(xs, mean, marker="o", markersize=3, color=f"C{i}", label=rule)
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_xlabel("queries (preference labels asked for)")
        ax.set_title(measure.replace("_", " "))
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} (lines: mean over seeds; bands: lowest to highest seed)")
    fig.tight_layout()
    return save(fig, out / "sample_efficiency.png", {"curves": curves})


def read_data(path: Path) -> dict:
    """The data a figure written by save() plots, from its PNG text chunk."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.info[DATA_KEY])
