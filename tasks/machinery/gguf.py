"""GGUF files in and out: a `.gguf` model input becomes a plain Hugging Face folder; a trained model can be
exported as GGUF for llama.cpp, Ollama and LM Studio.

Reading uses transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`, which dequantizes every
tensor); the loaded model is then saved without transformers' GGUF quantizer marker, so every stage reads it
like any other folder. A record of where it came from (`GGUF_RECORD`) is saved beside the weights.

Writing uses the `gguf` package's writer (the library llama.cpp's own converter is built on). There is no
exporter in transformers or the gguf package itself, so the mapping is here: llama.cpp's tensor names
(gguf.TensorNameMap), its rotary permutation of the query and key projections, and a byte-level BPE
tokenizer as GGUF's `gpt2` model. Llama-architecture models (Llama 2/3, SmolLM, Mistral without sliding
windows) and Qwen2 are supported; other architectures are refused by name.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

logger = logging.getLogger("posttrain")
GGUF_RECORD = "posttrain_gguf.json"  # written into the converted folder: source, digest, quantization
EXPORT_TYPES = ("f32", "f16", "q8_0")


def is_gguf_reference(reference: str) -> bool:
    return reference.split("?")[0].split("@")[0].lower().endswith(".gguf")


def split_hub_file(reference: str) -> tuple[str, str, str | None] | None:
    """(repo, filename, revision) for `org/name/path/file.gguf[@revision]`, a file inside a Hub model repo;
    None when the reference is not of that form."""
    body, _, revision = reference.partition("@")
    if body.startswith(("/", ".", "~")) or "://" in body or Path(body).expanduser().exists():
        return None
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def describe(path: Path) -> dict:
    """What a GGUF file holds, read from its header (memory-mapped; no tensor is dequantized)."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name, default=None):
        found = reader.fields.get(name)
        return found.contents() if found is not None else default

    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type is not None else None
    except ValueError:
        quantization = None
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    if quantization is None:  # no file type in the header: the most common tensor type says it
        quantization = tensor_types.most_common(1)[0][0] if tensor_types else "unknown"
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "quantization": quantization, "tensor_types": dict(tensor_types), "tensors": len(reader.tensors)}


