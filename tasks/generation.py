"""Batched generation, reward scoring and sequence log-probabilities for evaluation."""

from __future__ import annotations


def _chat(tokenizer, prompt: list[dict], reply: str | None = None) -> str:
    messages = prompt + ([{"role": "assistant", "content": reply}] if reply is not None else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None)


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Completions for chat prompts, greedy unless do_sample; deterministic for a seed."""
    import torch

    from tasks.chat import stop_token_ids

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    model.eval()
    stops = stop_token_ids(tokenizer, model)  # the template's end-of-turn token too, not only EOS
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [_chat(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return outputs


def reward_scores(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 64) -> list[float]:
    """The reward model's scalar score of each (prompt, reply)."""
    import torch

    tokenizer.padding_side = "right"
    model.eval()
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        texts = [_chat(tokenizer, p, r) for p, r in zip(prompts[start : start + batch_size],
                                                         replies[start : start + batch_size])]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def reply_logprobs(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 64,
                   per_token: bool = False) -> list[float]:
    """Sum of log p(reply tokens | prompt) under a causal LM, reply closed by the end-of-turn token (with
    per_token, the mean over the reply's tokens)."""
    import torch

    tokenizer.padding_side = "right"
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], replies[start : start + batch_size]
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
        out += (total / mask.sum(-1).clamp(min=1) if per_token else total).tolist()
    return out


def sample_replies(model, tokenizer, prompts: list[list[dict]], n: int, max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 64) -> list[list[str]]:
    """n replies per prompt from the model (on the accelerator), sampled at `temperature`; 0 = greedy."""
    from tasks.modeling import accelerator

    model.to(accelerator())
    repeated = [p for p in prompts for _ in range(n)]
    flat = generate(model, tokenizer, repeated, max_new_tokens, batch_size, do_sample=temperature > 0,
                    temperature=temperature or 1.0, seed=seed)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
