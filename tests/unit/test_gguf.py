"""GGUF files as model inputs (converted once into the store, keyed by the file's digest) and as an export.

The GGUF files here are written by the export from a tiny Llama the test builds; the real SmolLM2 file is read
in tests/realmodel/."""

import json

import pytest
import torch

from tasks.machinery import gguf
from tasks.machinery.modeling import is_model_reference, resolve_model
from tasks.machinery.context import materialize_input
from tasks.stage import input_tags
from tasks.machinery.store import ArtifactStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with grouped-query attention (the q/k permutation matters there) and a ChatML-like
    byte-level BPE tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.machinery.modeling import build_tokenizer

    tokenizer = build_tokenizer([f"what is {a} plus {b}? {a + b}" for a in range(30) for b in range(30)], 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _logits(folder, text="what is 3 plus 4?"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return ids, AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_an_exported_gguf_reads_back_as_the_same_model(tiny, tmp_path, outtype, tolerance):
    written = gguf.export(tiny, tmp_path / "tiny.gguf", outtype)
    assert written["architecture"] == "llama" and not (tmp_path / "tiny.gguf.partial").exists()
    info = gguf.describe(tmp_path / "tiny.gguf")
    assert info["quantization"] == outtype.upper() and info["architecture"] == "llama"

    record = gguf.convert_to_folder(tmp_path / "tiny.gguf", tmp_path / "back", "tiny.gguf", "digest")
    assert record["quantization"] == outtype.upper()
    assert json.loads((tmp_path / "back" / gguf.GGUF_RECORD).read_text())["source"] == "tiny.gguf"
    assert not (tmp_path / "back" / "config.json").read_text().count("quantization_config")
    ids, expected = _logits(tiny)
    ids_back, got = _logits(tmp_path / "back")
    assert torch.equal(ids, ids_back), "the tokenizer and chat template survive the round trip"
    assert (got - expected).abs().max().item() <= tolerance


def test_a_gguf_input_is_converted_once_into_the_store_keyed_by_the_files_digest(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    file = tmp_path / "models" / "tiny.q8_0.gguf"
    gguf.export(tiny, file, "q8_0")
    assert is_model_reference("tiny.q8_0.gguf") and is_model_reference(str(file))
    raw = resolve_model(str(file))
    assert raw["gguf"] and raw["kind"] == "model" and raw["uri"] == str(file.resolve())
    from tasks.machinery.fingerprints import file_digest

    assert raw["digest"] == file_digest(file)
    assert resolve_model(str(file), digest=False)["digest"] == ""  # pre-flight only checks it is there

    store = ArtifactStore(str(tmp_path / "store"))
    folder = materialize_input(store, raw)
    assert folder.is_relative_to(tmp_path / "store" / "gguf") and (folder / "model.safetensors").is_file()
    assert store.lookup("gguf", f"gguf-{raw['digest'][:40]}") is not None
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize_input(store, raw) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    tags = gguf.input_tags("base", folder)
    assert tags["posttrain.input.base.gguf.quantization"] == "Q8_0"
    assert tags["posttrain.input.base.gguf.source"] == str(file.resolve())
    assert input_tags({"base": raw})["posttrain.input.base"].startswith(str(file.resolve()) + "@")

    gguf.export(tiny, file, "f16")  # another file at the same path: another digest, another conversion
    other = resolve_model(str(file))
    assert other["digest"] != raw["digest"] and materialize_input(store, other) != folder


def test_gguf_references_on_the_hub_and_in_object_stores(s3_env, tiny, tmp_path):
    repo, name, revision = gguf.split_hub_file("org/models/q4/model.Q4_1.gguf@v1")
    assert (repo, name, revision) == ("org/models", "q4/model.Q4_1.gguf", "v1")
    assert gguf.split_hub_file("/abs/model.gguf") is None and gguf.split_hub_file("org/model.gguf") is None
    pinned = resolve_model("org/models/q4/model.Q4_1.gguf@v1")
    assert pinned["revision"] == "v1" and pinned["digest"] != resolve_model("org/models/q4/model.Q4_1.gguf@v2")["digest"]

    import fsspec

    from tests.servers import s3_client

    s3_client(s3_env["aws"]).create_bucket(Bucket="gguf-models")
    gguf.export(tiny, tmp_path / "tiny.gguf", "f16")
    fsspec.filesystem("s3").put(str(tmp_path / "tiny.gguf"), "gguf-models/tiny.gguf")
    raw = resolve_model("s3://gguf-models/tiny.gguf")
    assert raw["gguf"] and raw["digest"]
    folder = materialize_input(ArtifactStore(str(tmp_path / "store")), raw)
    assert gguf.read_record(folder)["source"] == "s3://gguf-models/tiny.gguf"
    with pytest.raises(Exception, match="gguf-models/missing.gguf"):
        resolve_model("s3://gguf-models/missing.gguf")


def test_a_damaged_or_missing_gguf_file_is_refused_by_name_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="nope.gguf: no such GGUF file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 10)
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        materialize_input(store, resolve_model(str(bad)))
    assert not list((tmp_path / "store").rglob("config.json")), "no half-converted model in the store"


def test_export_refuses_what_it_cannot_write(tiny, tmp_path):
    with pytest.raises(ValueError, match="choose one of f32, f16, q8_0"):
        gguf.export(tiny, tmp_path / "x.gguf", "q4_k")
    config = json.loads((tiny / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        gguf.export(other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_the_export_command_writes_a_stage_output_as_gguf(tiny, tmp_path, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    assert main(["export", str(tiny), "--gguf", str(tmp_path / "out.gguf"), "--type", "f32"]) == 0
    assert gguf.describe(tmp_path / "out.gguf")["quantization"] == "F32"
    # a GGUF file in, another out: converted the way a stage reads it, then written again
    assert main(["export", str(tmp_path / "out.gguf"), "--gguf", str(tmp_path / "again.gguf"), "--type", "f16"]) == 0
    assert gguf.describe(tmp_path / "again.gguf")["quantization"] == "F16"
    assert main(["export", str(tmp_path / "no-model"), "--gguf", str(tmp_path / "x.gguf")]) == 2
