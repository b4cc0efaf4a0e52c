"""Where evaluation puts models, and what it frees between them (the decisions; the GPU itself is not here)."""

import torch

from tasks.machinery import modeling


def test_auto_dtype_is_bf16_on_a_gpu_that_supports_it_and_fp32_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.accelerator() in ("cpu", "mps") and modeling.inference_dtype("auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert modeling.accelerator() == "cuda" and modeling.inference_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert modeling.inference_dtype("auto") == torch.float32
    assert modeling.inference_dtype("float16") == torch.float16


def test_free_releases_the_weights_even_while_the_caller_holds_the_model():
    model = torch.nn.Linear(64, 64)
    modeling.free(model)
    assert model.weight.device.type == "meta" and model.bias.device.type == "meta"  # meta tensors hold no data


def test_model_references_are_told_from_stage_names(tmp_path):
    for ref in ("org/name", "org/name@v2", "s3://bucket/m", "models:/m@prod", "./m", str(tmp_path)):
        assert modeling.is_model_reference(ref), ref
    for name in ("sft", "dpo_beta01", "base"):
        assert not modeling.is_model_reference(name), name
    assert modeling.resolve_model("org/name@v2")["revision"] == "v2"
    assert modeling.resolve_model("org/name@v2")["digest"] != modeling.resolve_model("org/name@v3")["digest"]


def test_a_model_named_twice_in_a_run_is_resolved_and_hashed_once(tmp_path, monkeypatch):
    from flows.config import load_config
    from flows.graph import build_nodes
    from flows.pipeline import node_inputs

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = load_config("configs/dpo-from-model.yaml", [f"dpo.inputs.policy={folder}", f"evaluate.inputs.base={folder}"])
    calls = []
    real = modeling.resolve_model
    monkeypatch.setattr(modeling, "resolve_model", lambda ref, uri=None, digest=True: calls.append(ref) or real(ref))
    models, outputs = {}, {"data": {"uri": "d", "digest": "d"}, "dpo": {"uri": "p", "digest": "p"}}
    by_name = {n.name: n for n in build_nodes(cfg)}
    first = node_inputs(cfg, by_name["dpo"], outputs, models)
    second = node_inputs(cfg, by_name["evaluate"], outputs, models)
    assert calls == [str(folder)] and first["policy"] == second["base"]
    assert first["policy"]["digest"], "the run's reference carries the folder's content digest"
    assert real(str(folder), digest=False)["digest"] == "", "pre-flight only checks it is there"


def test_lora_variants_and_modules_to_save_reach_peft():
    from tasks.machinery.training import LoraSettings, peft_config

    assert peft_config(LoraSettings()) is None
    dora = peft_config(LoraSettings(enabled=True, variant="dora"))
    assert dora.use_dora and not dora.use_rslora and dora.modules_to_save is None
    rs = peft_config(LoraSettings(enabled=True, variant="rslora", modules_to_save=["embed_tokens"]), "SEQ_CLS")
    assert rs.use_rslora and list(rs.modules_to_save) == ["score", "embed_tokens"] and rs.ensure_weight_tying
    assert peft_config(LoraSettings(enabled=True, variant="pissa")).init_lora_weights == "pissa"
