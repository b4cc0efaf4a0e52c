"""Chat templates as models ship them: which tokens are the assistant's, and which token ends a turn.

TRL's `assistant_only_loss` needs `{% generation %}` markers in the template; SmolLM2's, Qwen2.5's and
Llama 3's templates have none. Without markers the assistant's tokens are found by rendering: for each
assistant turn i, the conversation up to turn i with the generation prompt is a prefix of the whole
conversation, and so is the conversation through turn i; the characters between the two are the reply and
its end-of-turn token. The tokens whose characters fall there (the tokenizer's offset mapping) are trained,
the rest (system, user and tool turns, role headers, the newline after the end-of-turn token) are context.
A template that renders a prefix differently from the whole (one that drops earlier reasoning, say) is
refused with the row's number: such a template needs generation markers.
"""

from __future__ import annotations

PROBE = "posttrain-probe-reply"


def has_generation_markers(tokenizer) -> bool:
    from trl.chat_template_utils import has_generation_markers as markers

    return bool(tokenizer.chat_template) and markers(tokenizer.chat_template)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         tools=tools)


def end_of_turn(tokenizer) -> str | None:
    """The special token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>),
    or None when the template closes turns with plain text."""
    text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}])
    after = text[text.rindex(PROBE) + len(PROBE):]
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token in special:
            return token
    return None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS, the template's end-of-turn token and the model's
    generation-config EOS ids (Llama 3 lists several)."""
    ids = [tokenizer.eos_token_id]
    turn = end_of_turn(tokenizer) if tokenizer.chat_template else None
    if turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(turn))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _clean(messages: list[dict]) -> list[dict]:
    """Messages as templates expect them: the null tool fields of canonical rows and the training weight left
    out."""
    return [{k: v for k, v in m.items() if v is not None and k != "weight"} for m in messages]


_ASK = object()  # end_of_turn not given: found from the template


def assistant_spans(tokenizer, messages: list[dict], where: str, tools=None,
                    turn=_ASK) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant replies (each with its
    end-of-turn token, not what follows it); a reply with `weight: 0` is context. `turn`: the template's
    end-of-turn token when the caller knows it already."""
    context = [m.get("weight") == 0 for m in messages]
    messages = _clean(messages)
    full = _render(tokenizer, messages, tools=tools)
    turn = end_of_turn(tokenizer) if turn is _ASK else turn
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or context[i]:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i else ""
        through = _render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(through) or len(through) < len(before):
            raise ValueError(f"{where}: the chat template renders the conversation up to assistant turn {i} "
                             "differently from the whole conversation, so the assistant's tokens cannot be told "
                             "from the rest; give the template {% generation %} markers or set "
                             "assistant_only_loss: false")
        end = len(through)
        if turn is not None:  # stop after the end-of-turn token: the newline after it is the next turn's
            closed = full.rfind(turn, len(before), end)
            if closed >= 0:
                end = closed + len(turn)
        spans.append((len(before), end))
    return full, spans


def tokenize_assistant_only(tokenizer, prompt: list[dict], completion: list[dict], where: str,
                            tools=None, turn=_ASK) -> dict:
    """{input_ids, assistant_masks} of one conversation, 1 on the assistant's reply tokens."""
    text, spans = assistant_spans(tokenizer, list(prompt) + list(completion), where, tools, turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= a < end for start, end in spans)) for a, _ in encoded["offset_mapping"]]
    if not any(mask):
        raise ValueError(f"{where}: no assistant tokens in the rendered conversation")
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def assistant_only_dataset(dataset, tokenizer, name: str = "sft/train"):
    """A prompt/completion dataset tokenized with assistant masks (TRL's SFTTrainer builds the labels from them
    and truncates to max_length)."""
    import json

    turn = end_of_turn(tokenizer)  # once, not per row

    def encode(row, index):
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        return tokenize_assistant_only(tokenizer, row["prompt"], row["completion"], f"{name} row {index + 1}", tools,
                                       turn)

    return dataset.map(encode, with_indices=True, remove_columns=dataset.column_names)
