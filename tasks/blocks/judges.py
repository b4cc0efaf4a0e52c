"""Judges: who says which reply is better when no human does (RLAIF), and who scores RL rollouts.

One small interface, four back-ends:

* `score(prompts, replies) -> list[float]`: pointwise, higher is better;
* `prefer(prompts, first, second) -> list[float]`: pairwise, 1.0 = the first is better, 0.0 = the second,
  0.5 = no preference. Back-ends without a pairwise prompt compare their scores.

Back-ends: `reward_model` (a trained reward model, the stage's `reward` input), `rule` (a `module:function`
in TRL's reward-function form, e.g. the demo's arithmetic checker), `hf_model` (a local causal LM asked the
judge prompt; its verdict is read from the next-token probabilities of Yes/No or A/B, so it needs no
parsing and is deterministic) and `endpoint` (any OpenAI-compatible chat API: URL, model, the API key read
from an environment variable and never logged; concurrent requests, timeouts, retries with back-off).
Verdicts of the model back-ends are cached on disk by (back-end, model, prompt version, rendered prompt):
a rerun, or a retry after a failure, does not ask again.

Judge prompts are `{{variable}}` templates versioned in the MLflow prompt registry (`register_prompt`);
the stage's cache key holds the version it used (see `prompt_sources`), so editing a prompt retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.endpoints import ChatEndpoint, EndpointError, EndpointSettings
from tasks.blocks.judge_prompts import Mode, load_template, prompt_ref, render

logger = logging.getLogger("posttrain")



class JudgeSettings(EndpointSettings):
    backend: Literal["reward_model", "rule", "hf_model", "endpoint"] = Field(
        description="reward_model: the stage's `reward` input; rule: `function`; hf_model: the stage's `judge` input "
        "(a stage or a model reference: a causal LM); endpoint: an OpenAI-compatible chat API (`url`, `model`).")
    function: str | None = Field(None, description="rule: `module:function` in TRL's reward-function form "
                                 "f(prompts, completions, **columns) -> list[float]; its source is in the cache key.")
    prompt: str | None = Field(None, description="The judge prompt: a {{question}}/{{answer}} (score) or "
                               "{{question}}/{{answer_a}}/{{answer_b}} (compare) template, or a registered prompt "
                               "`prompts:/<name>/<version>` or `prompts:/<name>@<alias>`. Default: a built-in prompt.")
    prompt_name: str = Field("posttrain-judge", description="Name under which an inline prompt is versioned in the "
                             "MLflow prompt registry (suffixed with the back-end and mode).")
    both_orders: bool = Field(True, description="compare: ask with the replies in both orders and average, so a "
                              "judge's preference for the first (or second) position cancels out.")
    max_tokens: int = Field(8, ge=1, description="endpoint: longest verdict asked for.")
    batch_size: int = Field(32, ge=1, description="reward_model / hf_model: prompts per forward pass.")
    weight: float = Field(1.0, ge=0, description="As an RL reward (grpo/rloo `judges`): weight in the reward sum.")

    @model_validator(mode="after")
    def _backend_has_what_it_needs(self) -> "JudgeSettings":
        if self.backend == "endpoint":
            self.check_endpoint("judge")
        if self.backend == "rule":
            if not self.function:
                raise ValueError("judge backend 'rule' needs function")
            check_function_spec(self.function)
        return self

    @property
    def prompted(self) -> bool:
        return self.backend in ("hf_model", "endpoint")

    def registry_name(self, mode: Mode) -> str:
        return f"{self.prompt_name}-{self.backend.replace('_', '-')}-{mode}"


def check_function_spec(value: str) -> str:
    module, _, name = value.partition(":")
    if not module or not name.isidentifier():
        raise ValueError(f"{value!r}: expected module:function, e.g. tasks.machinery.synthetic:arithmetic_reward")
    return value


def missing_judge_input(judges: list[JudgeSettings], inputs: dict) -> str | None:
    """What a recipe instance lacks for its judges: the `reward` or `judge` input they read, in words."""
    backends = {j.backend for j in judges}
    if "reward_model" in backends and "reward" not in inputs:
        return "judge backend reward_model reads the `reward` input: add one, or choose another judge"
    if "hf_model" in backends and "judge" not in inputs:
        return "judge backend hf_model reads the `judge` input (a stage or a model reference)"
    return None


def _module_of(spec: str) -> str:
    """The module a `module:function` setting names, as it is now called (a path from before tasks/ was split
    into rooms still loads)."""
    from tasks import MOVED_MODULES

    module = spec.partition(":")[0]
    return MOVED_MODULES.get(module, module)


def load_function(spec: str):
    """The function a `module:function` setting names."""
    import importlib

    module, name = _module_of(spec), spec.partition(":")[2]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{spec}: cannot load it ({e})") from None


def function_source(spec: str) -> dict:
    """A `module:function`'s module source as a stage input: editing the rule reruns the stage."""
    import importlib.util

    from tasks.machinery.fingerprints import file_digest

    spec_ = importlib.util.find_spec(_module_of(spec))
    if spec_ is None or not spec_.origin or not Path(spec_.origin).is_file():
        raise ValueError(f"{spec}: no such module")
    return {"uri": spec, "digest": file_digest(Path(spec_.origin)), "kind": "source"}


