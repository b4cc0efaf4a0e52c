"""Loading and saving models and tokenizers: Hub ids, local folders and artifact-store outputs alike."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.machinery.logs import quiet_model_loading

logger = logging.getLogger("posttrain")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% elif message['role'] == 'tool' %}<|user|>{{ message['content'] }}<|end|>"
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


def accelerator() -> str:
    """Where inference runs: the first CUDA GPU, Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def inference_dtype(dtype: str = "auto"):
    """'auto': bfloat16 on a GPU that supports it, else float32 (CPU kernels are fastest and exact in fp32)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def _place(model, on_device: bool):
    return model.to(accelerator()) if on_device else model


def load_causal_lm(source: str | Path, trust_remote_code: bool = False, dtype: str = "float32",
                   on_device: bool = False, for_training: bool = False):
    """A causal LM; with on_device, on the accelerator (training leaves placement to the Trainer). A folder holding
    a prompt-tuning adapter (materialize_adapter) loads as its base with the soft prompt; such a model is
    evaluated, not trained further."""
    from transformers import AutoModelForCausalLM

    quiet_model_loading()
    if is_adapter(source):
        import json

        from peft import AutoPeftModelForCausalLM

        mergeable = json.loads((Path(source) / "adapter_config.json").read_text()).get("peft_type") in MERGEABLE
        if for_training and not mergeable:
            raise ValueError(f"{source}: a prompt-tuned model (soft prompt over a frozen base) can be evaluated or "
                             "used as a judge, not trained further; train from its base instead")
        model = AutoPeftModelForCausalLM.from_pretrained(str(source), trust_remote_code=trust_remote_code,
                                                         dtype=inference_dtype(dtype))
        return _place(model.merge_and_unload() if mergeable else model, on_device)
    model = AutoModelForCausalLM.from_pretrained(
        str(source), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=inference_dtype(dtype)
    )
    return _place(model, on_device)


def load_reward_model(source: str | Path, trust_remote_code: bool = False, dtype: str = "float32",
                      on_device: bool = False):
    from transformers import AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    quiet_model_loading()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal LM has no score head: transformers' report of it says nothing new
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(source), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True,
            dtype=inference_dtype(dtype), output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(("score.", "classifier."))]
    if missing:
        logger.warning("reward model from %s: %d weights were not in the checkpoint and start random: %s", source,
                       len(missing), ", ".join(sorted(missing)[:5]))
    elif info.get("missing_keys"):
        logger.info("reward model from %s: a new score head on the language model", source)
    return _place(model, on_device)


def free(model) -> None:
    """Release a model's memory before the next one is loaded (GPU memory is not returned by `del` alone)."""
    import gc

    import torch

    model.to("meta")  # drops the weights' storage even while a caller still holds the object
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


ADAPTER_BASE = "adapter_base.json"  # beside a stored adapter: the model it adapts, as a stage-input reference
# PEFT methods whose weights fold into the base (merge_and_unload); the others (prompt tuning and its kin) add
# inputs, so their adapter stays an adapter and is loaded on top of its base.
MERGEABLE = {"LORA", "LOHA", "LOKR", "ADALORA", "IA3", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA", "BONE", "RANDLORA"}


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def _megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def save_model(model, tokenizer, out: Path, base: dict | str | Path | None = None) -> dict[str, float]:
    """save_pretrained both, in safetensors. A PEFT model is saved as its adapter (a small output) with
    `adapter_base.json` naming the model it adapts (`base`: the stage input's reference, or a folder or Hub id);
    consumers get it merged (materialize_adapter). Returns the sizes: model/adapter_mb beside model/full_mb.
    Under multi-process training only rank 0 writes."""
    import json

    from tasks.machinery.ranks import is_main_process

    if not is_main_process():
        return {}
    out = Path(out)
    if hasattr(model, "peft_config"):
        if base is None:
            raise ValueError("saving an adapter needs the model it adapts (base)")
        adapter = [p for p in model.parameters() if p.requires_grad]
        full = [p for p in model.parameters() if not p.requires_grad]  # the frozen base: the merged model's size
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        ref = base if isinstance(base, dict) else {
            "uri": str(Path(base).resolve()) if Path(str(base)).exists() else str(base), "digest": "", "kind": "model"}
        (out / ADAPTER_BASE).write_text(json.dumps(ref, sort_keys=True))
        adapter_mb = sum(f.stat().st_size for f in out.glob("adapter_model.*")) / 2**20
        return {"model/adapter_mb": adapter_mb, "model/full_mb": _megabytes(full),
                "model/trainable_parameters": float(sum(p.numel() for p in adapter))}
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"model/full_mb": _megabytes(model.parameters())}


