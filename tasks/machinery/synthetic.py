"""The demo's synthetic task: single-digit addition asked in many phrasings.

It is built so that every post-training stage has something honest to learn:

* the pretraining corpus has counting text and the questions, never an answer, so the base model
  cannot do the task;
* the SFT demonstrations come from a sloppy annotator who forgets the carry most of the time
  (``carry_error_rate``), so SFT learns the format and the easy sums but often answers 7+5 with 2;
* the preference pairs come from a careful grader who compares the right sum with each plausible
  mistake: the carry dropped (or a spurious one added), near misses (±1, ±2), a random number, and a
  non-answer (nothing, a question mark, a shrug, the sum said twice). So a reward model, DPO or RL can
  fix the carry, a reward model cannot get by on a shortcut such as "two digits beat one" (it must rank
  the right sum above its neighbours), and RL finds no reply the reward model over-rates because it
  never saw one like it (measured: without the non-answers, one RLHF run learned to answer nothing);
* the evaluation prompts are phrasings of the question that appear in no training file, with the
  true sum as reference.

Sources are named ``synthetic:arithmetic/<part>`` in a recipe; the generator is deterministic in
its seed and parameters, so the data's digest is stable.
"""

from __future__ import annotations

import random

TEMPLATES = (
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "{a} + {b} = ?",
    "What do you get when you add {a} to {b}?",
    "What is the sum of {a} and {b}?",
    "Please add {a} and {b}.",
    "Tell me {a} plus {b}.",
    "How much is {a} + {b}?",
    "Calculate {a} plus {b}.",
)

PARTS = ("sft", "preference", "unpaired", "eval", "corpus")


def _split_prompts(seed: int, eval_fraction: float) -> tuple[list[tuple], list[tuple]]:
    items = [(a, b, t) for a in range(10) for b in range(10) for t in range(len(TEMPLATES))]
    random.Random(seed).shuffle(items)
    n_eval = int(len(items) * eval_fraction)
    return items[n_eval:], items[:n_eval]


def _prompt(a: int, b: int, t: int) -> str:
    return TEMPLATES[t].format(a=a, b=b)


def _sloppy(a: int, b: int, rng: random.Random, carry_error_rate: float) -> int:
    s = a + b
    if s >= 10 and rng.random() < carry_error_rate:
        return s - 10
    return s


def _slip(a: int, b: int, rng: random.Random) -> int:
    s = a + b
    wrong = s - 10 if s >= 10 else s + rng.choice((-1, 1)) if s > 0 else s + 1
    return wrong


def _mistakes(a: int, b: int, rng: random.Random) -> list[str]:
    """The replies a careful grader ranks below the right sum: the carry dropped (or a spurious one added),
    near misses, one random number (distinct, non-negative) and one non-answer."""
    s = a + b
    candidates = [s - 10 if s >= 10 else s + 10, s - 1, s + 1, s - 2, s + 2,
                  rng.choice([n for n in range(19) if n != s])]
    wrong = [str(n) for n in dict.fromkeys(n for n in candidates if n >= 0)]
    return wrong + [rng.choice(("Hmm.", "?", "I don't know.", f"{s} {s}"))]


def generate(
    part: str,
    seed: int = 0,
    carry_error_rate: float = 0.6,
    eval_fraction: float = 0.15,
    duplicate_fraction: float = 0.02,
    corpus_size: int = 4000,
) -> list[dict]:
    """Rows of one part of the demo data set, as plain dicts in the normalized shapes."""
    if part not in PARTS:
        raise ValueError(f"unknown synthetic part {part!r}; expected one of {', '.join(PARTS)}")
    rng = random.Random(f"{seed}-{part}")
    train, held_out = _split_prompts(seed, eval_fraction)
    rows: list[dict] = []
    if part == "sft":
        for a, b, t in train:
            rows.append({"prompt": _prompt(a, b, t), "completion": str(_sloppy(a, b, rng, carry_error_rate))})
    elif part == "preference":
        for a, b, t in train:
            prompt = _prompt(a, b, t)
            rows += [{"prompt": prompt, "chosen": str(a + b), "rejected": wrong} for wrong in _mistakes(a, b, rng)]
    elif part == "unpaired":
        for a, b, t in train:
            good = rng.random() < 0.5
            rows.append(
                {"prompt": _prompt(a, b, t), "completion": str(a + b if good else _slip(a, b, rng)), "label": good}
            )
    elif part == "eval":
        for a, b, t in held_out:
            rows.append({"prompt": _prompt(a, b, t), "reference": str(a + b)})
    else:  # corpus: text a base model learns the words and digits from, never an answer
        for _ in range(corpus_size):
            kind = rng.random()
            if kind < 0.5:
                a, b, t = train[rng.randrange(len(train))]
                rows.append({"text": _prompt(a, b, t)})
            else:
                start = rng.randrange(0, 10)
                rows.append({"text": " ".join(str(i) for i in range(start, start + rng.randrange(3, 8)))})
        return rows
    if part != "eval" and duplicate_fraction > 0:
        rows += [dict(r) for r in rng.sample(rows, int(len(rows) * duplicate_fraction))]
        rng.shuffle(rows)
    return rows


def parse_source(source: str) -> tuple[str, dict]:
    """'synthetic:arithmetic/sft?carry_error_rate=0.5' -> ('sft', {'carry_error_rate': 0.5})."""
    body = source.removeprefix("synthetic:")
    name, _, query = body.partition("?")
    task, _, part = name.partition("/")
    if task != "arithmetic" or part not in PARTS:
        raise ValueError(
            f"unknown synthetic source {source!r}; use synthetic:arithmetic/<part> with part in {', '.join(PARTS)}"
        )
    params: dict = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        params[key] = float(value) if "." in value else int(value)
    return part, params


def arithmetic_reward(prompts, completions, **kwargs) -> list[float]:
    """A verifier for the demo's task, in TRL's reward-function form: 1.0 when the reply's first number is
    the sum of the two numbers the question asks about, else 0.0. Prompts and completions are chat messages
    (or plain strings)."""
    import re

    def text(value) -> str:
        return value if isinstance(value, str) else value[-1]["content"]

    rewards = []
    for prompt, completion in zip(prompts, completions):
        asked = [int(n) for n in re.findall(r"\d+", text(prompt))[:2]]
        answer = re.search(r"-?\d+", text(completion))
        rewards.append(1.0 if len(asked) == 2 and answer is not None and int(answer.group()) == sum(asked) else 0.0)
    return rewards