def judge_sources(judge: JudgeSettings, modes: tuple[Mode, ...], prefix: str, tracking_uri: str | None) -> dict:
    """A judge's stage inputs: its prompt version per mode (`<prefix>.prompt.<mode>`) or its rule's source."""
    if judge.backend == "rule":
        return {f"{prefix}.rule": function_source(judge.function)}
    if not judge.prompted:
        return {}
    return {f"{prefix}.prompt.{mode}": prompt_ref(judge, mode, tracking_uri) for mode in modes}


def judge_prompts(inputs: dict, prefix: str) -> dict[str, dict]:
    """{mode: prompt ref} of one judge, from a stage's inputs."""
    head = f"{prefix}.prompt."
    return {name[len(head):]: ref for name, ref in inputs.items() if name.startswith(head)}


# --- the verdict cache ---------------------------------------------------------------------------------------

class VerdictCache:
    """Verdicts on disk (SQLite under $POSTTRAIN_HOME/cache), shared by runs and processes."""

    def __init__(self, path: Path | None = None):
        from tasks.machinery.store import state_home

        self.path = path or state_home() / "cache" / "judge-verdicts.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._lock, self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = db.execute(f"SELECT key, value FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update(dict(rows.fetchall()))
        return found

    def put_many(self, values: dict[str, float]) -> None:
        with self._lock, self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", list(values.items()))


# --- back-ends --------------------------------------------------------------------------------------------------

def _question(prompt) -> str:
    """The conversation a reply answers, as text for a judge prompt (the last user turn alone when single-turn)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _text(reply) -> str:
    return reply if isinstance(reply, str) else reply[-1]["content"]


class Judge:
    """Pointwise scores; pairwise verdicts from the scores unless a back-end asks for them directly."""

    name = "judge"

    def score(self, prompts: list, replies: list[str]) -> list[float]:
        raise NotImplementedError

    def prefer(self, prompts: list, first: list[str], second: list[str]) -> list[float]:
        a, b = self.score(prompts, first), self.score(prompts, second)
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b)]

    def scores_of(self, prompts: list, answers: dict[str, list[str]]) -> dict[str, list[float]] | None:
        """Each model's replies scored, where this judge scores replies one by one (a rule, a reward model);
        None for a judge that compares pairs (its verdicts come from prefer)."""
        return {name: self.score(prompts, replies) for name, replies in answers.items()}

    def close(self) -> None:
        """Release the judge's model (a local judge holds one on the accelerator)."""
        model = getattr(self, "model", None)
        if model is not None:
            from tasks.machinery.modeling import free

            free(model)
            self.model = None

    def as_reward_function(self):
        """TRL's reward-function form, for GRPO/RLOO `reward_funcs`."""
        def reward(prompts, completions, **kwargs) -> list[float]:
            return self.score(prompts, [_text(c) for c in completions])

        reward.__name__ = f"judge_{self.name}"
        return reward


