"""Where evaluation puts models, and what it frees between them (the decisions; the GPU itself is not here)."""

import torch

from tasks import modeling


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
