"""Judge prompts: `{{variable}}` templates versioned in the MLflow prompt registry (`register_prompt`), the
defaults per back-end and mode, and the reference a stage's cache key holds (so editing a prompt retrains).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tasks.blocks.judges import JudgeSettings

logger = logging.getLogger("posttrain")

Mode = Literal["score", "compare"]
# The default prompts: a number (endpoint) or a Yes/No verdict (hf_model) for one reply; A or B for two.
DEFAULT_PROMPTS: dict[tuple[str, str], str] = {
    ("endpoint", "score"): (
        "You are grading an assistant's reply. Rate how correct and helpful the reply is, from 1 (wrong or "
        "unhelpful) to 10 (correct and helpful). Answer with the number only.\n\n"
        "Question: {{question}}\n\nReply: {{answer}}"),
    ("hf_model", "score"): (
        "Is this reply to the question correct and helpful? Answer Yes or No.\n\n"
        "Question: {{question}}\n\nReply: {{answer}}"),
    ("endpoint", "compare"): (
        "Which reply answers the question better (correct first, then helpful and concise)? Answer with the "
        "letter A or B only.\n\nQuestion: {{question}}\n\nReply A: {{answer_a}}\n\nReply B: {{answer_b}}"),
    ("hf_model", "compare"): (
        "Which reply answers the question better? Answer A or B.\n\n"
        "Question: {{question}}\n\nReply A: {{answer_a}}\n\nReply B: {{answer_b}}"),
}


def render(template: str, **values: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"judge prompt: unknown variable {{{{{name}}}}} (known: {', '.join(sorted(values))})")
        return values[name]

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", value, template)


def _check_variables(template: str, mode: Mode, where: str) -> None:
    wanted = {"score": {"question", "answer"}, "compare": {"question", "answer_a", "answer_b"}}[mode]
    found = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", template))
    if not wanted <= found or found - wanted:
        raise ValueError(f"{where}: a {mode} prompt uses {{{{{'}}, {{'.join(sorted(wanted))}}}}} "
                         f"(it has {', '.join(sorted(found)) or 'no variables'})")


def prompt_ref(judge: JudgeSettings, mode: Mode, tracking_uri: str | None) -> dict | None:
    """The judge prompt as a stage input {uri: prompts:/name/version, digest, kind: source}: a registered prompt
    resolved to its version, or an inline/default prompt registered (a new version only when its text
    changed). None for back-ends without a prompt."""
    from tasks.machinery import tracking
    from tasks.machinery.store import digest_json

    if not judge.prompted:
        return None
    client = tracking.client(tracking_uri)
    if judge.prompt and judge.prompt.startswith("prompts:/"):
        try:
            version = client.load_prompt(judge.prompt)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing prompt
            raise ValueError(f"judge prompt {judge.prompt}: not in the MLflow prompt registry ({e})") from None
        name = version.name
    else:
        template = judge.prompt or DEFAULT_PROMPTS[(judge.backend, mode)]
        _check_variables(template, mode, "judge prompt")
        name = judge.registry_name(mode)
        latest = _latest_version(client, name)
        if latest is not None and latest.template == template:
            version = latest
        else:
            version = client.register_prompt(name, template, commit_message="registered by posttrain",
                                             tags={"posttrain.backend": judge.backend, "posttrain.mode": mode})
            logger.info("judge prompt %s: registered version %s", name, version.version)
    _check_variables(version.template, mode, f"judge prompt prompts:/{name}/{version.version}")
    return {"uri": f"prompts:/{name}/{version.version}", "kind": "source",
            "digest": digest_json({"prompt": name, "version": str(version.version), "template": version.template})}


def _latest_version(client, name: str):
    try:
        found = client.search_prompt_versions(name)
    except Exception:  # noqa: BLE001 - no such prompt yet
        return None
    versions = list(getattr(found, "prompt_versions", found) or [])
    return max(versions, key=lambda v: int(v.version)) if versions else None


def load_template(ref: dict, tracking_uri: str | None) -> str:
    from tasks.machinery import tracking

    return tracking.client(tracking_uri).load_prompt(ref["uri"]).template
