"""The shapes public post-training data sets come in, mapped onto the canonical rows the trainers read.

Canonical rows (every message is {role, content, tool_calls, tool_call_id, name}; the last three are null
unless used; `tool_calls[].function.arguments` is kept as JSON text, since a columnar file cannot hold
free-form objects):

  sft         prompt: [messages before the first assistant turn], completion: [the rest, ending with an
              assistant turn]; multi-turn completions are trained on their assistant turns only
  preference  prompt, chosen, rejected (chosen/rejected: the replies only, never the prompt again)
  unpaired    prompt, completion, label: bool
  eval        prompt, reference: str | null
  text        text (continued pretraining)

Accepted input shapes (recognised by their columns; `columns:` in the recipe renames first):

  prompt/completion (strings or message lists) · chat `messages` (OpenAI fine-tuning rows included: an
  assistant turn with `weight: 0` is context, never trained) · `prompt` + `messages` (UltraChat) ·
  preference with an explicit prompt, with chosen/rejected conversations that repeat it (UltraFeedback
  binarized), with no prompt at all (TRL's `extract_prompt`: the longest common prefix of chosen and
  rejected is the prompt), as Anthropic HH-RLHF transcripts ("\n\nHuman: ... \n\nAssistant: ..."), or as
  strings that start with the row's prompt (stripped) · unpaired prompt/completion/label · `text` · alpaca
  `instruction`/`input`/`output` (prompt = instruction, then a blank line and the input when there is one) ·
  ShareGPT `conversations` of {from, value} (human -> user, gpt -> assistant, system, function_call ->
  assistant tool call, observation/tool -> tool) · a `tools` column (JSON schemas of the callable tools) is
  kept beside the messages.

Rows that teach nothing are not errors: they are dropped and counted by the data stage. `Identical`: a
preference pair whose replies are the same; `EmptyReply`: an assistant reply that is empty or whitespace (in
any shape: a message, a completion string, chosen or rejected, alpaca's output); `NothingTrained`: every
assistant turn of a demonstration has `weight: 0`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.machinery.fingerprints import DataError  # noqa: F401 - raised here, and imported from here by the data modules

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_response": "tool",
                  "function_call": "assistant"}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


class Identical(Exception):
    """A preference pair whose chosen and rejected replies are the same: it teaches nothing."""


class EmptyReply(Exception):
    """An assistant reply that is empty or whitespace: it teaches the model to say nothing."""


class NothingTrained(Exception):
    """A demonstration whose assistant turns all have weight 0: nothing in it is trained."""


def _text(record: dict, field: str, where: str, allow_empty: bool = False) -> str:
    if field not in record or record[field] is None:
        raise DataError(f"{where}: field '{field}' is missing")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _message(role: str, content: str, tool_calls=None, tool_call_id=None, name=None, weight=None) -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls, "tool_call_id": tool_call_id, "name": name,
            "weight": weight}


def _weight(value, where: str) -> int | None:
    """OpenAI's per-turn `weight`: 0 (context) or 1 (trained); absent means trained."""
    if value is None:
        return None
    if value not in (0, 1) or isinstance(value, bool):
        raise DataError(f"{where}: 'weight' must be 0 or 1, got {value!r}")
    return int(value)


