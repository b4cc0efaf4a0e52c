"""Loading and saving models and tokenizers: Hub ids, local folders and artifact-store outputs alike."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on texts, with a chat template, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(source: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(source: str | Path, trust_remote_code: bool = False, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(source), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=getattr(torch, dtype)
    )


def load_reward_model(source: str | Path, trust_remote_code: bool = False, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True,
        dtype=getattr(torch, dtype),
    )


def save_model(model, tokenizer, out: Path) -> None:
    """save_pretrained both, in safetensors; a PEFT model is merged first so later stages load plain weights.
    Under multi-process training only rank 0 writes."""
    from tasks.launch import is_main_process

    if not is_main_process():
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_base_model(base: str) -> dict:
    """A reference to a base model named by a recipe: a local folder, an fsspec URI or a Hub id.

    The digest covers the weights for folders and URIs (ETags for object stores). A Hub id is keyed by
    its name only: download a snapshot to a folder for a cache key that follows the weights.
    """
    import fsspec

    from tasks.store import content_digest, digest_json, directory_manifest

    if "://" in base:
        fs, path = fsspec.core.url_to_fs(base)
        listing = fs.find(path, detail=True)
        if not listing:
            raise FileNotFoundError(f"model.base: nothing found at {base}")
        files = {name: {"sha256": str(meta.get("ETag") or meta.get("etag") or meta.get("mtime")),
                        "size": meta.get("size")} for name, meta in sorted(listing.items())}
        return {"uri": base, "digest": content_digest(files), "kind": "model"}
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"model.base: {local} has no config.json; is it a save_pretrained folder?")
        return {"uri": str(local.resolve()), "digest": content_digest(directory_manifest(local)), "kind": "model"}
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise FileNotFoundError(f"model.base: {base} does not exist (and is not a Hub id like org/name)")
    return {"uri": base, "digest": digest_json({"hub": base}), "kind": "model"}


def materialize_external(ref) -> Path | str:
    """A base model outside the artifact store as something from_pretrained accepts."""
    from tasks.store import state_home

    if "://" in ref.uri:
        import fsspec

        local = state_home() / "cache" / "models" / ref.digest
        if not (local / "config.json").exists():
            fs, path = fsspec.core.url_to_fs(ref.uri)
            tmp = local.with_name(local.name + ".partial")
            fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
            tmp.rename(local)
        return local
    if Path(ref.uri).exists():
        return Path(ref.uri)
    return ref.uri
