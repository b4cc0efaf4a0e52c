"""Short word problems answered in a fixed format: the checkable skill of the real-model recipe
(configs/smollm2-135m-gguf.yaml).

The skill is the format: one line of working, then a last line `Answer: <number>`. An instruction-tuned model
answers such questions in free prose, so whether it learned the format (and the number) is checked by code,
not by a judge. The data is written as the Hub's data sets are shaped (UltraChat's `prompt` + `messages`,
UltraFeedback binarized's `prompt` + `chosen`/`rejected` conversations with scores, a prompt + reference
evaluation set) so that the recipe exercises the same reading code as a Hub data set:

    python -m tasks.blocks.word_problems configs/word-problems      # rewrites the shipped files (seeded)
    python -m tasks.blocks.word_problems configs/word-problems --replay FOLDER   # and the replay file (the base's replies)

The verifiers are in TRL's reward-function form (f(prompts, completions, **columns) -> list[float]), usable
as evaluation verifiers and as GRPO/RLOO rewards.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lily", "Ben", "Ivy", "Max", "Nina")
ITEMS = ("apple", "marble", "book", "sticker", "pencil", "cookie", "shell", "card", "coin", "toy car")
_ANSWER = re.compile(r"^Answer: (-?\d+)$")


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, working, answer) of one problem: addition, subtraction or multiplication of small numbers."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    shape = rng.randrange(5)
    if shape == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return (f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
                f"{a} + {b} = {a + b}", a + b)
    if shape == 1:
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {item}s and gave {b} of them to a friend. How many {item}s are left?",
                f"{a} - {b} = {a - b}", a - b)
    if shape == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (f"There are {a} bags with {b} {item}s in each bag. How many {item}s are there in total?",
                f"{a} x {b} = {a * b}", a * b)
    if shape == 3:
        a, b = rng.randint(2, 12), rng.randint(2, 7)
        return (f"{name} reads {a} pages every day for {b} days. How many pages does {name} read?",
                f"{a} x {b} = {a * b}", a * b)
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 15)
    return (f"A shelf holds {a} red, {b} blue and {c} green {item}s. How many {item}s are on the shelf?",
            f"{a} + {b} + {c} = {a + b + c}", a + b + c)


def formatted(working: str, answer: int) -> str:
    return f"{working}\nAnswer: {answer}"


def _prose(question: str, answer: int, rng: random.Random) -> str:
    """A reply with the right number but not in the format (what an instruction-tuned model writes)."""
    return rng.choice((f"The answer is {answer}.", f"There are {answer} in total.",
                       f"Let me think. The result is {answer}!"))


def write_files(folder: Path, seed: int = 0, sft_rows: int = 800, preference_rows: int = 800,
                eval_rows: int = 120) -> dict[str, int]:
    """sft.jsonl (UltraChat shape), preference.jsonl (UltraFeedback binarized shape), eval.jsonl (prompt +
    reference); disjoint questions across the three."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def fresh():
        while True:
            question, working, answer = _problem(rng)
            if question not in seen:
                seen.add(question)
                return question, working, answer

    with open(folder / "eval.jsonl", "w") as f:
        for _ in range(eval_rows):
            question, _, answer = fresh()
            f.write(json.dumps({"prompt": question, "reference": str(answer)}) + "\n")
    with open(folder / "sft.jsonl", "w") as f:
        for i in range(sft_rows):
            question, working, answer = fresh()
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": formatted(working, answer)}]
            f.write(json.dumps({"prompt": question, "prompt_id": f"wp-sft-{i}", "messages": messages}) + "\n")
    with open(folder / "preference.jsonl", "w") as f:
        for i in range(preference_rows):
            question, working, answer = fresh()
            wrong = answer + rng.choice((-3, -2, -1, 1, 2, 10))
            rejected = (_prose(question, answer, rng) if i % 2 == 0 else
                        formatted(working.rsplit("= ", 1)[0] + f"= {wrong}", wrong))
            turn = [{"role": "user", "content": question}]
            f.write(json.dumps({
                "prompt": question, "prompt_id": f"wp-pref-{i}",
                "chosen": turn + [{"role": "assistant", "content": formatted(working, answer)}],
                "rejected": turn + [{"role": "assistant", "content": rejected}],
                "score_chosen": 10.0, "score_rejected": 2.0}) + "\n")
    return {"sft": sft_rows, "preference": preference_rows, "eval": eval_rows}


