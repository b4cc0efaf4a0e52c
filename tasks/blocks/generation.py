"""Batched generation, reward scoring and sequence log-probabilities for evaluation."""

from __future__ import annotations


def _chat(tokenizer, prompt: list[dict], reply: str | None = None) -> str:
    messages = prompt + ([{"role": "assistant", "content": reply}] if reply is not None else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None)


def _batches(items: list, batch_size: int) -> list[list]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def _map(batch_fn, model, tokenizer, batches: list) -> list:
    """batch_fn over the batches, here or, inside a Ray stage (tasks/machinery/ray_engine.py), spread over its workers;
    the results are flattened in order."""
    from tasks.machinery import ray_engine

    settings = ray_engine.current()
    if settings and len(batches) > 1:
        results = ray_engine.map_batches(batch_fn, model, tokenizer, batches, settings)
    else:
        results = [batch_fn(model, tokenizer, batch) for batch in batches]
    return [item for result in results for item in result]


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Completions for chat prompts, greedy unless do_sample; deterministic for a seed. Batch i samples with
    its own generator state (seed, i), so the replies do not depend on where each batch ran."""
    from functools import partial

    from tasks.machinery.chat import stop_token_ids

    model.eval()
    batches = [(i, batch) for i, batch in enumerate(_batches(prompts, batch_size))]
    stops = stop_token_ids(tokenizer, model)  # the template's end-of-turn token too, not only EOS
    return _map(partial(_generate_batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, seed=seed, stops=stops), model, tokenizer, batches)


def _generate_batch(model, tokenizer, numbered, max_new_tokens: int, do_sample: bool, temperature: float,
                    seed: int, stops: list[int]) -> list[str]:
    import torch

    index, prompts = numbered
    torch.manual_seed(seed * 1_000_003 + index)
    tokenizer.padding_side = "left"
    texts = [_chat(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
        )
    new = ids[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def reward_scores(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 64) -> list[float]:
    """The reward model's scalar score of each (prompt, reply)."""
    model.eval()
    return _map(_score_batch, model, tokenizer, _batches(list(zip(prompts, replies)), batch_size))


def _score_batch(model, tokenizer, pairs) -> list[float]:
    import torch

    tokenizer.padding_side = "right"
    texts = [_chat(tokenizer, p, r) for p, r in pairs]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        return model(**enc).logits[:, 0].float().tolist()


def reply_logprobs(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 64,
                   per_token: bool = False) -> list[float]:
    """Sum of log p(reply tokens | prompt) under a causal LM, reply closed by the end-of-turn token (with
    per_token, the mean over the reply's tokens)."""
    from functools import partial

    model.eval()
    return _map(partial(_logprob_batch, per_token=per_token), model, tokenizer,
                _batches(list(zip(prompts, replies)), batch_size))


def _logprob_batch(model, tokenizer, pairs, per_token: bool) -> list[float]:
    import torch

    tokenizer.padding_side = "right"
    ps, rs = [p for p, _ in pairs], [r for _, r in pairs]
    prompt_lens = [len(tokenizer(_chat(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in ps]
    enc = tokenizer([_chat(tokenizer, p, r) for p, r in zip(ps, rs)], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(model.device)
    with torch.no_grad():
        logits = model(**enc).logits[:, -enc["input_ids"].shape[1] :].float()  # a soft prompt adds positions
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    mask = enc["attention_mask"][:, 1:].clone()
    for i, n in enumerate(prompt_lens):
        mask[i, : n - 1] = 0
    total = (logp * mask).sum(-1)
    return (total / mask.sum(-1).clamp(min=1) if per_token else total).tolist()


def sample_replies(model, tokenizer, prompts: list[list[dict]], n: int, max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 64) -> list[list[str]]:
    """n replies per prompt from the model (on the accelerator), sampled at `temperature`; 0 = greedy."""
    from tasks.machinery.modeling import accelerator

    model.to(accelerator())
    repeated = [p for p in prompts for _ in range(n)]
    flat = generate(model, tokenizer, repeated, max_new_tokens, batch_size, do_sample=temperature > 0,
                    temperature=temperature or 1.0, seed=seed)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