def convert_to_folder(gguf_file: Path, out: Path, source: str, digest: str,
                      trust_remote_code: bool = False) -> dict:
    """Dequantize a GGUF file (fp32) into a save_pretrained folder at `out`; returns the record it writes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    try:
        info = describe(gguf_file)
    except Exception as e:  # the gguf reader raises ValueError/struct errors on a damaged or foreign file
        raise ValueError(f"model {source}: not a readable GGUF file ({e})") from None
    logger.info("reading GGUF %s (%s, %s, %d tensors); dequantizing to fp32", source, info["architecture"],
                info["quantization"], info["tensors"])
    folder, name = str(gguf_file.parent), gguf_file.name
    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    from tasks.machinery.logs import quiet_model_loading

    quiet_model_loading()
    # transformers' GGUF reader draws its own tqdm bar per file, outside its progress-bar switch; the line above
    # says what runs
    bar, gguf_loading.tqdm = gguf_loading.tqdm, functools.partial(gguf_loading.tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ValueError(f"model {source}: transformers cannot load this GGUF file "
                         f"(architecture {info['architecture']!r}, {info['quantization']}): {e}") from None
    finally:
        gguf_loading.tqdm = bar
    # transformers refuses to save a model it marks as GGUF-quantized; the weights are plain tensors now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)  # "Writing model shards" bar: off with quiet_model_loading
    tokenizer.save_pretrained(out)
    record = {"source": source, "digest": digest, "file": name, **info}
    (out / GGUF_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    return record


def resolve(reference: str, digest: bool = True) -> dict:
    """A `.gguf` model reference as a stage input {uri, digest, kind: model, gguf: true[, revision]}, keyed by the
    file: a local file's SHA-256 (remembered by path, size and mtime), an object store's ETag, or a Hub file's
    resolved commit. `digest=False` only checks that it is there (pre-flight)."""
    from tasks.machinery.fingerprints import _object_digest, file_digest, resolve_hub_revision
    from tasks.machinery.store import digest_json

    if "://" in reference and not reference.startswith("file://"):
        found = _object_digest(reference)  # raises when the object is missing
        return {"uri": reference, "digest": found, "kind": "model", "gguf": True}
    hub = split_hub_file(reference)
    if hub is not None:
        repo, filename, revision = hub
        commit = resolve_hub_revision(repo, revision, "model") or revision
        found = digest_json({"hub": repo, "file": filename, "revision": commit})
        return {"uri": f"{repo}/{filename}", "digest": found, "kind": "model", "gguf": True,
                **({"revision": commit} if commit else {})}
    path = Path(reference.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model {reference}: no such GGUF file")
    return {"uri": str(path.resolve()), "digest": file_digest(path) if digest else "", "kind": "model", "gguf": True}


def _fetch(raw: dict, scratch: Path) -> Path:
    """The GGUF file of a reference as a local path (downloaded into `scratch` from an object store or the Hub)."""
    uri = raw["uri"]
    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        target = scratch / uri.rstrip("/").rsplit("/", 1)[-1]
        with fsspec.open(uri, "rb") as src, open(target, "wb") as dst:
            import shutil

            shutil.copyfileobj(src, dst, 16 * 2**20)
        return target
    local = Path(uri.removeprefix("file://"))
    if local.is_file():
        return local
    repo, filename, _ = split_hub_file(uri)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo, filename=filename, revision=raw.get("revision")))


def materialize(store, raw: dict) -> Path:
    """The model a GGUF reference names as a plain Hugging Face folder: converted once into the artifact store
    (area `gguf`, keyed by the file's digest) and read from there by every stage and run after."""
    import tempfile

    key = f"gguf-{raw['digest'][:40]}"
    ref = store.lookup("gguf", key)
    if ref is None:
        with tempfile.TemporaryDirectory(prefix="posttrain-gguf-") as scratch:
            local = _fetch(raw, Path(scratch))
            with store.write("gguf", key) as pending:
                record = convert_to_folder(local, pending.path, raw["uri"], raw["digest"])
                pending.metadata = {"gguf": record, "kind": "gguf"}
            ref = pending.ref
    return store.materialize(ref)


def input_tags(slot: str, folder: Path | str) -> dict[str, str]:
    """MLflow tags of a stage input converted from GGUF: the file it came from and its quantization."""
    record = read_record(folder) if Path(str(folder)).is_dir() else None
    if record is None:
        return {}
    return {f"posttrain.input.{slot}.gguf.source": record["source"],
            f"posttrain.input.{slot}.gguf.quantization": record["quantization"],
            f"posttrain.input.{slot}.gguf.architecture": str(record.get("architecture")),
            f"posttrain.input.{slot}.gguf.folder": str(folder)}


def read_record(folder: Path | str) -> dict | None:
    path = Path(folder) / GGUF_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _permute(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's layout of the rotary query/key rows (the inverse of transformers' reverse permutation)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def export(folder: Path | str, out_file: Path | str, outtype: str = "f16") -> dict:
    """Write the model in `folder` (a save_pretrained folder: a stage output or a merged adapter) as one GGUF
    file. `outtype`: f32, f16 (the default: half the size, no visible loss) or q8_0. Written to a temporary
    name and renamed, so a half-written file never appears under `out_file`."""
    import os

    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if outtype not in EXPORT_TYPES:
        raise ValueError(f"GGUF export type {outtype!r}: choose one of {', '.join(EXPORT_TYPES)}")
    folder, out_file = Path(folder), Path(out_file)
    config = AutoConfig.from_pretrained(folder)
    architecture = next((_ARCHITECTURES[a] for a in (config.architectures or []) if a in _ARCHITECTURES), None)
    if architecture is None:
        raise ValueError(f"{folder}: GGUF export supports {', '.join(sorted(_ARCHITECTURES))}; this model is "
                         f"{', '.join(config.architectures or ['unknown'])} (use llama.cpp's convert_hf_to_gguf.py)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{folder}: rope scaling {rope['rope_type']!r} is not exported here "
                         "(use llama.cpp's convert_hf_to_gguf.py)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else None
    model_json = json.loads(vocab)["model"] if vocab else {}
    if model_json.get("type") != "BPE" or "merges" not in model_json:
        raise ValueError(f"{folder}: GGUF export needs a byte-level BPE tokenizer (tokenizer.json); "
                         f"this one is {model_json.get('type', type(tokenizer).__name__)}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    arch = gguf.MODEL_ARCH.LLAMA if architecture == "llama" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    tmp = out_file.with_name(out_file.name + ".partial")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), architecture)
    writer.add_name(folder.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    # the tokenizer as GGUF's byte-level BPE ("gpt2"): every id up to the model's vocabulary size
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
        else:  # the embedding is padded beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reads the tied output from token_embd
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        mapped = names.get_name(base)
        if mapped is None:
            raise ValueError(f"{folder}: no GGUF name for tensor {hf_name}")
        data = tensor.numpy()
        if base.endswith("self_attn.q_proj") and suffix == "weight" and architecture == "llama":
            data = _permute(data, heads, heads)
        elif base.endswith("self_attn.k_proj") and suffix == "weight" and architecture == "llama":
            data = _permute(data, heads, kv_heads)
        if data.ndim == 1 or outtype == "f32":  # norms and biases stay fp32, as llama.cpp writes them
            writer.add_tensor(f"{mapped}.{suffix}", data.astype(np.float32))
        elif outtype == "f16":
            writer.add_tensor(f"{mapped}.{suffix}", data.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"{mapped}.{suffix}", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out_file)
    size_mb = out_file.stat().st_size / 2**20
    logger.info("wrote %s (%s, %.1f MB)", out_file, outtype, size_mb)
    return {"file": str(out_file), "type": outtype, "size_mb": size_mb, "architecture": architecture}