def materialize_adapter(folder: Path, digest: str, resolve_base) -> Path:
    """A stored adapter as something a consumer loads like any model: a LoRA-family adapter merged into its base
    (full weights, so the next stage's reference is this stage's policy); a prompt-tuning adapter kept as an
    adapter whose config points at its base's local folder. `resolve_base(ref)` materializes the base (which may
    itself be an adapter). Cached locally by the adapter's digest."""
    import json
    import os
    import tempfile

    from tasks.machinery.store import state_home

    target = state_home() / "cache" / "adapters" / digest
    if (target / "config.json").exists() or (target / "adapter_config.json").exists():
        return target
    base = resolve_base(json.loads((folder / ADAPTER_BASE).read_text()))
    config = json.loads((folder / "adapter_config.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    if config.get("peft_type") in MERGEABLE:
        from peft import PeftModel

        seq_cls = config.get("task_type") == "SEQ_CLS"
        base_model = (load_reward_model if seq_cls else load_causal_lm)(base)
        merged = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
        save_model(merged, load_tokenizer(folder), tmp)
    else:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        (tmp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process merged the same adapter first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


MODEL_REFERENCE_HELP = ("Hub id org/name[@revision], local folder, fsspec URI (s3://...), models:/name@alias, or a "
                        ".gguf file (a path, an s3:// URI, or org/name/file.gguf[@revision] inside a Hub repo)")


def is_model_reference(text: str) -> bool:
    """Whether a recipe input names a model rather than a stage (stage names have no '/', ':' or '.')."""
    return (text.startswith("models:/") or "://" in text or text.startswith((".", "/", "~")) or "/" in text
            or text.lower().endswith(".gguf") or Path(text).expanduser().exists())


def hub_repo(reference: str) -> str | None:
    """The Hub repo (org/name) a model reference names, or None for a registry model, a URI, a path or an
    existing folder."""
    if reference.startswith(("models:/", ".", "/", "~")) or "://" in reference or Path(reference).expanduser().exists():
        return None
    repo = reference.partition("@")[0]
    return repo if repo.count("/") == 1 and all(repo.split("/")) else None


def resolve_model(reference: str, tracking_uri: str | None = None, digest: bool = True) -> dict:
    """A model named by a recipe as a stage input {uri, digest, kind: model[, revision]}.

    The digest follows the weights for folders and URIs (ETags for object stores) and the registered
    version for models:/ references; a Hub id by the commit its revision (default main) resolves to, asked of
    the Hub or, offline, of the local Hub cache (then recorded as the input's revision, so the run loads
    exactly that commit). `digest=False` only checks
    that the model is there (pre-flight), without hashing a local folder's files."""
    import fsspec

    from tasks.machinery.store import content_digest, digest_json, directory_manifest

    if reference.startswith("models:/"):
        return _resolve_registered(reference, tracking_uri)
    from tasks.machinery import gguf

    if gguf.is_gguf_reference(reference):
        return gguf.resolve(reference, digest)
    if "://" in reference:
        fs, path = fsspec.core.url_to_fs(reference)
        listing = fs.find(path, detail=True)
        if not listing:
            raise FileNotFoundError(f"model {reference}: nothing found there")
        files = {name: {"sha256": str(meta.get("ETag") or meta.get("etag") or meta.get("mtime")),
                        "size": meta.get("size")} for name, meta in sorted(listing.items())}
        return {"uri": reference, "digest": content_digest(files), "kind": "model"}
    local = Path(reference).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"model {local}: no config.json; is it a save_pretrained folder?")
        return {"uri": str(local.resolve()), "digest": content_digest(directory_manifest(local)) if digest else "",
                "kind": "model"}
    repo = hub_repo(reference)
    if repo is None:
        raise FileNotFoundError(f"model {reference}: no such folder, and not a Hub id ({MODEL_REFERENCE_HELP})")
    revision = reference.partition("@")[2]
    from tasks.machinery.fingerprints import resolve_hub_revision

    try:
        commit = resolve_hub_revision(repo, revision or None, "model")
    except ValueError as e:  # no such repo or revision on the Hub: permanent
        raise FileNotFoundError(f"model {reference}: {e}") from None
    pinned = commit or revision  # offline and not in the local Hub cache: keyed by what the recipe names
    if pinned:
        return {"uri": repo, "revision": pinned, "digest": digest_json({"hub": repo, "revision": pinned}),
                "kind": "model"}
    return {"uri": repo, "digest": digest_json({"hub": repo}), "kind": "model"}


def _resolve_registered(reference: str, tracking_uri: str | None) -> dict:
    """models:/name@alias or models:/name/version in the MLflow model registry, pinned to its version."""
    from mlflow.exceptions import MlflowException

    from tasks.machinery import tracking
    from tasks.machinery.store import digest_json

    spec = reference.removeprefix("models:/")
    name, at, alias = spec.partition("@")
    if not at:
        name, _, version = spec.rpartition("/")
    if not name or not (alias if at else version):
        raise ValueError(f"model {reference}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = tracking.client(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, version)
    except MlflowException as e:
        raise FileNotFoundError(f"model {reference}: not in the MLflow model registry ({e.message})") from None
    pinned = f"models:/{name}/{found.version}"
    return {"uri": pinned, "digest": digest_json({"registry": name, "version": str(found.version),
                                                  "source": found.source, "run_id": found.run_id or ""}),
            "kind": "model", "registered_as": reference}


def materialize_external(raw: dict, tracking_uri: str | None = None) -> Path | str:
    """A model outside the artifact store as something from_pretrained accepts: a local folder (downloaded
    once into the state folder's cache for URIs, registry versions and pinned Hub revisions) or a Hub id."""
    from tasks.machinery.store import state_home

    uri, digest = raw["uri"], raw["digest"]
    local = state_home() / "cache" / "models" / digest
    if (local / "config.json").exists():
        return local
    if uri.startswith("models:/"):
        import mlflow.artifacts

        from tasks.machinery import tracking

        tmp = local.with_name(local.name + ".partial")
        # The version's own source (runs:/..., a folder, s3://...): models:/ URIs are resolved against the
        # process-wide registry URI, not the one passed in.
        name, version = uri.removeprefix("models:/").rsplit("/", 1)
        source = tracking.client(tracking_uri).get_model_version_download_uri(name, version)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
        folder = next((p.parent for p in sorted(tmp.rglob("config.json"))), None)
        if folder is None:
            raise FileNotFoundError(f"model {uri}: the registered artifacts hold no config.json "
                                    "(register a save_pretrained folder)")
        folder.rename(local)
        shutil.rmtree(tmp, ignore_errors=True)
        return local
    if "://" in uri:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        tmp = local.with_name(local.name + ".partial")
        fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        tmp.rename(local)
        return local
    if Path(uri).exists():
        return Path(uri)
    if raw.get("revision"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=uri, revision=raw["revision"]))
    return uri
