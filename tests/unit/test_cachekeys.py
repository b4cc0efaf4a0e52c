import shutil

from tasks.machinery import cachekeys
from tasks.machinery.cachekeys import code_files, code_modules, stage_cache_key
from tasks.kinds import kinds

CFG = {"beta": 0.1, "training": {"learning_rate": 5e-4}}
INPUTS = {"data": "a" * 64, "policy": "b" * 64}


def test_key_is_stable_and_independent_of_input_order():
    assert stage_cache_key("dpo", CFG, INPUTS, 0) == stage_cache_key("dpo", CFG, dict(reversed(INPUTS.items())), 0)


def test_key_changes_with_each_thing_it_covers(monkeypatch):
    base = stage_cache_key("dpo", CFG, INPUTS, 0)
    assert stage_cache_key("dpo", {**CFG, "beta": 0.2}, INPUTS, 0) != base
    assert stage_cache_key("dpo", CFG, {**INPUTS, "data": "c" * 64}, 0) != base
    assert stage_cache_key("dpo", CFG, INPUTS, 1) != base
    assert stage_cache_key("dpo", CFG, INPUTS, 0, round_=2) != base
    assert stage_cache_key("rlhf", CFG, INPUTS, 0) != base
    real = cachekeys.library_versions()
    monkeypatch.setattr(cachekeys, "library_versions", lambda: {**real, "trl": "0.0"})
    assert stage_cache_key("dpo", CFG, INPUTS, 0) != base


def test_key_follows_the_stage_source(monkeypatch):
    base = stage_cache_key("dpo", CFG, INPUTS, 0)
    monkeypatch.setattr(cachekeys, "code_digest", lambda stage: "edited")
    assert stage_cache_key("dpo", CFG, INPUTS, 0) != base


def test_stage_code_is_derived_from_its_imports():
    # every training stage reads its data through tasks.machinery.splits and trains through tasks.machinery.training
    for kind in ("sft", "reward", "dpo", "rlhf", "pretrain"):
        modules = code_modules(kinds()[kind].module)
        assert {"tasks.machinery.splits", "tasks.machinery.training", "tasks.machinery.modeling", "tasks.machinery.launch"} <= set(modules), kind
        assert "tasks.kinds.prepare_data" not in modules, f"{kind} imports the prepare_data kind"
        assert "tasks.machinery.tracking" not in modules and "tasks.machinery.store" not in modules  # bookkeeping, not results
    assert "tasks.blocks.align" in code_modules("tasks.kinds.dpo") and "tasks.blocks.generation" in code_modules("tasks.kinds.evaluate")


def test_editing_a_helper_a_stage_imports_changes_its_code_digest(tmp_path):
    shutil.copytree(cachekeys.PROJECT_ROOT / "tasks", tmp_path / "tasks")
    before = code_files("tasks.kinds.sft", tmp_path)
    helper = tmp_path / "tasks" / "machinery" / "splits.py"  # imported by sft only inside functions
    helper.write_text(helper.read_text() + "\n# an edit\n")
    after = code_files("tasks.kinds.sft", tmp_path)
    assert after["tasks/machinery/splits.py"] != before["tasks/machinery/splits.py"] and after["tasks/kinds/sft.py"] == before["tasks/kinds/sft.py"]
    untouched = tmp_path / "tasks" / "machinery" / "tracking.py"
    untouched.write_text(untouched.read_text() + "\n# an edit\n")
    assert code_files("tasks.kinds.sft", tmp_path) == after


def test_versions_cover_the_ml_libraries():
    versions = cachekeys.library_versions()
    for name in ("torch", "transformers", "trl", "peft", "datasets"):
        assert versions[name] != "absent"


def test_every_kind_has_code_to_hash():
    for kind in kinds():
        assert len(cachekeys.code_digest(kind)) == 64


def test_editing_the_demos_data_generator_leaves_a_real_model_recipes_dpo_key_alone(tmp_path):
    """A kind's key covers the code it runs: DPO reads prepared data through tasks/machinery/splits.py, not through the
    prepare_data kind, so the demo's synthetic data generator (and data preparation) are not in its key."""
    from flows.config import load_config
    from flows.graph import build_nodes
    from tasks.kinds import get

    recipe = load_config(cachekeys.PROJECT_ROOT / "configs" / "smollm2-word-problems.yaml")
    [dpo] = [n for n in build_nodes(recipe) if n.kind.name == "dpo"]
    shutil.copytree(cachekeys.PROJECT_ROOT / "tasks", tmp_path / "tasks")
    before = {kind: code_files(get(kind).module, tmp_path) for kind in ("dpo", "prepare_data")}
    generator = tmp_path / "tasks" / "machinery" / "synthetic.py"
    generator.write_text(generator.read_text() + "\n# a new demo task\n")
    assert code_files(dpo.kind.module, tmp_path) == before["dpo"]
    assert code_files(get("prepare_data").module, tmp_path) != before["prepare_data"], "the data stage does rerun"
    for room in ("data.py", "dedup.py", "shapes.py", "sources.py", "synthetic.py", "sft.py"):
        assert f"tasks/{room}" not in before["dpo"], room
