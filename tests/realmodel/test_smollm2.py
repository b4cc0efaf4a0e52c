"""A real pretrained model through the stages: SmolLM2-135M-Instruct from its GGUF file, on 2 CPU cores.

POSTTRAIN_TEST_SEED picks the recipe's seed (0 by default; docs/tests.md lists the figures measured on seeds 0-2)."""

import itertools
import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("POSTTRAIN_TEST_SEED", "0"))


def _ask(folder, question: str, max_new_tokens: int = 40) -> tuple[str, int]:
    """The model's greedy reply and how many tokens it generated (it stops at the end of its turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.machinery.chat import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def test_the_real_gguf_file_becomes_a_folder_that_loads_and_chats(smollm2_gguf, smollm2_folder):
    from tasks.machinery import gguf

    record = gguf.read_record(smollm2_folder)
    assert record["quantization"] == "Q4_1" and record["architecture"] == "llama"
    assert record["source"] == str(smollm2_gguf.resolve())
    assert (smollm2_folder / "model.safetensors").stat().st_size > 500e6  # 134.5 M parameters in fp32
    reply, generated = _ask(smollm2_folder, "What is the capital of France?")
    assert "Paris" in reply
    assert generated < 40, "generation stops at the template's end of turn (<|im_end|>)"


def test_sft_trains_only_the_assistant_turns_of_a_multi_turn_row_on_the_real_tokenizer(smollm2_folder, tmp_path):
    from tasks.kinds.prepare_data import DataConfig, prepare_data
    from tasks.kinds.sft import SFTStageConfig, sft_trainer

    turns = [{"role": "system", "content": "You answer in one short sentence."},
             {"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "A strawberry."},
             {"role": "user", "content": "And a yellow one?"}, {"role": "assistant", "content": "A banana."}]
    rows = [{"messages": turns}, {"messages": turns[1:3]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    data.mkdir()
    prepare_data(DataConfig.model_validate({"sft": {"source": str(tmp_path / "chat.jsonl")}, "eval_fraction": 0.0,
                                            "near_dedup": {"enabled": False}}), data, seed=0)
    trainer = sft_trainer(SFTStageConfig(), data, smollm2_folder, tmp_path / "scratch", seed=0)
    assert trainer.masks_by_rendering, "SmolLM2's template has no generation markers"
    tokenizer = trainer.processing_class
    trained = []
    for example in trainer.train_dataset:
        pairs = zip(example["input_ids"], example["labels"])
        trained.append([tokenizer.decode([i for i, _ in run])
                        for on, run in itertools.groupby(pairs, key=lambda p: p[1] != -100) if on])
    assert sorted(trained) == sorted([["A strawberry.<|im_end|>", "A banana.<|im_end|>"], ["A strawberry.<|im_end|>"]])


def test_the_shipped_recipe_post_trains_the_real_model(smollm2_gguf, smollm2_folder, real_home):
    """configs/smollm2-word-problems.yaml, fewer steps: SFT teaches the answer format, DPO keeps it, the
    policy still answers general questions as the base did."""
    from flows.cli import main
    from tasks.machinery import tracking

    summary_path = real_home / "summary.json"
    # the recipe at test size, 4 rows a step (the margins on seeds 0-2 are in docs/tests.md)
    overrides = [f"seed={SEED}", f"sft.inputs.base={smollm2_gguf}", f"evaluate.inputs.base={smollm2_gguf}",
                 "sft.training.max_steps=20", "reward.training.max_steps=6", "dpo.training.max_steps=10",
                 *(f"{stage}.training.batch_size=4" for stage in ("sft", "reward", "dpo")),
                 "dpo.training.logging_steps=2", "evaluate.max_prompts=30", "evaluate.bootstrap_samples=200",
                 "evaluate.forgetting.max_prompts=8"]
    args = ["run", "--config", str(ROOT / "configs" / "smollm2-word-problems.yaml"), "--summary-json",
            str(summary_path)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    summary = json.loads(summary_path.read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    m = stages["evaluate"]["metrics"]
    fmt = {name: m[f"{name}/verifier/answer_format"] for name in ("base", "sft", "policy")}
    correct = {name: m[f"{name}/verifier/answer_correct"] for name in ("base", "sft", "policy")}
    print("answer_format", fmt, "answer_correct", correct,
          {k: round(v, 3) for k, v in m.items() if "forgetting" in k or "kl_to" in k or "win_rate" in k})

    assert fmt["base"] <= 0.2, "the instruction-tuned base answers in prose, not in the format"
    assert fmt["sft"] >= fmt["base"] + 0.5 and fmt["policy"] >= fmt["base"] + 0.5
    assert correct["sft"] > correct["base"] + 0.1 and correct["policy"] > correct["base"] + 0.1
    assert m["sft/verifier/answer_format_ci_low"] > m["base/verifier/answer_format_ci_high"]
    assert not any("task_accuracy" in k for k in m), "the verifiers score this task, not the demo's number match"
    assert -0.5 < m["policy/kl_to_sft"] < 5  # a Monte-Carlo estimate: a little below 0 when DPO barely moved
    # forgetting: the base's own replies to general questions stay likely (per-token NLL up by less than a nat)
    assert m["base/forgetting_nll"] < 2.0
    assert m["sft/forgetting_nll_increase"] < 1.0 and m["policy/forgetting_nll_increase"] < 1.0
    assert abs(m["sft/forgetting_drift"]) < 2.0 and abs(m["policy/forgetting_drift"]) < 2.0
    assert stages["dpo"]["metrics"]["train/final_loss"] < stages["dpo"]["metrics"]["train/first_loss"]

    sft_run = tracking.client(summary["tracking_uri"]).get_run(stages["sft"]["mlflow_run_id"])
    assert sft_run.data.tags["posttrain.input.base.gguf.quantization"] == "Q4_1"
    assert sft_run.data.tags["posttrain.input.base.gguf.folder"] == str(smollm2_folder)

    from tasks.machinery.store import ArtifactStore, Ref

    policy = ArtifactStore(str(real_home / "artifacts")).materialize(
        Ref(uri=stages["dpo"]["output_uri"], digest=stages["dpo"]["output_digest"]))
    reply, generated = _ask(policy, "What is the capital of France?")
    print("the DPO policy on France:", repr(reply))
    assert reply and generated < 40, f"the policy still chats and stops: {reply!r}"
    reply, _ = _ask(policy, "Tom has 12 marbles and gets 7 more. How many marbles does Tom have now?")
    assert reply.splitlines()[-1].startswith("Answer: "), reply