class RuleJudge(Judge):
    def __init__(self, function: str):
        self.function = load_function(function)
        self.name = function.partition(":")[2]

    def score(self, prompts, replies):
        completions = [[{"role": "assistant", "content": r}] for r in replies]
        return [float(s) for s in self.function(prompts, completions)]


class RewardModelJudge(Judge):
    name = "reward_model"

    def __init__(self, folder, batch_size: int = 32, trust_remote_code: bool = False):
        from tasks.machinery.modeling import load_reward_model, load_tokenizer

        self.model = load_reward_model(folder, trust_remote_code, on_device=True)
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        self.batch_size = batch_size

    def score(self, prompts, replies):
        from tasks.blocks.generation import reward_scores

        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return reward_scores(self.model, self.tokenizer, chats, list(replies), self.batch_size)


class _PromptedJudge(Judge):
    """A judge asked a prompt per verdict; verdicts cached by (identity, rendered prompt)."""

    def __init__(self, templates: dict[str, str], identity: str, cache: VerdictCache | None, both_orders: bool):
        self.templates, self.identity, self.cache, self.both_orders = templates, identity, cache, both_orders

    def _ask_many(self, mode: Mode, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def _cached(self, mode: Mode, texts: list[str]) -> list[float]:
        if self.cache is None:
            return self._ask_many(mode, texts)
        keys = [VerdictCache.key(self.identity, mode, t) for t in texts]
        known = self.cache.get_many(sorted(set(keys)))
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
        if todo:
            fresh = self._ask_many(mode, [t for _, t in todo])
            new = {k: v for (k, _), v in zip(todo, fresh)}
            self.cache.put_many(new)
            known |= new
        return [known[k] for k in keys]

    def score(self, prompts, replies):
        template = self._template("score")
        return self._cached("score", [render(template, question=_question(p), answer=r)
                                      for p, r in zip(prompts, replies)])

    def prefer(self, prompts, first, second):
        if "compare" not in self.templates:
            return super().prefer(prompts, first, second)
        template = self._template("compare")
        ask = [render(template, question=_question(p), answer_a=a, answer_b=b) for p, a, b in zip(prompts, first, second)]
        forward = self._cached("compare", ask)
        if not self.both_orders:
            return forward
        swapped = [render(template, question=_question(p), answer_a=b, answer_b=a)
                   for p, a, b in zip(prompts, first, second)]
        backward = self._cached("compare", swapped)
        return [(f + (1.0 - b)) / 2 for f, b in zip(forward, backward)]

    def scores_of(self, prompts, answers):
        return super().scores_of(prompts, answers) if "compare" not in self.templates else None

    def _template(self, mode: Mode) -> str:
        if mode not in self.templates:
            raise ValueError(f"judge {self.name}: no {mode} prompt was given to this stage")
        return self.templates[mode]


class HFModelJudge(_PromptedJudge):
    """A local causal LM as judge. score = P(Yes) / (P(Yes) + P(No)) for the first reply token; compare =
    P(A) / (P(A) + P(B)): deterministic, and meaningful even for a model that would not follow a format."""

    def __init__(self, model: str | Path, templates, cache, both_orders=True, batch_size: int = 32,
                 trust_remote_code: bool = False, digest: str | None = None):
        from tasks.machinery.modeling import load_causal_lm, load_tokenizer

        super().__init__(templates, f"hf_model\x1f{digest or model}", cache, both_orders)
        self.name = Path(str(model)).name
        self.model = load_causal_lm(model, trust_remote_code, on_device=True).eval()
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.batch_size = batch_size

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"judge {self.name}: the tokenizer cannot encode {word!r}")
        return ids[0]

    def _ask_many(self, mode, texts):
        import torch

        yes, no = ("Yes", "No") if mode == "score" else ("A", "B")
        pair = [self._first_token(yes), self._first_token(no)]
        self.tokenizer.padding_side = "left"
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chats = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True)
                     for t in texts[start : start + self.batch_size]]
            enc = self.tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1, pair].float()
            out += torch.softmax(logits, dim=-1)[:, 0].tolist()
        return out


