"""The recipe graph: one registry, validation that names the instance, order, rounds, selection, branches."""

import threading
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, PipelineConfig, load_config, validate_recipe
from flows.graph import build_nodes, downstream_of, node_names
from tasks.machinery.stagekind import VALUE_TYPES
from tasks.kinds import kind_modules, kinds

ROOT = Path(__file__).resolve().parents[2]
DATA = {"kind": "prepare_data", "sft": {"source": "a.jsonl"}, "preference": {"source": "b.jsonl"},
        "eval": {"source": "c.jsonl"}}


def recipe(**stages) -> dict:
    import copy

    return {"name": "t", "stages": {"data": copy.deepcopy(DATA), "base": {"kind": "pretrain"}, **stages}}


def problems_of(tree: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_recipe(tree)
    return str(info.value)


def test_every_kind_is_declared_once_with_typed_slots_and_headline():
    assert len(kinds()) == len(kind_modules())
    for name, kind in kinds().items():
        assert kind.name == name and kind.description and kind.headline, name
        assert kind.output in VALUE_TYPES and all(slot.type in VALUE_TYPES for slot in kind.inputs.values()), name
        assert kind.module == f"tasks.kinds.{name}", "one module per kind, named as the kind"


def test_shipped_recipes_cover_the_common_shapes():
    shapes = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        shapes[path.stem] = [(n.name, n.kind.name) for n in build_nodes(cfg)]
    assert [k for _, k in shapes["sft-only"]] == ["prepare_data", "pretrain", "sft", "evaluate"]
    assert ("dpo", "dpo") in shapes["dpo-from-model"] and all(k != "sft" for _, k in shapes["dpo-from-model"])
    branches = load_config(ROOT / "configs" / "dpo-betas.yaml")
    assert {branches.stages["dpo_beta01"].inputs["policy"], branches.stages["dpo_beta05"].inputs["policy"]} == {"sft"}
    assert {"dpo_beta01", "dpo_beta05"} <= set(branches.stages["evaluate"].inputs.values())
    assert [n for n, _ in shapes["iterative-dpo"]][3:6] == ["dpo.round1", "dpo.round2", "dpo.round3"]
    assert [n for n, _ in shapes["demo"]] == ["prepare_data", "pretrain", "sft", "reward", "align", "evaluate",
                                            "promote"]


def test_unknown_input_is_named_with_the_instance():
    text = problems_of(recipe(sft={"kind": "sft", "inputs": {"data": "data", "base": "bsae"}}))
    assert "stages.sft.inputs.base: 'bsae' is no stage of this recipe" in text


def test_wrong_type_names_what_was_given_and_what_is_needed():
    text = problems_of(recipe(
        sft={"kind": "sft", "inputs": {"data": "data", "base": "base"}},
        rm={"kind": "reward", "inputs": {"data": "data", "init": "sft"}},
        dpo={"kind": "dpo", "inputs": {"data": "data", "policy": "rm"}}))
    assert "stages.dpo.inputs.policy: 'rm' is a reward stage, whose output is a reward model" in text
    assert "needs a causal language model" in text


def test_missing_data_kind_and_missing_input_and_unknown_slot():
    tree = recipe(sft={"kind": "sft", "inputs": {"data": "data"}},
                  dpo={"kind": "dpo", "inputs": {"data": "data", "policy": "sft", "ref": "sft"}})
    del tree["stages"]["data"]["preference"]
    text = problems_of(tree)
    assert "stages.sft.inputs: missing input 'base'" in text
    assert "stages.dpo.inputs.data: dpo reads preference data, but 'data' prepares none" in text
    assert "stages.dpo.inputs.ref: a dpo stage has no input 'ref'" in text


def test_cycle_is_named():
    text = problems_of(recipe(a={"kind": "dpo", "inputs": {"data": "data", "policy": "b"}},
                              b={"kind": "dpo", "inputs": {"data": "data", "policy": "a"}}))
    assert "the inputs form a cycle: a -> b -> a" in text


def test_unknown_kind_setting_and_pool_are_named():
    assert "stages.x" in problems_of(recipe(x={"kind": "ppo"}))
    assert "stages.sft.training.epochs" in problems_of(
        recipe(sft={"kind": "sft", "inputs": {"data": "data", "base": "base"}, "training": {"epochs": -1}}))
    tree = recipe(sft={"kind": "sft", "inputs": {"data": "data", "base": "base"}})
    tree["orchestration"] = {"stage_pools": {"stf": "gpu"}}
    assert "orchestration.stage_pools: stf is no stage of this recipe" in problems_of(tree)
    assert "cannot repeat" in problems_of(recipe(data2={"kind": "prepare_data", "sft": {"source": "a.jsonl"},
                                                        "rounds": 2}))


def test_a_recipe_without_preference_or_eval_data_is_fine_when_nothing_reads_them():
    tree = {"name": "t", "stages": {"data": {"kind": "prepare_data", "sft": {"source": "a.jsonl"}},
                                     "sft": {"kind": "sft", "inputs": {"data": "data", "base": "org/model"}}}}
    cfg = validate_recipe(tree)
    assert [n.name for n in build_nodes(cfg)] == ["data", "sft"]
    assert build_nodes(cfg)[1].model_inputs == {"base": "org/model"}


def test_external_model_forms_are_accepted_as_inputs(tmp_path):
    for ref in ("org/model", "org/model@v1.0", "s3://bucket/models/m", "models:/champion@prod", str(tmp_path)):
        cfg = validate_recipe(recipe(dpo={"kind": "dpo", "inputs": {"data": "data", "policy": ref}}))
        assert cfg.stages["dpo"].inputs["policy"] == ref
    assert "needs prepared data" in problems_of(recipe(
        dpo={"kind": "dpo", "inputs": {"data": "org/data", "policy": "org/model"}}))


OLD_DEMO = {"data": {"sft": {"source": "synthetic:arithmetic/sft"}, "preference": {"source": "synthetic:arithmetic/preference"},
                     "eval": {"source": "synthetic:arithmetic/eval"}},
            "pretrain": {"enabled": True, "corpus": "synthetic:arithmetic/corpus"},
            "align": {"method": "dpo", "beta": 0.1, "dpo": {"loss_type": ["sigmoid", "sft"]}}}


def test_overrides_reach_instances_by_name_and_chain_recipes_still_take_theirs():
    cfg = load_config(ROOT / "configs" / "dpo-betas.yaml", ["dpo_beta05.beta=0.7", "sft.training.epochs=1"])
    assert cfg.stages["dpo_beta05"].beta == 0.7 and cfg.stages["sft"].training.epochs == 1
    chain = validate_recipe({**OLD_DEMO, "model": {"base": "org/model"}}, ["align.beta=0.3", "pretrain.enabled=false"])
    assert "pretrain" not in chain.stages and chain.stages["sft"].inputs["base"] == "org/model"
    assert chain.stages["align"].beta == 0.3


def test_settings_are_parsed_once_into_the_kinds_typed_config():
    cfg = load_config(ROOT / "configs" / "dpo-betas.yaml")
    from tasks.blocks.align import DPOStageConfig

    assert isinstance(cfg.stages["dpo_beta01"], DPOStageConfig)
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg, "a dumped recipe (MLflow's resolved.yaml, Prefect parameters) reads back the same"
    assert yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))["stages"]["dpo_beta05"]["beta"] == 0.5


