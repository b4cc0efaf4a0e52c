"""Prompt templates that wrap a task's questions: a system message and a `{{question}}` user template, kept as
versions in the MLflow prompt registry (prompt_search registers them; sft, evaluate and the judges read them).

A template is a chat prompt, a list of messages one of which holds `{{question}}` (the question's text goes
there; system messages come before the conversation), or plain text with `{{question}}` (a user message).
Recipes name one by registry URI (`prompts:/name/version`, `prompts:/name@alias`) or inline. As a stage input it
is a source reference whose digest covers the template's text, so a new version behind an alias retrains.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

QUESTION = "{{question}}"


def as_messages(template) -> list[dict]:
    """A template as chat messages (plain text: one user message)."""
    if isinstance(template, str):
        try:
            parsed = json.loads(template)
        except ValueError:
            parsed = None
        template = parsed if isinstance(parsed, list) else [{"role": "user", "content": template}]
    messages = [{"role": m["role"], "content": m["content"]} for m in template]
    holders = [m for m in messages if QUESTION in m["content"].replace(" ", "")]
    if len(holders) != 1 or holders[0]["role"] != "user":
        raise ValueError(f"prompt template {json.dumps(messages)[:200]}: needs {QUESTION} in exactly one user message")
    return messages


def wrap(template: list[dict], conversation: list[dict]) -> list[dict]:
    """The conversation asked through the template: its system messages first, the last user turn rendered into the
    template's user message (earlier turns kept as they are)."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=None)
    if last is None:
        return conversation
    question = conversation[last]["content"]
    rendered = [{"role": m["role"], "content": re.sub(r"\{\{\s*question\s*\}\}", lambda _: question, m["content"])}
                for m in template]
    system = [m for m in rendered if m["role"] == "system"]
    user = [m for m in rendered if m["role"] != "system"]
    before = [m for m in conversation[:last] if not (system and m["role"] == "system")]
    return system + before + user + conversation[last + 1:]


def load(spec: str, tracking_uri: str | None):
    """(uri, messages) of a registered prompt or an inline template."""
    from tasks.machinery import tracking
    from tasks.machinery.store import digest_json

    if spec.startswith("prompts:/"):
        try:
            version = tracking.client(tracking_uri).load_prompt(spec)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing prompt
            raise ValueError(f"prompt {spec}: not in the MLflow prompt registry ({e})") from None
        return f"prompts:/{version.name}/{version.version}", as_messages(version.template)
    messages = as_messages(spec)
    return f"inline:{digest_json({'template': messages})[:12]}", messages


def prompt_source(spec: str | None, tracking_uri: str | None, name: str = "prompt.template") -> dict[str, dict]:
    """A stage's prompt template as a source input {name: {uri, digest, messages}} (none when unset)."""
    if not spec:
        return {}
    from tasks.machinery.store import digest_json

    uri, messages = load(spec, tracking_uri)
    return {name: {"uri": uri, "kind": "source", "digest": digest_json({"template": messages}), "messages": messages}}


def template_of(inputs: dict, name: str = "prompt.template") -> list[dict] | None:
    """A stage's template: its `prompt` input (a prompt_search output: the winner), or its `prompt` setting."""
    if "prompt" in inputs:
        winner = Path(inputs["prompt"]) / "winner.json"
        if not winner.exists():
            raise ValueError(f"the prompt input {inputs['prompt']} holds no winner.json (is it a prompt_search stage?)")
        return as_messages(json.loads(winner.read_text())["messages"])
    ref = inputs.get(name)
    return ref["messages"] if ref else None


PROMPT_SLOT_HELP = "a prompt_search stage whose winning template formats the prompts (instead of the `prompt` setting)"
