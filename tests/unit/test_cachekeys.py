from tasks import cachekeys
from tasks.cachekeys import stage_cache_key

CFG = {"beta": 0.1, "training": {"learning_rate": 5e-4}}
INPUTS = {"data": "a" * 64, "sft": "b" * 64}


def test_key_is_stable_and_independent_of_input_order():
    assert stage_cache_key("align", CFG, INPUTS, 0) == stage_cache_key("align", CFG, dict(reversed(INPUTS.items())), 0)


def test_key_changes_with_each_thing_it_covers(monkeypatch):
    base = stage_cache_key("align", CFG, INPUTS, 0)
    assert stage_cache_key("align", {**CFG, "beta": 0.2}, INPUTS, 0) != base
    assert stage_cache_key("align", CFG, {**INPUTS, "data": "c" * 64}, 0) != base
    assert stage_cache_key("align", CFG, INPUTS, 1) != base
    assert stage_cache_key("sft", CFG, INPUTS, 0) != base
    real = cachekeys.library_versions()
    monkeypatch.setattr(cachekeys, "library_versions", lambda: {**real, "trl": "0.0"})
    assert stage_cache_key("align", CFG, INPUTS, 0) != base


def test_key_follows_the_stage_source(monkeypatch):
    base = stage_cache_key("align", CFG, INPUTS, 0)
    monkeypatch.setattr(cachekeys, "code_digest", lambda stage: "edited")
    assert stage_cache_key("align", CFG, INPUTS, 0) != base


def test_versions_cover_the_ml_libraries():
    versions = cachekeys.library_versions()
    for name in ("torch", "transformers", "trl", "peft", "datasets"):
        assert versions[name] != "absent"


def test_every_stage_has_code_to_hash():
    for stage in cachekeys.STAGE_CODE:
        assert len(cachekeys.code_digest(stage)) == 64