def test_rounds_chain_into_each_other_and_later_stages_read_the_last():
    cfg = load_config(ROOT / "configs" / "iterative-dpo.yaml", ["dpo.rounds=4"])
    nodes = {n.name: n for n in build_nodes(cfg)}
    assert nodes["dpo.round1"].stage_inputs["policy"] == "sft"
    assert nodes["dpo.round4"].stage_inputs["policy"] == "dpo.round3" and nodes["dpo.round4"].round == 4
    assert nodes["evaluate"].stage_inputs["policy"] == "dpo.round4"


def test_selection_by_only_and_from():
    from flows.pipeline import selection

    nodes = build_nodes(load_config(ROOT / "configs" / "dpo-betas.yaml"))
    assert selection(nodes, only=["dpo_beta05"]) == {"dpo_beta05"}
    assert selection(nodes, start_from=["dpo_beta01"]) == {"dpo_beta01", "evaluate"}
    assert downstream_of(nodes, {"sft"}) == {"sft", "reward", "dpo_beta01", "dpo_beta05", "evaluate"}
    with pytest.raises(KeyError, match="'nope' is no stage of this recipe"):
        node_names(nodes, "nope")


def test_independent_pool_branches_overlap_and_local_stages_take_turns():
    """Two branches on work pools both start before either finishes; local stages never overlap. No timing:
    each branch waits for the other to have started (it would deadlock if they ran one after the other)."""
    from flows.pipeline import run_graph

    nodes = build_nodes(load_config(ROOT / "configs" / "dpo-betas.yaml"))
    started = {n.name: threading.Event() for n in nodes}
    running_here, overlaps = [], []
    lock = threading.Lock()

    def run_node(node, outputs):
        started[node.name].set()
        if node.name in ("dpo_beta01", "dpo_beta05"):
            other = "dpo_beta05" if node.name == "dpo_beta01" else "dpo_beta01"
            assert started[other].wait(timeout=60), f"{other} did not start while {node.name} ran"
        else:
            with lock:
                running_here.append(node.name)
                if len(running_here) > 1:
                    overlaps.append(list(running_here))
            with lock:
                running_here.remove(node.name)
        assert all(up in outputs for up in node.upstream), f"{node.name} started before its inputs"
        return {"uri": node.name, "digest": node.name}

    outputs = run_graph(nodes, run_node, concurrent=lambda n: n.instance.startswith("dpo_"))
    assert set(outputs) == {n.name for n in nodes} and not overlaps


def test_a_failed_branch_stops_what_depends_on_it():
    from flows.pipeline import run_graph

    nodes = build_nodes(load_config(ROOT / "configs" / "dpo-betas.yaml"))
    ran = []

    def run_node(node, outputs):
        ran.append(node.name)
        if node.name == "dpo_beta01":
            raise RuntimeError("boom")
        return {"uri": node.name, "digest": node.name}

    with pytest.raises(RuntimeError, match="boom"):
        run_graph(nodes, run_node, concurrent=lambda n: n.instance.startswith("dpo_"))
    assert "evaluate" not in ran
