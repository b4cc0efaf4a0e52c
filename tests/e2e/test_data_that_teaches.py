"""Data that teaches: elicitation rounds through the pipeline (cached per round, queries as the MLflow step, the
pairs a DPO stage trains on), synthetic data from a teacher endpoint and model (filtered, with provenance),
and prompt search (registry versions, the winner's alias, read back by evaluate and sft)."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.machinery.synthetic import arithmetic_reward
from tests.servers import OpenAIServer

from .conftest import run_cli, tiny_settings

pytestmark = pytest.mark.e2e

def elicit_recipe(tmp_path, base, rounds: int) -> str:
    stages = {
        "data": {"kind": "prepare_data", **tiny_settings("prepare_data")},
        "elicit": {"kind": "elicit", "rounds": rounds, "inputs": {"data": "data", "policy": str(base)},
                   "prompts_per_round": 8, "candidates": 4, "max_completion_length": 4, "eval_prompts": 16,
                   "eval_pairs": 64, "ensemble": {"heads": 4, "steps": 50},
                   # the tiny base gets no sum right: a ground truth its replies differ on (the longer wins)
                   "rater": {"kind": "simulated", "label_noise": 0.0,
                             "truth": "tests.e2e.test_data_that_teaches:long_reply"}},
        "dpo": {"kind": "dpo", "inputs": {"data": "elicit", "policy": str(base)}, **tiny_settings("align")},
    }
    path = tmp_path / f"elicit-{rounds}.yaml"
    path.write_text(yaml.safe_dump({"name": "elicit-test", "seed": 0, "stages": stages}, sort_keys=False))
    return str(path)


def test_elicitation_rounds_ask_the_rater_refit_and_hand_their_pairs_to_dpo(state_home, prepared, tmp_path):
    _, root = prepared
    code, summary = run_cli(state_home, config=elicit_recipe(tmp_path, root / "base", rounds=2))
    assert code == 0, summary
    stages = {s["name"]: s for s in summary["stages"]}
    first, second = stages["elicit.round1"]["metrics"], stages["elicit.round2"]["metrics"]
    assert 0 < first["elicit/queries"] <= 8 and second["elicit/queries"] == first["elicit/queries"] + second[
        "elicit/round_queries"], "each round adds its queries to the last round's"
    out = stages["elicit.round2"]["output_uri"]
    from tasks.machinery.store import ArtifactStore, Ref

    folder = ArtifactStore(summary["storage_root"]).materialize(Ref(out, stages["elicit.round2"]["output_digest"]))
    queries = [json.loads(line) for line in (folder / "elicit" / "queries.jsonl").read_text().splitlines()]
    assert len(queries) == second["elicit/queries"] and {q["round"] for q in queries} == {1, 2}
    for q in queries:  # a noiseless simulated rater says what the ground truth says
        right = long_reply([q["prompt"]] * 2, [[{"role": "assistant", "content": r}] for r in (q["first"], q["second"])])
        assert q["first"] != q["second"]
        assert q["label"] == (0.5 if right[0] == right[1] else float(right[0] > right[1]))
    decided = [q for q in queries if q["label"] != 0.5]
    pairs = pq.read_table(folder / "preference" / "train-00000.parquet").to_pylist()
    assert len(pairs) == len(decided) == second["elicit/decided"] > 0
    assert any((folder / "preference").glob("eval-*.parquet")) and any((folder / "eval").glob("test-*.parquet")), \
        "held-out data passed on"
    assert stages["dpo"]["status"] == "completed"

    client = MlflowClient(summary["tracking_uri"])
    history = client.get_metric_history(stages["elicit.round2"]["mlflow_run_id"], "elicit/rm_accuracy")
    assert {m.step for m in history} == {int(first["elicit/queries"]), int(second["elicit/queries"])}, \
        "the curve so far, with the number of queries as step"
    assert {m.value for m in history if m.step == second["elicit/queries"]} == {second["elicit/rm_accuracy"]}

    code, grown = run_cli(state_home, config=elicit_recipe(tmp_path, root / "base", rounds=3))
    assert code == 0, grown
    again = {s["name"]: s for s in grown["stages"]}
    assert again["elicit.round1"]["status"] == again["elicit.round2"]["status"] == "cached"
    assert again["elicit.round3"]["status"] == "completed" and again["dpo"]["status"] == "completed"
    assert again["elicit.round3"]["metrics"]["elicit/queries"] > second["elicit/queries"]


def test_synthetic_data_keeps_what_the_verifier_passes_with_its_provenance(prepared, tmp_path):
    from tasks.blocks.judges import RuleJudge
    from tasks.kinds.synthesize import SynthesizeConfig, synthesize

    _, root = prepared
    server = OpenAIServer(tmp_path)
    try:
        cfg = SynthesizeConfig(
            topics=[f"{a} and {b}" for a in (3, 8, 9) for b in (4, 9)], styles=["", "Be brief."],
            templates=["Add {{topic}}. {{style}}", "What do {{topic}} add up to? {{style}}"], samples=2,
            teacher={"backend": "endpoint", "url": server.url, "model": "teacher", "temperature": 0.7,
                     "retry_backoff_seconds": 0.01},
            scorer={"backend": "rule", "function": "tasks.machinery.synthetic:arithmetic_reward"}, threshold=1.0,
            eval_fraction=0.25)
        metrics = synthesize(cfg, tmp_path / "synth", seed=3, teacher_name="endpoint:teacher",
                             scorer=RuleJudge("tasks.machinery.synthetic:arithmetic_reward"), exclude={"Add 3 and 4."})
        asked = server.stats()["requests"]
    finally:
        server.stop()
    assert metrics["synthesize/prompts"] == 24 and asked == 48, "topics x styles x templates, two samples each"
    assert metrics["synthesize/eval_prompts_removed"] == 1, "an evaluation prompt is never trained on"
    assert metrics["synthesize/duplicates_removed"] == 24, "the deterministic teacher's second samples"
    # the teacher drops the carry of sums >= 15 (8+9, 9+9): the verifier removes those replies
    assert metrics["synthesize/below_threshold_removed"] == 8 and metrics["synthesize/kept"] == 15
    rows = [r for split in ("train", "eval") for r in
            pq.read_table(tmp_path / "synth" / "sft" / f"{split}-00000.parquet").to_pylist()]
    assert len(rows) == 15 and metrics["sft/eval_rows"] > 0
    for row in rows:
        assert arithmetic_reward([row["prompt"]], [row["completion"]]) == [1.0]
        provenance = json.loads(row["provenance"])
        assert provenance["seed"] == 3 and provenance["teacher"] == "endpoint:teacher" and provenance["score"] == 1.0
        assert provenance["topic"] in row["prompt"][0]["content"]
        assert provenance["template_version"].startswith("inline:") and provenance["style"] in ("", "Be brief.")
    from tasks.machinery.splits import load_split

    train = load_split(tmp_path / "synth", "sft", "train")
    assert set(train.column_names) == {"prompt", "completion"}, "provenance stays out of training"

    local = SynthesizeConfig(topics=["1 and 2"], templates=["Add {{topic}}."], samples=3, min_rows=1,
                             teacher={"backend": "model", "max_new_tokens": 4})
    metrics = synthesize(local, tmp_path / "local", seed=0, teacher=root / "base", teacher_name="base")
    assert metrics["synthesize/generated"] == 3, "a local model as teacher"
    with pytest.raises(ValueError, match="fewer than min_rows"):
        synthesize(local.model_copy(update={"min_rows": 50}), tmp_path / "few", seed=0, teacher=root / "base")


def test_prompt_search_registers_every_candidate_and_aliases_the_best(state_home, prepared, tmp_path):
    from tasks.machinery import tracking
    from tasks.kinds.evaluate import evaluation_sources, EvaluateConfig
    from tasks.blocks.judges import RuleJudge
    from tasks.kinds.prompt_search import PromptSearchConfig, search
    from tasks.blocks.prompts import prompt_source, wrap
    from tasks.kinds.sft import SFTStageConfig, train_sft

    _, root = prepared
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.open_store(uri)
    soft = tmp_path / "soft"
    train_sft(SFTStageConfig(prompt_tuning={"enabled": True, "num_virtual_tokens": 4},
                             training={"max_steps": 2, "batch_size": 8, "learning_rate": 1e-2, "max_length": 64}),
              root / "data", root / "base", soft, seed=0)
    from tasks.machinery.modeling import materialize_adapter

    server = OpenAIServer(tmp_path)
    try:
        cfg = PromptSearchConfig(
            candidates=[{"name": "plain"}, {"name": "terse", "system": "Reply with the sum only."},
                        {"name": "framed", "template": "Question: {{question}} Answer:"}],
            generate={"count": 2, "teacher": {"backend": "endpoint", "url": server.url, "model": "teacher",
                                              "retry_backoff_seconds": 0.01}},
            scorer={"backend": "rule", "function": "tests.e2e.test_data_that_teaches:long_reply"},
            max_dev_prompts=16, max_new_tokens=6, bootstrap_samples=200)
        soft_model = materialize_adapter(soft, "soft-digest", lambda base: root / "base")
        metrics = search(cfg, root / "data", root / "base", tmp_path / "search", 0, uri, "arith-prompt",
                         {"soft": soft_model}, scorer=RuleJudge("tests.e2e.test_data_that_teaches:long_reply"))
    finally:
        server.stop()
    table = json.loads((tmp_path / "search" / "prompts.json").read_text())["rows"]
    names = {r["candidate"] for r in table}
    assert names == {"plain", "terse", "framed", "generated-0", "soft"}, "one generated candidate: the two are equal"
    assert [r["score"] for r in table] == sorted((r["score"] for r in table), reverse=True)
    text = [r for r in table if r["kind"] == "text"]
    winner = max(text, key=lambda r: r["score"])
    client = tracking.client(uri)
    for row in text:
        version = client.load_prompt(f"prompts:/arith-prompt/{row['version']}")
        assert version.template == row["messages"]
        assert float(version.tags["posttrain.score"]) == pytest.approx(row["score"], abs=1e-5)
        assert row["ci_low"] <= row["score"] <= row["ci_high"]
    best = client.load_prompt("prompts:/arith-prompt@best")
    assert str(best.version) == winner["version"] and metrics["prompt_search/best_score"] == winner["score"]
    assert [r for r in table if r["candidate"] == "soft"][0]["kind"] == "soft_prompt"

    # downstream: evaluate and sft read the winner by its alias; the version's text keys them
    source = evaluation_sources(EvaluateConfig(prompt="prompts:/arith-prompt@best"), uri)["prompt.template"]
    assert source["uri"] == f"prompts:/arith-prompt/{winner['version']}" and source["messages"] == winner["messages"]
    assert prompt_source("prompts:/arith-prompt/1", uri)["prompt.template"]["digest"] != source["digest"] or \
        winner["version"] == "1"
    asked = wrap(source["messages"], [{"role": "user", "content": "What is 2 plus 3?"}])
    assert asked[-1]["content"].count("2 plus 3") == 1 and asked[-1]["role"] == "user"
    metrics = train_sft(SFTStageConfig(training={"max_steps": 1, "batch_size": 4, "max_length": 64}), root / "data",
                        root / "base", tmp_path / "sft-with-prompt", seed=0, template=source["messages"])
    assert metrics["train/steps"] == 1


def long_reply(prompts, completions, **kwargs):
    """A test scorer: the length of the reply, in characters (capped), so templates that differ score apart."""
    return [float(min(len(c[-1]["content"]), 20)) for c in completions]


def test_an_elicitation_round_with_dpo_trains_the_policy_the_next_round_samples(prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.blocks.elicitation import SimulatedRater
    from tasks.kinds.elicit import ElicitConfig, elicit_round

    _, root = prepared
    cfg = ElicitConfig(rule="infomax", prompts_per_round=16, candidates=4, max_completion_length=4, eval_prompts=8,
                       eval_pairs=32, ensemble={"heads": 4, "steps": 20},  # the tiny base gets no sum right: a
                       rater={"truth": "tests.e2e.test_data_that_teaches:long_reply"},  # rater its replies differ on
                       dpo={"loss_type": ["sigmoid"], "training": {"max_steps": 2, "batch_size": 4, "max_length": 64,
                                                                   "learning_rate": 1e-3}})
    metrics = elicit_round(cfg, root / "data", root / "base", tmp_path / "r1", 0, 1, SimulatedRater(cfg.rater, 0))
    policy = tmp_path / "r1" / "elicit" / "policy"
    assert metrics["elicit/decided"] > 0 and (policy / "config.json").exists()
    before = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "DPO on the decided pairs moved the policy"
    again = elicit_round(cfg.model_copy(update={"dpo": None}), tmp_path / "r1", root / "base", tmp_path / "r2", 0, 2,
                         SimulatedRater(cfg.rater, 1))
    assert again["elicit/queries"] > metrics["elicit/queries"]
    assert (tmp_path / "r2" / "elicit" / "policy" / "config.json").exists(), "the trained policy is carried on"


def test_a_judge_answers_the_queries_through_its_endpoint(state_home, prepared, tmp_path):
    from tasks.kinds.elicit import ElicitConfig, build_rater, elicit_round, rater_sources
    from tasks.machinery.context import RunEnv, StageContext

    _, root = prepared
    server = OpenAIServer(tmp_path, "--rule", "shorter")
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cfg = ElicitConfig(rule="passive", prompts_per_round=12, candidates=4, max_completion_length=6,
                           eval_prompts=4, eval_pairs=16, ensemble={"heads": 4, "steps": 10},
                           rater={"kind": "judge", "judge": {"backend": "endpoint", "url": server.url, "model": "short",
                                                             "retry_backoff_seconds": 0.01}})
        inputs = {"data": root / "data", "policy": root / "base", **rater_sources(cfg, uri)}
        assert set(inputs) == {"data", "policy", "rater.prompt.compare"}, "the judge prompt's version keys the round"
        env = RunEnv(storage_root=str(tmp_path / "store"), tracking_uri=uri, experiment_id="0", parent_run_id="")
        rater = build_rater(cfg, inputs, StageContext(seed=0, env=env, run_id=None, stage="elicit.round1"))
        metrics = elicit_round(cfg, root / "data", root / "base", tmp_path / "r1", 0, 1, rater)
        asked = server.stats()["requests"]
    finally:
        server.stop()
    queries = [json.loads(line) for line in (tmp_path / "r1" / "elicit" / "queries.jsonl").read_text().splitlines()]
    assert queries and asked >= 2 * len(queries), "each query asked in both orders (and the win rate judged too)"
    for q in queries:
        a, b = len(q["first"].strip()), len(q["second"].strip())
        assert q["label"] == (1.0 if a < b else 0.0 if b < a else 0.5), "the judge's verdict is the label"
    assert metrics["elicit/queries"] == len(queries) and "elicit/oracle_win_rate" not in metrics