class EndpointJudge(_PromptedJudge):
    """An OpenAI-compatible chat endpoint as judge, asked at temperature 0."""

    def __init__(self, cfg: JudgeSettings, templates, cache):
        identity = f"endpoint\x1f{cfg.url}\x1f{cfg.model}"
        super().__init__(templates, identity, cache, cfg.both_orders)
        self.cfg, self.name = cfg, str(cfg.model)
        self.endpoint = ChatEndpoint(cfg, "judge")

    def _ask_many(self, mode, texts):
        return self.endpoint.complete_many([[{"role": "user", "content": t}] for t in texts], self.cfg.max_tokens,
                                           parse=lambda reply: parse_verdict(mode, reply), what="verdicts")


def parse_verdict(mode: Mode, reply: str) -> float:
    """A score is the reply's first number; a comparison 1.0 for A, 0.0 for B, 0.5 when it names neither."""
    if mode == "score":
        number = re.search(r"-?\d+(?:\.\d+)?", reply)
        if number is None:
            raise EndpointError(f"judge reply {reply[:100]!r}: no score in it")
        return float(number.group())
    letter = re.search(r"\b([AB])\b", reply.strip().upper())
    return 0.5 if letter is None else 1.0 if letter.group(1) == "A" else 0.0


def build_judge(cfg: JudgeSettings, prompts: dict[str, dict] | None = None, reward: Path | str | None = None,
                judge_model: Path | str | None = None, tracking_uri: str | None = None,
                trust_remote_code: bool = False, cache: VerdictCache | None = None,
                judge_digest: str | None = None) -> Judge:
    """The judge a stage uses. `prompts` maps a mode to its prompt ref (from prompt_ref); `reward` and
    `judge_model` are the stage's `reward` and `judge` inputs (reward_model and hf_model back-ends)."""
    if cfg.backend == "rule":
        return RuleJudge(cfg.function)
    if cfg.backend == "reward_model":
        if reward is None:
            raise ValueError("judge backend reward_model: the stage has no `reward` input")
        return RewardModelJudge(reward, cfg.batch_size, trust_remote_code)
    templates = {mode: load_template(ref, tracking_uri) for mode, ref in (prompts or {}).items()}
    cache = cache or VerdictCache()
    versions = json.dumps({mode: ref["uri"] for mode, ref in sorted((prompts or {}).items())})
    if cfg.backend == "hf_model":
        if judge_model is None:
            raise ValueError("judge backend hf_model: the stage has no `judge` input")
        judge = HFModelJudge(judge_model, templates, cache, cfg.both_orders, cfg.batch_size, trust_remote_code,
                             judge_digest)
    else:
        judge = EndpointJudge(cfg, templates, cache)
    judge.identity += "\x1f" + versions
    return judge


def stage_judge(cfg: JudgeSettings | None, inputs: dict, ctx, prefix: str = "judge") -> Judge | None:
    """The judge a stage's settings name, built from the stage's inputs: its prompt versions (`<prefix>.prompt.*`),
    its `reward` or `judge` model. None when `cfg` is None."""
    if cfg is None:
        return None
    return build_judge(cfg, judge_prompts(inputs, prefix), inputs.get("reward"), inputs.get("judge"),
                       ctx.env.tracking_uri if ctx.env else None, ctx.trust_remote_code,
                       judge_digest=ctx.refs.get("judge", {}).get("digest"))


def judge_slots(who: str = "judge") -> dict:
    """The optional inputs a stage's judge may read (its reward model, its local judge model)."""
    from tasks.machinery.stagekind import Slot

    return {"reward": Slot("reward", f"the reward model, for a {who} of backend reward_model", required=False),
            "judge": Slot("policy", f"the model a {who} of backend hf_model asks", required=False)}

