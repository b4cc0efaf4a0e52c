from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_opens_with_its_command(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, PipelineConfig)
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# posttrain run"), f"{recipe.name} must open with the command that runs it"


def test_default_recipe_is_the_demo():
    assert load_config().name == "demo"


def test_required_keys_exist():
    cfg = load_config()
    assert isinstance(cfg.seed, int)
    assert cfg.stages["align"].kind in ("dpo", "rlhf")
    assert cfg.stages["align"].beta > 0
    assert hasattr(cfg.storage, "root") and hasattr(cfg.tracking, "uri")


def test_the_default_recipes_are_graphs():
    for name in ("demo", "tiny", "demo-rlhf", "tiny-rlhf"):
        tree = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert "stages" in tree and not set(tree) & {"data", "pretrain", "sft", "reward", "align"}, name


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/demo-rlhf.yaml", ["align.beta=0.25", "sft.training.lora.enabled=true", "seed=7"])
    assert cfg.stages["align"].beta == 0.25 and cfg.stages["align"].kind == "rlhf"
    assert cfg.stages["align"].inputs["reward"] == "reward", "rlhf reads the demo's reward model"
    assert cfg.stages["sft"].training.lora.enabled is True and cfg.seed == 7


def test_a_recipe_extends_another_and_replaces_a_stage_of_another_kind():
    demo, rlhf = load_config("configs/demo.yaml"), load_config("configs/demo-rlhf.yaml")
    assert rlhf.name == "demo", "the name is inherited: RLHF's policy is a new version of demo-policy"
    assert list(rlhf.stages) == list(demo.stages)
    for name in demo.stages:
        if name != "align":
            assert rlhf.stages[name] == demo.stages[name], f"{name} is the demo's, so it comes from the cache"
    assert demo.stages["align"].kind == "dpo" and rlhf.stages["align"].kind == "rlhf"
    assert rlhf.stages["align"].num_generations == 4 and not hasattr(rlhf.stages["align"], "loss_type"), \
        "an instance of another kind replaces the extended one whole: none of DPO's settings are carried over"


def test_an_extending_recipe_merges_settings_drops_stages_and_names_its_problems(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {ROOT / 'configs' / 'tiny.yaml'}\nseed: 3\n"
                     "stages:\n  pretrain: null\n  sft: {inputs: {base: org/model}, training: {max_steps: 2}}\n"
                     "  evaluate: {inputs: {base: org/model}}\n")
    cfg = load_config(child)
    assert cfg.seed == 3 and "pretrain" not in cfg.stages
    assert cfg.stages["sft"].inputs == {"data": "prepare_data", "base": "org/model"}, "inputs merge slot by slot"
    assert cfg.stages["sft"].training.max_steps == 2 and cfg.stages["sft"].training.learning_rate == 2.0e-3
    (tmp_path / "drop.yaml").write_text("extends: child.yaml\nstages: {nowhere: null}\n")
    with pytest.raises(ConfigError, match=r"drop.yaml: stages.nowhere: null drops a stage .* none of that name"):
        load_config(tmp_path / "drop.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"extends a.yaml, which extends it again: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml: recipe not found \(extended by .*orphan.yaml\)"):
        load_config(tmp_path / "orphan.yaml")


def test_chain_form_overrides_on_the_graph_demo_say_what_they_are_called_now():
    hints = {"align.method=rlhf": r"stage align is of kind dpo; .*configs/demo-rlhf.yaml",
             "data.sft.source=x.jsonl": r"data stage is named prepare_data: --set prepare_data.sft.source",
             "align.dpo.training.max_steps=2": r"settings are its own: --set align.training.max_steps",
             "promote.enabled=false": r"stages: \{promote: null\}"}
    for override, message in hints.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_a_chain_recipe_of_earlier_versions_still_expands_into_the_graph(tmp_path):
    chain = tmp_path / "chain.yaml"
    chain.write_text("name: old\nmodel: {base: org/model}\n"
                     "data: {sft: {source: a.jsonl}, preference: {source: b.jsonl}, eval: {source: c.jsonl}}\n"
                     "align: {method: rlhf, beta: 0.2, dpo: {beta: 9}, rlhf: {num_generations: 2}}\n"
                     "promote: {enabled: true}\n")
    cfg = load_config(chain)
    assert list(cfg.stages) == ["prepare_data", "sft", "reward", "align", "evaluate", "promote"]
    assert cfg.stages["sft"].inputs == {"data": "prepare_data", "base": "org/model"}
    align = cfg.stages["align"]
    assert align.kind == "rlhf" and align.beta == 0.2 and align.num_generations == 2
    assert align.inputs == {"data": "prepare_data", "policy": "sft", "reward": "reward"}
    with pytest.raises(ConfigError, match=r"align\.method: 'ppo' is not an alignment method of the chain"):
        load_config(chain, ["align.method=ppo"])


def test_unknown_key_is_refused_with_its_path():
    with pytest.raises(ConfigError, match=r"align\.betta: unknown key"):
        load_config(None, ["align.betta=0.2"])


def test_bad_value_names_the_field_path():
    with pytest.raises(ConfigError, match=r"align\.beta: Input should be greater than 0"):
        load_config(None, ["align.beta=-1"])
    with pytest.raises(ConfigError, match=r"sft\.training\.batch_size"):
        load_config(None, ["sft.training.batch_size=lots"])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"--set seed\.x.*seed is a value"):
        load_config(None, ["seed.x=1"])