def _tool_calls(value, where: str) -> list[dict] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: 'tool_calls' must be a list")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool_calls[{i}] must have a function name")
        arguments = function.get("arguments", {})
        calls.append({"type": "function", "function": {
            "name": function["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
    return calls


def messages(value, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):  # the data stage's innermost loop: error locations are built only for errors
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has unknown role {role!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            calls = _tool_calls(calls, f"{where}: {field}[{i}]")
        content = m.get("content")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        weight = m.get("weight")
        out.append(_message(role, content, calls, m.get("tool_call_id"), m.get("name"),
                            None if weight is None else _weight(weight, f"{where}: {field}[{i}]")))
    return out


def _no_empty_replies(conversation: list[dict]) -> list[dict]:
    if any(m["role"] == "assistant" and not m["content"].strip() and not m["tool_calls"] for m in conversation):
        raise EmptyReply
    return conversation


def hh_transcript(text: str, field: str, where: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript ("\n\nHuman: ... \n\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: field '{field}' has text before its first 'Human:' turn")
    return [_message("user" if who == "Human" else "assistant", said.strip())
            for who, said in zip(parts[1::2], parts[2::2])]


def is_hh_transcript(value) -> bool:
    return isinstance(value, str) and value.lstrip(" ").startswith(("\n\nHuman:", "Human:")) and "Assistant:" in value


def _sharegpt(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(value):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] needs 'from' (one of {', '.join(SHAREGPT_ROLES)}) "
                            "and a string 'value'")
        if who == "function_call":
            try:
                call = json.loads(turn["value"])
            except json.JSONDecodeError:
                raise DataError(f"{where}: conversations[{i}]: a function_call value must be JSON "
                                "{name, arguments}") from None
            out.append(_message("assistant", "", tool_calls=_tool_calls([call], f"{where}: conversations[{i}]")))
        else:
            out.append(_message(SHAREGPT_ROLES[who], turn["value"]))
    return out


def _prompt(record: dict, where: str) -> list[dict]:
    value = record.get("prompt")
    if isinstance(value, list):
        return messages(value, "prompt", where)
    return [_message("user", _text(record, "prompt", where))]


def _reply(record: dict, field: str, where: str) -> list[dict]:
    value = record.get(field)
    if isinstance(value, list):
        msgs = messages(value, field, where)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}' must end with an assistant message")
        return _no_empty_replies(msgs)
    return _no_empty_replies([_message("assistant", _text(record, field, where, allow_empty=True))])


def _conversation(record: dict, where: str) -> list[dict] | None:
    """The record's whole conversation when it is given as one (messages / conversations / alpaca)."""
    if "messages" in record:
        conv = messages(record["messages"], "messages", where)
        prompt = record.get("prompt")
        if isinstance(prompt, str) and prompt.strip() and not any(
                m["role"] == "user" and m["content"] == prompt for m in conv):
            conv = [_message("user", prompt)] + conv  # `prompt` + `messages` where messages omit the prompt
        return conv
    if "conversations" in record:
        return _sharegpt(record["conversations"], where)
    if "instruction" in record and "output" in record:
        instruction = _text(record, "instruction", where)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return [_message("user", prompt), _message("assistant", _text(record, "output", where, allow_empty=True))]
    return None


def _split_at_first_reply(conv: list[dict], where: str, field: str) -> tuple[list[dict], list[dict]]:
    """(prompt, completion): the completion runs from the first trained assistant turn to the last one; turns
    with weight 0 before it are prompt, after it they teach nothing and are left out."""
    replies = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not replies or not any(m["role"] == "user" for m in conv[:replies[0]]):
        raise DataError(f"{where}: field '{field}' needs a user turn followed by an assistant turn")
    _no_empty_replies(conv)
    trained = [i for i in replies if conv[i]["weight"] != 0]
    if not trained:
        raise NothingTrained
    return conv[:trained[0]], conv[trained[0]:trained[-1] + 1]


def _same(a: list[dict], b: list[dict]) -> bool:
    return [(m["role"], m["content"], m["tool_calls"]) for m in a] == [(m["role"], m["content"], m["tool_calls"])
                                                                       for m in b]


def _preference(record: dict, where: str) -> dict:
    chosen_raw, rejected_raw = record.get("chosen"), record.get("rejected")
    if is_hh_transcript(chosen_raw) and is_hh_transcript(rejected_raw):
        chosen_raw, rejected_raw = hh_transcript(chosen_raw, "chosen", where), hh_transcript(rejected_raw, "rejected", where)
        if is_hh_transcript(record.get("prompt")):  # a prompt column cut from the same transcript
            prompt = hh_transcript(record["prompt"], "prompt", where)
            record = {**record, "prompt": prompt[:-1] if prompt and prompt[-1]["role"] == "assistant"
                      and not prompt[-1]["content"] else prompt}
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str) and isinstance(record.get("prompt"), str):
        prompt = record["prompt"]
        if prompt.strip() and chosen_raw.startswith(prompt) and rejected_raw.startswith(prompt):
            record = {**record, "chosen": chosen_raw[len(prompt):].lstrip(), "rejected":
                      rejected_raw[len(prompt):].lstrip()}  # the prompt repeated inside what DPO scores
    if isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        chosen, rejected = messages(chosen_raw, "chosen", where), messages(rejected_raw, "rejected", where)
        shared = 0  # the longest common prefix of turns is the prompt (TRL's extract_prompt)
        while shared < min(len(chosen), len(rejected)) and _same([chosen[shared]], [rejected[shared]]):
            shared += 1
        if shared and chosen[shared - 1]["role"] == "assistant" and (
                shared == len(chosen) or shared == len(rejected)):
            shared -= 1  # replies that are equal up to one's end: keep the last shared reply as a reply
        if shared:
            prefix = chosen[:shared]
            if "prompt" in record and record["prompt"] is not None:
                given = _prompt(record, where)
                if not (_same(given, prefix) or _same(given, prefix[-len(given):])):
                    raise DataError(f"{where}: 'chosen' and 'rejected' start with a conversation that is not the "
                                    "row's 'prompt'")
            chosen, rejected = chosen[shared:], rejected[shared:]
            if chosen and rejected and _same(chosen, rejected):
                raise Identical
            _no_empty_replies(chosen + rejected)
            for field, reply in (("chosen", chosen), ("rejected", rejected)):
                if not reply or reply[-1]["role"] != "assistant" or reply[0]["role"] != "assistant":
                    raise DataError(f"{where}: field '{field}' must be assistant turns after the shared prompt")
            return {"prompt": prefix, "chosen": chosen, "rejected": rejected}
        if "prompt" not in record:
            raise DataError(f"{where}: field 'prompt' is missing, and 'chosen'/'rejected' share no prompt turns")
    row = {"prompt": _prompt(record, where), "chosen": _reply(record, "chosen", where),
           "rejected": _reply(record, "rejected", where)}
    if _same(row["chosen"], row["rejected"]):
        raise Identical
    return row


def _label(record: dict, where: str) -> bool:
    label = record.get("label")
    if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
        label = label.lower() in ("true", "1")
    elif isinstance(label, int) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be a boolean (true = desirable), got {label!r}")
    return label


def _tools(record: dict, where: str) -> str | None:
    tools = record.get("tools")
    if tools is None or isinstance(tools, str):
        return tools
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of tool schemas")
    return json.dumps(tools, ensure_ascii=False)


def normalize(kind: str, record: Any, where: str) -> dict:
    """One record in its canonical shape; DataError names the row and field, Identical flags a no-op pair."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if kind == "sft":
        conv = _conversation(record, where)
        if conv is not None:
            prompt, completion = _split_at_first_reply(conv, where, "messages" if "messages" in record else
                                                       "conversations" if "conversations" in record else "output")
            row = {"prompt": prompt, "completion": completion}
        else:
            prompt, completion = _prompt(record, where), _reply(record, "completion", where)
            trained = [i for i, m in enumerate(completion) if m["role"] == "assistant" and m["weight"] != 0]
            if not trained:
                raise NothingTrained
            row = {"prompt": prompt + completion[:trained[0]], "completion": completion[trained[0]:trained[-1] + 1]}
        return {**row, "tools": _tools(record, where)}
    if kind == "preference":
        return {**_preference(record, where), "tools": _tools(record, where)}
    if kind == "unpaired":
        return {"prompt": _prompt(record, where), "completion": _reply(record, "completion", where),
                "label": _label(record, where)}
    if kind == "eval":
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, (str, int, float)):
            raise DataError(f"{where}: field 'reference' must be a string, got {type(reference).__name__}")
        conv = _conversation(record, where)
        if conv is not None and "prompt" not in record:
            last_user = max((i for i, m in enumerate(conv) if m["role"] == "user"), default=None)
            if last_user is None:
                raise DataError(f"{where}: the conversation has no user turn to ask")
            prompt = conv[:last_user + 1]
            if reference is None and last_user + 1 < len(conv) and conv[last_user + 1]["role"] == "assistant":
                reference = conv[last_user + 1]["content"]
        else:
            prompt = _prompt(record, where)
        return {"prompt": prompt, "reference": None if reference is None else str(reference)}
    if kind == "text":
        return {"text": _text(record, "text", where)}
    raise ValueError(f"unknown data kind {kind}")


def row_text(row: dict) -> str:
    """Everything a row says, for length limits, near-duplicate and contamination checks."""
    if "text" in row:
        return row["text"]
    parts = []
    for field in ("prompt", "completion", "chosen", "rejected"):
        for m in row.get(field) or ():
            parts.append(m["content"])
            for call in m["tool_calls"] or ():
                parts.append(call["function"]["name"] + " " + call["function"]["arguments"])
    return "\n".join(parts)


def prompt_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["prompt"] if m["role"] in ("user", "system"))