COUNTRIES = ("Spain", "Canada", "Egypt", "Kenya", "Peru", "Norway", "India", "Chile", "Greece", "Poland",
             "Mexico", "Sweden", "Turkey", "Vietnam", "Ireland", "Portugal")
THINGS = ("a river", "a volcano", "a library", "a bicycle", "a rainbow", "a forest", "a museum", "an island",
          "a desert", "a bridge", "a garden", "a lighthouse", "a violin", "a telescope", "a glacier", "a market")
ACTIVITIES = ("learning a new language", "staying focused", "saving money", "cooking rice", "running a first 5k",
              "keeping plants alive", "writing an email", "making friends at a new school", "packing for a trip",
              "drinking more water", "reading more books", "waking up early", "studying for an exam",
              "taking better photos", "keeping a desk tidy", "staying calm before a talk")
SHAPES = ("What is the capital of {country}?", "Describe {thing} in one sentence.",
          "Give me one tip for {activity}.", "Why do people like {thing}? Answer briefly.",
          "Tell me one interesting fact about {country}.", "What is {thing}? Explain it to a child.",
          "What is a good way to spend a day in {country}?", "What should I know before {activity}?")


def general_prompts(seed: int = 0, count: int = 128) -> list[str]:
    """General questions unlike the word problems and unlike configs/word-problems/general.jsonl (the forgetting
    check's held-out questions): the prompts of the replay data."""
    rng = random.Random(seed)
    prompts = sorted({shape.format(country=c, thing=t, activity=a) for shape in SHAPES for c in COUNTRIES
                      for t in THINGS for a in ACTIVITIES})
    rng.shuffle(prompts)
    return prompts[:count]


def write_replay(folder: Path, model: str, count: int = 128, max_new_tokens: int = 192) -> int:
    """general-replay.jsonl (UltraChat shape): the model's own greedy replies to general questions. Mixed into SFT,
    they keep the model answering other questions as it did: without them the model learns to end every reply
    with `Answer: <number>` (measured: SmolLM2 answered "What is the capital of France?" with "57 / Answer: 57")."""
    from tasks.blocks.generation import generate
    from tasks.machinery.modeling import load_causal_lm, load_tokenizer

    prompts = general_prompts(count=count)
    tokenizer, lm = load_tokenizer(model), load_causal_lm(model)
    replies = generate(lm, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens, 16)
    kept = 0
    with open(Path(folder) / "general-replay.jsonl", "w") as f:
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            if len(tokenizer(reply, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 2:
                continue  # cut off, not ended: training on it would teach the model to stop mid-sentence
            kept += 1
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"prompt": prompt, "prompt_id": f"wp-replay-{i}", "messages": messages}) + "\n")
    return kept


def _last_line(completion) -> str:
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def answer_format(prompts, completions, **columns) -> list[float]:
    """1.0 where the reply ends with a line `Answer: <integer>`, else 0.0."""
    return [float(bool(_ANSWER.match(_last_line(c)))) for c in completions]


def answer_correct(prompts, completions, reference=None, **columns) -> list[float]:
    """1.0 where the reply ends with `Answer: <the reference number>`, else 0.0 (the format is part of it)."""
    if reference is None:
        raise ValueError("answer_correct needs the reference answers (the eval set's `reference` column)")
    scores = []
    for completion, expected in zip(completions, reference):
        found = _ANSWER.match(_last_line(completion))
        scores.append(float(found is not None and expected is not None and found.group(1) == str(expected).strip()))
    return scores


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write the word-problem data files (seeded)")
    parser.add_argument("folder", nargs="?", default="configs/word-problems")
    parser.add_argument("--replay", metavar="MODEL", help="also write general-replay.jsonl: MODEL's own replies to "
                        "general questions (a folder; the converted SmolLM2 GGUF for the shipped file)")
    args = parser.parse_args()
    print(write_files(Path(args.folder)))
    if args.replay:
        print({"general-replay": write_replay(Path(args.folder), args.replay)})
