"""The tiny recipe end to end: stages, lineage, caching across runs, failures."""

import json

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tasks.machinery.store import ArtifactStore, Ref
from tests.servers import task_run_states, tiny_stages

from .conftest import run_cli, write_data

pytestmark = pytest.mark.e2e
STAGES = tiny_stages()


@pytest.fixture(scope="module")
def data(state_home):
    return write_data(state_home / "data")


def _data_overrides(data):
    return [f"prepare_data.{part}.source={path}" for part, path in data.items()] + [HARNESS, "evaluate.figures=true"]


# the evaluation also runs the repository's custom lm-evaluation-harness task (offline) on every model
HARNESS = "evaluate.harness={tasks: [posttrain_sums_choice], include_path: configs/harness/arithmetic, limit: 8}"


@pytest.fixture(scope="module")
def first(state_home, data):
    code, summary = run_cli(state_home, *_data_overrides(data))
    return code, summary


def _by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def _client(summary):
    return MlflowClient(tracking_uri=summary["tracking_uri"])


def test_first_run_completes_every_stage(first):
    code, summary = first
    assert code == 0
    assert [s["name"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert stage["status"] == "completed", stage
        assert stage["cache_key"].startswith(stage["kind"] + "-")  # keys follow the kind, not the instance
        assert stage["output_uri"] and stage["mlflow_run_id"] and stage["seconds"] > 0
        assert set(stage) >= {"name", "kind", "status", "cache_key", "output_uri", "mlflow_run_id", "seconds", "metrics"}
    for key in ("eval/base/task_accuracy", "eval/sft/task_accuracy", "eval/policy/task_accuracy",
                "reward/pairwise_accuracy", "eval/policy/win_rate_vs_sft", "eval/policy/kl_to_sft"):
        assert key in summary["metrics"]
    assert summary["mlflow_run_id"] and summary["flow_run_id"]


def test_parent_run_records_config_versions_commit_and_cache_keys(first):
    _, summary = first
    client = _client(summary)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["seed"] == "0" and parent.data.params["stages.align.beta"] == "0.1"
    assert parent.data.params["stages.align.kind"] == "dpo"
    tags = parent.data.tags
    assert tags["prefect.flow_run_id"] == summary["flow_run_id"]
    assert "mlflow.source.git.commit" in tags
    for lib in ("torch", "transformers", "trl", "peft", "datasets"):
        assert tags[f"posttrain.version.{lib}"] not in ("", "absent")
    for stage in summary["stages"]:
        assert tags[f"posttrain.cache_key.{stage['name']}"] == stage["cache_key"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert "config/resolved.yaml" in artifacts
    assert parent.data.metrics["eval/policy/task_accuracy"] == summary["metrics"]["eval/policy/task_accuracy"]


def test_each_stage_has_a_child_run_with_curves_metrics_and_inputs(first):
    _, summary = first
    client = _client(summary)
    for stage in summary["stages"]:
        run = client.get_run(stage["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        assert run.data.tags["posttrain.cached"] == "false"
        assert run.data.tags["posttrain.output_uri"] == stage["output_uri"]
        for name, value in stage["metrics"].items():
            assert run.data.metrics[name.replace(":", "_")] == pytest.approx(value)
        # MLflow's system metrics, at least one sample even for a stage shorter than the sampling interval
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    data_run = client.get_run(_by_name(summary)["prepare_data"]["mlflow_run_id"])
    for kind in ("sft", "preference"):
        for count in ("rows_read", "too_long_removed", "identical_pairs_removed", "contaminated_removed",
                      "duplicates_removed", "near_duplicates_removed", "train_rows", "eval_rows"):
            assert f"{kind}/{count}" in data_run.data.metrics, f"{kind}/{count}"
    assert data_run.data.metrics["preference/contaminated_removed"] > 0, "the synthetic pairs hold eval questions"
    logged = {d.dataset.name: d for d in data_run.inputs.dataset_inputs}
    assert {"sft-train", "sft-eval", "preference-train", "preference-eval", "eval-test"} <= set(logged)
    rows = {t.key: t.value for t in logged["sft-train"].tags}["posttrain.rows"]
    assert int(rows) == data_run.data.metrics["sft/train_rows"]
    assert {a.path for a in client.list_artifacts(data_run.info.run_id, "data")} == {"data/stats.json",
                                                                                     "data/removed.jsonl"}
    sft = _by_name(summary)["sft"]["mlflow_run_id"]
    curve = client.get_metric_history(sft, "train/loss")
    assert len(curve) >= 3 and len({m.step for m in curve}) == len(curve)
    inputs = client.get_run(sft).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["sft-train"] and inputs[0].dataset.digest
    evaluation = _by_name(summary)["evaluate"]["metrics"]
    for name in ("sft/task_accuracy", "policy/task_accuracy", "policy/win_rate_vs_sft",
                 "policy/task_accuracy_delta_vs_sft"):
        assert evaluation[f"{name}_ci_low"] <= evaluation[name] <= evaluation[f"{name}_ci_high"], name


def test_training_changed_the_weights(first):
    _, summary = first
    stages = _by_name(summary)
    store = ArtifactStore(summary["storage_root"])

    def weights(name):
        s = stages[name]
        return load_file(store.materialize(Ref(s["output_uri"], s["output_digest"])) / "model.safetensors")

    base, sft, policy = weights("pretrain"), weights("sft"), weights("align")
    assert base.keys() == sft.keys() == policy.keys()
    assert any(not (base[k] == sft[k]).all() for k in base)
    assert any(not (sft[k] == policy[k]).all() for k in sft)


def test_final_policy_loads_back_from_mlflow(first, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, summary = first
    run_id = _by_name(summary)["align"]["mlflow_run_id"]
    mlflow.set_tracking_uri(summary["tracking_uri"])
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/policy", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.num_parameters() > 0 and tokenizer.chat_template


def test_evaluation_logs_a_sample_table(first):
    _, summary = first
    client = _client(summary)
    run_id = _by_name(summary)["evaluate"]["mlflow_run_id"]
    table = json.loads(open(client.download_artifacts(run_id, "samples/generations.json")).read())
    assert {"prompt", "reference", "base", "sft", "policy"} <= set(table["columns"])
    assert len(table["data"]) == 8


def test_same_config_again_is_all_cached(first, state_home, data):
    _, before = first
    code, summary = run_cli(state_home, *_data_overrides(data))
    assert code == 0
    assert [s["status"] for s in summary["stages"]] == ["cached"] * len(STAGES)
    assert [s["cache_key"] for s in summary["stages"]] == [s["cache_key"] for s in before["stages"]]
    first_total = sum(s["seconds"] for s in before["stages"])
    assert sum(s["seconds"] for s in summary["stages"]) < 0.05 * first_total
    client = _client(summary)
    origin = _by_name(before)
    for stage in summary["stages"]:
        run = client.get_run(stage["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        assert run.data.tags["posttrain.cached"] == "true"
        assert run.data.tags["posttrain.cached_from_run"] == origin[stage["name"]]["mlflow_run_id"]
    assert _prefect_task_states(summary["flow_run_id"]) == {name: "Cached" for name in STAGES}


def _prefect_task_states(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return task_run_states(client, [flow_run_id], STAGES)


def test_changing_beta_reruns_align_and_evaluate_only(first, state_home, data):
    code, summary = run_cli(state_home, *_data_overrides(data), "align.beta=0.2")
    assert code == 0
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "prepare_data": "cached", "pretrain": "cached", "sft": "cached", "reward": "cached",
        "align": "completed", "evaluate": "completed"}


def test_compare_names_the_setting_the_outputs_and_the_metrics_that_differ(first, state_home, data, tmp_path, capsys):
    from flows.cli import main

    _, a = first
    code, b = run_cli(state_home, *_data_overrides(data), "align.beta=0.2")
    assert code == 0
    out = tmp_path / "compare.json"
    assert main(["compare", a["mlflow_run_id"], b["mlflow_run_id"], "--json", str(out)]) == 0
    diff = json.loads(out.read_text())
    assert [(c["name"], c["a"], c["b"]) for c in diff["config"]] == [("stages.align.beta", 0.1, 0.2)]
    assert {o["name"] for o in diff["outputs"]} == {"align", "evaluate"}, "only the stages beta reaches"
    assert diff["data"] == [] and diff["versions"] == []
    accuracy = next(m for m in diff["metrics"] if m["name"] == "eval/policy/task_accuracy")
    assert accuracy["delta"] == pytest.approx(accuracy["b"] - accuracy["a"])
    assert main(["compare", a["mlflow_run_id"], b["mlflow_run_id"]]) == 0
    printed = capsys.readouterr().out
    assert "stages.align.beta" in printed and "data digests: no difference" in printed
    assert main(["compare", a["mlflow_run_id"], "0123456789abcdef"]) == 3


def test_changing_one_data_row_reruns_from_prepare_data(first, state_home, data):
    rows = data["sft"].read_text().splitlines()
    row = json.loads(rows[3])
    row["completion"] = "42"
    rows[3] = json.dumps(row)
    data["sft"].write_text("\n".join(rows) + "\n")
    code, summary = run_cli(state_home, *_data_overrides(data))
    assert code == 0
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "prepare_data": "completed", "pretrain": "cached", "sft": "completed", "reward": "completed",
        "align": "completed", "evaluate": "completed"}


def test_bad_data_fails_the_stage_in_mlflow_with_the_row(state_home, data, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1 + 1", "completion": "2"}\n{"prompt": "2 + 2"}\n')
    overrides = [o for o in _data_overrides(data) if not o.startswith("prepare_data.sft.")] + [f"prepare_data.sft.source={broken}"]
    code, summary = run_cli(state_home, *overrides)
    assert code == 1
    failed = summary["stages"][-1]
    assert failed["name"] == "prepare_data" and failed["status"] == "failed"
    assert "broken.jsonl: row 2: field 'completion' is missing" in failed["error"]
    client = _client(summary)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FAILED"
    [child] = client.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.info.status == "FAILED"
    assert "broken.jsonl: row 2: field 'completion' is missing" in child.data.tags["posttrain.error"]


def test_missing_data_file_fails_before_any_compute(state_home, data, tmp_path, capsys):
    overrides = [o for o in _data_overrides(data) if not o.startswith("prepare_data.sft.")]
    code, summary = run_cli(state_home, *overrides, f"prepare_data.sft.source={tmp_path / 'gone.jsonl'}")
    assert code == 2 and summary == {}, "the pre-flight check stops the run; no stage starts"
    err = capsys.readouterr().err
    assert f"stages.prepare_data.sft.0: {tmp_path / 'gone.jsonl'}: file not found" in err


def test_prefect_ui_shows_stage_logs_progress_and_every_stage_in_the_artifacts(first):
    """What a user sees in the Prefect UI: each stage's step lines and MLflow run in the flow run's logs,
    a progress artifact per training stage, every stage's headline metrics in the stages table."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    _, summary = first
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["flow_run_id"]])), limit=200)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary["flow_run_id"]])))
    messages = [log.message for log in logs]
    for stage in ("pretrain", "sft", "reward", "align"):
        assert any(m.startswith(f"[{stage}] step ") for m in messages), stage
    for stage in _by_name(summary).values():
        assert any(m.startswith(f"[{stage['name']}] MLflow run {stage['mlflow_run_id']}") for m in messages)
    by_key = {a.key: a for a in artifacts}
    for stage in ("pretrain", "sft", "reward", "align"):
        assert by_key[f"progress-{stage}"].data == 100.0, stage
    table = json.loads(by_key["posttrain-stages"].data) if isinstance(by_key["posttrain-stages"].data, str) \
        else by_key["posttrain-stages"].data
    headlines = {row["stage"]: row["headline"] for row in table}
    assert "pairwise_accuracy=" in headlines["reward"] and "policy/win_rate_vs_sft=" in headlines["evaluate"]
    assert "train_rows=" in headlines["prepare_data"] and "train/final_loss=" in headlines["align"]
    assert "mlflow ui --backend-store-uri" in by_key["posttrain-report"].data
    report = by_key["posttrain-report"].data
    assert "Every model on the held-out prompts" in report
    for model in ("base", "sft", "policy"):
        assert f"| {model} | " in report, model


MODELS = {"base", "sft", "policy"}


def _picture(path):
    """A valid, non-blank PNG (opened and decoded), returning the data the figure says it plots."""
    from PIL import Image

    from tasks.machinery.figures import read_data

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200, (path, image.size)
        image.load()
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50, f"{path}: {len(colours)} colours, a blank picture"
    return read_data(path)


def test_evaluation_figures_are_pictures_of_every_model_on_the_stage_and_parent_runs(first, tmp_path):
    _, summary = first
    client = _client(summary)
    evaluate = _by_name(summary)["evaluate"]["mlflow_run_id"]
    figures = {}
    for where, run_id, folder in (("stage", evaluate, "evaluation/figures"), ("parent", summary["mlflow_run_id"], "")):
        for name in ("comparison", "win_rates", "reward_distributions", "training_curves"):
            if where == "stage" and name == "training_curves":
                continue
            path = client.download_artifacts(run_id, f"{folder}/{name}.png".lstrip("/"), str(tmp_path / where))
            figures[where, name] = _picture(path)
    for where in ("stage", "parent"):
        comparison = figures[where, "comparison"]
        assert set(comparison["models"]) == MODELS
        accuracy = comparison["metrics"]["task_accuracy"]
        assert set(accuracy) == MODELS
        for model, bar in accuracy.items():
            assert bar["ci_low"] <= bar["value"] <= bar["ci_high"], model
        matrix = figures[where, "win_rates"]
        assert set(matrix["models"]) == MODELS and matrix["judge"] == "reward model"
        for a in MODELS:
            for b in MODELS - {a}:
                assert matrix["win_rate"][a][b] + matrix["win_rate"][b][a] == pytest.approx(1.0)
                assert matrix["ci_low"][a][b] <= matrix["win_rate"][a][b] <= matrix["ci_high"][a][b]
        assert set(figures[where, "reward_distributions"]["models"]) == MODELS
    metrics = _by_name(summary)["evaluate"]["metrics"]
    for model in MODELS:
        assert 0.0 <= metrics[f"{model}/harness/posttrain_sums_choice/acc"] <= 1.0
    assert client.get_run(evaluate).data.tags["posttrain.input.harness.tasks"].endswith("configs/harness/arithmetic@"
                                                                                       + _task_digest())
    assert matrix["win_rate"]["policy"]["sft"] == pytest.approx(metrics["policy/win_rate_vs_sft"])
    curves = figures["parent", "training_curves"]["stages"]
    assert set(curves) == {"pretrain", "sft", "reward", "align"}
    assert all(panel["train/loss"] >= 2 for panel in curves.values()), curves


def _task_digest():
    from tasks.blocks.harness import HarnessSettings, harness_sources

    settings = HarnessSettings(tasks=["posttrain_sums_choice"], include_path="configs/harness/arithmetic")
    return harness_sources(settings)["harness.tasks"]["digest"][:16]


def test_the_mlflow_ui_story(first):
    """What a user meets in the MLflow UI: the experiment opens on training runs; unique run names; the
    comparison first on the parent run; MLflow's own source and git fields; data sets on the parent and the
    evaluation; one metric naming scheme; every model a registered version linked to the run that made it."""
    _, summary = first
    client = _client(summary)
    experiment = client.get_experiment(summary["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    pipelines = client.search_runs([summary["experiment_id"]], "tags.`posttrain.kind` = 'pipeline'", max_results=500)
    names = [r.info.run_name for r in pipelines]
    assert len(names) == len(set(names)), names
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_name.startswith("tiny · ") and "prepare_data.sft.source=" in parent.info.run_name
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**task_accuracy**: ") and all(f"| {m} | " in note for m in MODELS)
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "comparison_table.json")).read())
    assert [row[0] for row in table["data"]] == ["base", "sft", "policy"] and "task_accuracy" in table["columns"]
    children = client.search_runs([summary["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("configs/tiny.yaml") and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == parent.data.tags["mlflow.source.git.commit"]
    evaluate = client.get_run(_by_name(summary)["evaluate"]["mlflow_run_id"])
    assert {d.dataset.name for d in evaluate.inputs.dataset_inputs} == {"eval-test"}
    assert {"eval-test", "sft-train", "preference-train"} <= {d.dataset.name for d in parent.inputs.dataset_inputs}
    for run in children:
        assert all(not key.startswith(("eval_", "train_")) for key in run.data.metrics), run.info.run_name
    stages = {s["name"] for s in summary["stages"]}
    for key in parent.data.metrics:
        head, _, rest = key.partition("/")
        assert (head == "eval" and rest.split("/")[0] in MODELS) or head in stages, key
    assert "sft/task_accuracy" not in parent.data.metrics  # sft the stage, or sft the evaluated model? neither
    for stage in summary["stages"]:
        if stage["kind"] in ("pretrain", "sft", "reward", "dpo"):
            name, version = stage["registered_model"].removeprefix("models:/").split("/")
            assert client.get_model_version(name, version).run_id == stage["mlflow_run_id"], stage["name"]
