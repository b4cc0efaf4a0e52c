"""`promote` stage: put a policy in the MLflow Model Registry as `<registered_model>@champion` only if it passes
the recipe's gate; otherwise it becomes `@challenger`, and the stage says why.

The default gate, on the evaluation the recipe ran (the `report` input):
* it beats the reference (default the input named `sft`) on the primary metric (task accuracy), with the
  bootstrap interval of the paired difference clear of zero (`min_improvement` above it);
* its KL to the reference is under `max_kl`;
* it is not worse than the current champion, when the champion was evaluated on the same evaluation data
  (the champion version's tags carry its metric and the data digest).
The decision, its reasons and the numbers go to the stage's MLflow run, the version's tags and decision.json.
`posttrain promote RUN_ID` makes the version a run registered the champion by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import Section

CHAMPION, CHALLENGER = "champion", "challenger"


class GateSettings(Section):
    metric: str = Field("task_accuracy", description="The primary metric, as evaluate names it per model.")
    reference: str = Field("sft", description="The evaluate input the candidate must beat.")
    min_improvement: float = Field(0.0, description="The lower end of the paired difference's bootstrap interval "
                                   "must exceed this (task_accuracy); for other metrics, the difference itself.")
    max_kl: float | None = Field(2.0, gt=0, description="Largest KL(candidate || reference) allowed (nats per reply); "
                                 "null: not checked.")
    beat_champion: bool = Field(True, description="The candidate must not be worse than the current champion on "
                                "the same evaluation data.")


class PromoteConfig(Section):
    candidate: str = Field("policy", description="The candidate's input name in the evaluate stage (its metrics "
                           "are <candidate>/<metric>).")
    registered_model: str | None = Field(None, description="Registered model name (default: <recipe>-policy).")
    gate: GateSettings = Field(default_factory=GateSettings, description="What the candidate must show.")


def gate_decision(metrics: dict[str, float], gate: GateSettings, candidate: str,
                  champion: dict | None) -> tuple[bool, list[str]]:
    """(passed, reasons): every check the gate made, passed or not, in words."""
    reasons, passed = [], True
    value = metrics.get(f"{candidate}/{gate.metric}")
    if value is None:
        return False, [f"the evaluation has no {candidate}/{gate.metric} (evaluate inputs: is the candidate named "
                       f"{candidate!r}?)"]
    ref = metrics.get(f"{gate.reference}/{gate.metric}")
    delta_key = f"{candidate}/{gate.metric}_delta_vs_{gate.reference}"
    if delta_key in metrics and f"{delta_key}_ci_low" in metrics:
        low, high = metrics[f"{delta_key}_ci_low"], metrics[f"{delta_key}_ci_high"]
        ok = low > gate.min_improvement
        reasons.append(f"{gate.metric} {value:.3f} vs {gate.reference} {ref:.3f}: difference {metrics[delta_key]:+.3f}, "
                       f"interval [{low:+.3f}, {high:+.3f}] {'clear of' if ok else 'not clear of'} "
                       f"{gate.min_improvement:+.3f}")
    elif ref is not None:
        ok = value - ref > gate.min_improvement
        reasons.append(f"{gate.metric} {value:.3f} vs {gate.reference} {ref:.3f} (no interval): "
                       f"{'beats' if ok else 'does not beat'} it by more than {gate.min_improvement:+.3f}")
    else:
        ok = False
        reasons.append(f"the evaluation has no {gate.reference}/{gate.metric} to compare with")
    passed &= ok
    if gate.max_kl is not None:
        kl = metrics.get(f"{candidate}/kl_to_{gate.reference}")
        ok = kl is not None and kl <= gate.max_kl
        reasons.append(f"KL to {gate.reference} {'unknown' if kl is None else f'{kl:.3f}'} "
                       f"{'<=' if ok else 'not <='} {gate.max_kl:g}")
        passed &= ok
    if gate.beat_champion and champion is not None:
        if champion.get("value") is None:
            reasons.append(f"champion version {champion['version']} was evaluated on other data: not compared")
        else:
            ok = value >= champion["value"]
            reasons.append(f"{gate.metric} {value:.3f} {'>=' if ok else '<'} champion version {champion['version']}'s "
                           f"{champion['value']:.3f}")
            passed &= ok
    elif gate.beat_champion:
        reasons.append("no champion yet")
    return passed, reasons


def current_champion(client, name: str, metric: str, data_digest: str) -> dict | None:
    """{version, value}: the champion's metric when it was evaluated on the same data, else value None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    same_data = version.tags.get("posttrain.eval_data_digest") == data_digest
    value = version.tags.get(f"posttrain.eval.{metric}")
    return {"version": str(version.version), "value": float(value) if same_data and value is not None else None}


