"""Prompt templates (tasks/blocks/prompts.py), synthetic prompts from topics x audiences x styles x templates, and the
recipe checks of the elicit, synthesize and prompt_search kinds."""

import pytest

from tasks.blocks.prompts import as_messages, wrap
from tasks.kinds.synthesize import SynthesizeConfig, build_prompts, read_entries, resolve_templates

pytestmark = pytest.mark.unit


def test_a_template_wraps_the_last_question_and_puts_its_system_message_first():
    template = as_messages([{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Q: {{question}}"}])
    asked = wrap(template, [{"role": "system", "content": "old"}, {"role": "user", "content": "1+1?"},
                            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}])
    assert asked == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1?"},
                     {"role": "assistant", "content": "2"}, {"role": "user", "content": "Q: 2+2?"}]
    assert wrap(as_messages("{{question}} Answer:"), [{"role": "user", "content": "a {{b}} $1"}]) == [
        {"role": "user", "content": "a {{b}} $1 Answer:"}], "the question is inserted literally"
    with pytest.raises(ValueError, match="exactly one user message"):
        as_messages([{"role": "system", "content": "{{question}}"}])
    with pytest.raises(ValueError, match="exactly one user message"):
        as_messages("no placeholder")


def test_synthetic_prompts_are_the_distinct_products_with_where_they_came_from(tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("1 and 2\n\n3 and 4\n")
    assert read_entries(str(topics), "topics") == ["1 and 2", "3 and 4"]
    with pytest.raises(ValueError, match="no such file"):
        read_entries(str(tmp_path / "missing.txt"), "topics")
    cfg = SynthesizeConfig(topics=str(topics), audiences=["", "for a child"], styles=["Be brief."],
                           templates=["Add {{topic}}. {{style}}", "Add {{topic}} {{audience}}. {{style}}"])
    templates = resolve_templates(cfg.templates, None)
    prompts = build_prompts(cfg, templates, seed=0)
    texts = [p["text"] for p in prompts]
    assert len(texts) == len(set(texts)) == 6, "the first template ignores the audience: its copies are one prompt"
    assert {"Add 1 and 2. Be brief.", "Add 3 and 4 for a child. Be brief."} <= set(texts)
    assert all(p["template_version"].startswith("inline:") for p in prompts)
    sampled = build_prompts(cfg.model_copy(update={"max_prompts": 3}), templates, seed=0)
    assert len(sampled) == 3 and sampled == build_prompts(cfg.model_copy(update={"max_prompts": 3}), templates, 0)
    with pytest.raises(ValueError, match="unknown variable"):
        resolve_templates(["Add {{topics}}."], None)


@pytest.mark.parametrize("stage, message", [
    ({"kind": "synthesize", "topics": ["a"], "templates": ["{{topic}}"]}, "reads the `teacher` input"),
    ({"kind": "synthesize", "topics": ["a"], "templates": ["{{topic}}"], "inputs": {"teacher": "org/model"},
      "scorer": {"backend": "reward_model"}}, "reads the `reward` input"),
    ({"kind": "prompt_search", "inputs": {"data": "data", "policy": "org/model"}}, "needs candidates"),
    ({"kind": "prompt_search", "inputs": {"data": "data", "policy": "org/model"},
      "candidates": [{"name": "a"}, {"name": "a"}]}, "names repeat"),
    ({"kind": "elicit", "inputs": {"data": "data", "policy": "org/model"}, "rater": {"kind": "judge"}},
     "needs `judge` settings"),
    ({"kind": "elicit", "inputs": {"data": "data", "policy": "org/model"}, "rule": "greedy"}, "rule"),
])
def test_the_new_kinds_refuse_what_they_cannot_run(stage, message):
    from flows.config import ConfigError, validate_recipe

    data = {"kind": "prepare_data", "sft": {"source": "a.jsonl"}, "preference": {"source": "b.jsonl"},
            "eval": {"source": "c.jsonl"}}
    with pytest.raises(ConfigError, match=message):
        validate_recipe({"name": "t", "stages": {"data": data, "stage": stage}})