def test_missing_base_model_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {sft: {source: a.jsonl}, preference: {source: b.jsonl}, eval: {source: c.jsonl}}\n")
    with pytest.raises(ConfigError, match="model.base must name a base model"):
        load_config(recipe)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def _models(model: type[BaseModel], seen=None):
    seen = seen if seen is not None else set()
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)
    return seen


def test_every_field_has_a_description_and_unknown_keys_are_forbidden():
    for model in _models(PipelineConfig):
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_resolved_defaults_live_under_the_state_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config().resolved()
    assert cfg.storage.root == str(tmp_path / "artifacts")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config().resolved().tracking.uri == "http://127.0.0.1:5000"
    assert load_config(None, ["tracking.uri=sqlite:///x.db"]).resolved().tracking.uri == "sqlite:///x.db"


def test_bad_config_fails_before_any_compute(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))
    code = main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", "align.beta=-1"])
    assert code == 2
    assert "align.beta: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "prefect" / "posttrain-server.json").exists(), \
        "nothing was started or created"


REAL_MODEL_RECIPES = ["smollm2-135m.yaml", "qwen2.5-0.5b-lora.yaml"]


@pytest.mark.parametrize("name", REAL_MODEL_RECIPES)
def test_real_model_recipes_cite_their_sources_and_plan_offline(name, tmp_path, monkeypatch, capsys):
    import json

    from huggingface_hub import constants

    from flows.cli import main

    text = (ROOT / "configs" / name).read_text()
    assert "alignment-handbook" in text and "Expected on one" in text, "cite the recipe; state GPU memory and time"
    cfg = load_config(ROOT / "configs" / name)
    assert any(inst.kind == "dpo" for inst in cfg.stages.values())
    assert all(inst.training.precision == "bf16" for inst in cfg.stages.values() if hasattr(inst, "training"))
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert main(["plan", "--config", str(ROOT / "configs" / name), "--json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == list(cfg.stages)
    assert all(s["action"] == "run" for s in plan["stages"])
    model = cfg.stages["sft"].inputs["base"]
    assert any(line.startswith(f"model {model} (read by sft, evaluate)") for line in plan["downloads"])
    assert any("data set HuggingFaceH4/ultrachat_200k (split train_sft)" in line for line in plan["downloads"])
    assert "to download from the Hugging Face Hub" in capsys.readouterr().out


def test_stage_defaults_are_for_real_models_and_the_demo_states_its_own():
    from tasks.blocks.align import DPOStageConfig
    from tasks.kinds.evaluate import EvaluateConfig
    from tasks.kinds.reward import RewardStageConfig
    from tasks.kinds.rlhf import RLHFStageConfig
    from tasks.kinds.sft import SFTStageConfig

    for config, most in ((SFTStageConfig, 1e-4), (RewardStageConfig, 1e-4), (DPOStageConfig, 1e-5),
                         (RLHFStageConfig, 1e-5)):
        training = config().training
        assert training.learning_rate <= most and training.max_length >= 1024, config.__name__
        assert config.model_validate({"training": {"epochs": 2}}).training.learning_rate == training.learning_rate, \
            "setting one training field keeps the kind's other defaults"
    assert DPOStageConfig().loss_type == ["sigmoid"] and EvaluateConfig().max_new_tokens >= 256
    demo = load_config()
    assert demo.stages["sft"].training.learning_rate == 2e-3 and demo.stages["sft"].training.max_length == 128
    assert demo.stages["align"].training.learning_rate == 5e-4 and demo.stages["align"].loss_type == ["sigmoid", "sft"]