def _work(cfg: PromoteConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking
    from tasks.blocks.scoring import EVALUATION_METRICS

    metrics = json.loads((Path(inputs["report"]) / EVALUATION_METRICS).read_text())
    name = cfg.registered_model or tracking.registered_name(ctx.env.recipe, "policy")
    data_digest = ctx.refs.get("data", {}).get("digest", "")
    client = tracking.client(ctx.env.tracking_uri)
    champion = current_champion(client, name, cfg.gate.metric, data_digest)
    passed, reasons = gate_decision(metrics, cfg.gate, cfg.candidate, champion)
    tracking.log_model_folder(ctx.env, ctx.run_id, Path(inputs["policy"]), "policy")
    model_tag = client.get_run(ctx.run_id).data.tags.get("posttrain.model.policy", "")
    if model_tag.startswith("runs:/"):
        source = model_tag
    else:  # too big to upload: the version names the files in the artifact store
        from tasks.machinery.store import ArtifactStore, Ref

        source = ArtifactStore(ctx.env.storage_root).files_uri(Ref.from_dict(ctx.refs["policy"]))
    value = metrics.get(f"{cfg.candidate}/{cfg.gate.metric}")
    tags = {"posttrain.stage_run_id": ctx.run_id, "posttrain.output_digest": ctx.refs["policy"]["digest"],
            "posttrain.eval_data_digest": data_digest, "posttrain.gate": "passed" if passed else "failed",
            "posttrain.gate.reasons": "; ".join(reasons)[:5000], "posttrain.role": "policy",
            **({f"posttrain.eval.{cfg.gate.metric}": str(value)} if value is not None else {})}
    version = tracking.register_model_version(ctx.env.tracking_uri, name, source, ctx.run_id, tags,
                                              description="The policy of recipe runs that reached the promote stage.")
    alias = CHAMPION if passed else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    for key, text in tags.items():  # a reused version (same policy) gets this decision's tags
        client.set_model_version_tag(name, version, key, text)
    decision = {"registered_model": name, "version": version, "alias": alias, "passed": passed, "reasons": reasons,
                "champion_before": champion}
    (out / "decision.json").write_text(json.dumps(decision, indent=2))
    tracking.set_tags(ctx.env.tracking_uri, ctx.run_id, {"posttrain.promote.model": f"models:/{name}/{version}",
                                                         "posttrain.promote.alias": alias,
                                                         "posttrain.gate.reasons": "; ".join(reasons)[:5000]})
    import logging

    logging.getLogger("posttrain").info("[%s] models:/%s/%s is now @%s: %s", ctx.stage, name, version, alias,
                                        "; ".join(reasons))
    return {"promote/champion": float(passed), "promote/version": float(version)}


def _replay(cfg: PromoteConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    """A reproduction's promote: the gate decided again on this run's evaluation against the champion the
    original run saw, written as the original wrote it; the registry is not touched."""
    import logging

    from tasks.machinery import tracking
    from tasks.blocks.scoring import EVALUATION_METRICS

    metrics = json.loads((Path(inputs["report"]) / EVALUATION_METRICS).read_text())
    recorded = recorded_decision(ctx.env.tracking_uri, ctx.env.reproduction_of, ctx.stage)
    passed, reasons = gate_decision(metrics, cfg.gate, cfg.candidate, recorded["champion_before"])
    decision = {"registered_model": recorded["registered_model"], "version": recorded["version"],
                "alias": CHAMPION if passed else CHALLENGER, "passed": passed, "reasons": reasons,
                "champion_before": recorded["champion_before"]}
    (out / "decision.json").write_text(json.dumps(decision, indent=2))
    tracking.set_tags(ctx.env.tracking_uri, ctx.run_id, {"posttrain.promote.replayed_from": ctx.env.reproduction_of,
                                                         "posttrain.gate.reasons": "; ".join(reasons)[:5000]})
    logging.getLogger("posttrain").info(
        "[%s] reproduction: the gate says %s (the original: %s), against the champion the original saw; the "
        "registry is left as it is", ctx.stage, decision["alias"], recorded["alias"])
    return {"promote/champion": float(passed), "promote/version": float(recorded["version"])}


def recorded_decision(tracking_uri: str, pipeline_run_id: str, stage: str) -> dict:
    """The decision.json the promote stage `stage` of pipeline run `pipeline_run_id` wrote (from its output in
    the artifact store its MLflow run names)."""
    from tasks.machinery import tracking
    from tasks.machinery.store import ArtifactStore, Ref

    client = tracking.client(tracking_uri)
    parent = client.get_run(pipeline_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{pipeline_run_id}' and tags.`posttrain.stage` = '{stage}'"))
    tags = runs[0].data.tags if runs else {}
    if "posttrain.output_uri" not in tags:
        raise ValueError(f"reproduction of {pipeline_run_id}: that run has no finished stage {stage!r} to replay "
                         f"the promotion decision of")
    uri, digest = tags["posttrain.output_uri"], tags["posttrain.output_digest"]
    root = uri.rsplit("/", 2)[0]  # outputs live at <root>/<area>/<cache key>
    folder = ArtifactStore(root).materialize(Ref(uri, digest))
    return json.loads((folder / "decision.json").read_text())


KIND = StageKind(
    name="promote",
    description="Register a policy in the MLflow Model Registry: @champion if it passes the gate on the "
    "evaluation, else @challenger, with the reasons.",
    config=PromoteConfig,
    inputs={
        "policy": Slot("policy", "the candidate policy"),
        "report": Slot("report", "the evaluation that compared it (its metrics decide)"),
        "data": Slot("data", "the prepared data the evaluation used (identifies the evaluation set)", data=("eval",)),
    },
    output="report",
    work=_work,
    headline=("promote/champion",),
    replay=_replay,
)
