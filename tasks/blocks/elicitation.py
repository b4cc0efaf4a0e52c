"""Feedback elicitation's building blocks: the epistemic reward model (an ensemble of small heads on the
policy's features, anchored to their initialisation so their disagreement is the model's uncertainty), the
rules that choose which pair of replies to ask about (passive, boltzmann, infomax, double Thompson
sampling), the features, and the raters (a simulated one with ground truth and label noise, or a judge).
"""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.judges import JudgeSettings, check_function_spec
from tasks.machinery.training import Section

Rule = Literal["passive", "boltzmann", "infomax", "double_ts"]
RULES: tuple[str, ...] = Rule.__args__


class EnsembleSettings(Section):
    heads: int = Field(10, ge=2, description="Reward heads in the ensemble (its members).")
    hidden: int = Field(64, ge=0, description="Hidden width of each head's MLP (0: a linear head).")
    prior_weight: float = Field(1.0, ge=0, description="Strength of each head's pull towards its own random initial "
                                "weights (an L2 penalty on the distance to them); it keeps the heads apart where "
                                "no label constrains them.")
    init_scale: float = Field(1.0, gt=0, description="Scale of the heads' random initial weights (their prior spread).")
    steps: int = Field(300, ge=1, description="Full-batch Adam steps per refit (each round refits from the initial "
                       "weights on every label so far).")
    learning_rate: float = Field(1e-2, gt=0, description="Adam learning rate of the refit.")


class RaterSettings(Section):
    kind: Literal["simulated", "judge"] = Field("simulated", description="simulated: a ground-truth scorer with label "
                                                "noise (a stand-in for human raters); judge: any judge (`judge`).")
    truth: str = Field("tasks.machinery.synthetic:arithmetic_reward", description="simulated: the ground truth, a "
                       "`module:function` in TRL's reward-function form; the higher-scored reply is preferred.")
    label_noise: float = Field(0.0, ge=0, le=0.5, description="simulated: probability that a decided label is flipped "
                               "(a careless rater).")
    judge: JudgeSettings | None = Field(None, description="judge: who answers the queries (tasks/blocks/judges.py).")

    @model_validator(mode="after")
    def _has_what_it_needs(self) -> "RaterSettings":
        if self.kind == "judge" and self.judge is None:
            raise ValueError("rater kind judge needs `judge` settings")
        if self.kind == "simulated":
            check_function_spec(self.truth)
        return self


class Ensemble:
    """M small reward heads over fixed features, batched as one set of tensors. Each head is fitted to the soft
    preference labels (Bradley-Terry) plus prior_weight * ||theta - theta_init||^2: an ensemble with anchored
    priors, whose spread is the model's uncertainty."""

    def __init__(self, settings: EnsembleSettings, dim: int, seed: int):
        import torch

        self.s, self.dim = settings, dim
        g = torch.Generator().manual_seed(seed)
        m, h = settings.heads, settings.hidden
        scale = settings.init_scale
        if h:
            shapes = {"w1": (m, dim, h), "b1": (m, 1, h), "w2": (m, h, 1)}
            fan = {"w1": dim, "b1": dim, "w2": h}
        else:
            shapes, fan = {"w1": (m, dim, 1)}, {"w1": dim}
        self.init = {k: torch.randn(shape, generator=g) * scale / math.sqrt(fan[k]) for k, shape in shapes.items()}
        self.params = {k: v.clone() for k, v in self.init.items()}

    def rewards(self, x, params=None):
        """[M, N] rewards of N feature rows under every head."""
        import torch

        p = params or self.params
        if "b1" in p:
            return (torch.tanh(torch.einsum("nd,mdh->mnh", x, p["w1"]) + p["b1"]) @ p["w2"])[..., 0]
        return torch.einsum("nd,md->mn", x, p["w1"][..., 0])

    def fit(self, first, second, labels) -> float:
        """Refit every head from its initial weights on pairs (features of the first and second reply, label =
        P(first is better)); returns the mean training loss."""
        import torch

        params = {k: v.clone().requires_grad_(True) for k, v in self.init.items()}
        if len(labels) == 0:
            self.params = {k: v.detach() for k, v in params.items()}
            return 0.0
        y = torch.as_tensor(labels, dtype=torch.float32)[None, :]
        optimizer = torch.optim.Adam(params.values(), lr=self.s.learning_rate)
        n = len(labels)
        for _ in range(self.s.steps):
            optimizer.zero_grad()
            margin = self.rewards(first, params) - self.rewards(second, params)
            data = torch.nn.functional.binary_cross_entropy_with_logits(margin, y.expand_as(margin), reduction="none")
            prior = sum(((params[k] - self.init[k]) ** 2).flatten(1).sum(1) for k in params)
            loss = (data.sum(1) + self.s.prior_weight * prior).sum() / n
            loss.backward()
            optimizer.step()
        self.params = {k: v.detach() for k, v in params.items()}
        return float(data.detach().mean())

    def state(self) -> dict:
        return {"init": self.init, "params": self.params}


def select_pair(rule: str, rewards, rng: random.Random, boltzmann_temperature: float = 1.0,
                ts_draws: int = 30) -> tuple[int, int]:
    """Indices of the two candidates to show the rater, from the heads' rewards [M, K] of K distinct candidates."""
    import torch

    m, k = rewards.shape
    if rule == "passive":
        i, j = rng.sample(range(k), 2)
        return i, j
    if rule == "boltzmann":
        weights = torch.softmax(rewards.mean(0) / boltzmann_temperature, 0).tolist()
        i = rng.choices(range(k), weights)[0]
        rest = [c for c in range(k) if c != i]
        j = rng.choices(rest, [weights[c] for c in rest])[0]
        return i, j
    if rule == "infomax":
        p = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # [M, K, K]
        spread = p.var(0)
        spread.fill_diagonal_(-1.0)
        flat = int(spread.argmax())
        return flat // k, flat % k
    if rule == "double_ts":
        i = int(rewards[rng.randrange(m)].argmax())
        for _ in range(ts_draws):
            j = int(rewards[rng.randrange(m)].argmax())
            if j != i:
                return i, j
        head = rewards[rng.randrange(m)].clone()
        head[i] = -math.inf
        return i, int(head.argmax())
    raise ValueError(f"unknown selection rule {rule!r}; rules are {', '.join(RULES)}")


class Features:
    """The frozen model's last hidden state at the reply's last token, standardised by fixed statistics."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.mean = self.std = None

    @classmethod
    def load(cls, folder, trust_remote_code: bool, batch_size: int, is_reward: bool) -> "Features":
        from tasks.machinery.modeling import load_causal_lm, load_reward_model, load_tokenizer

        load = load_reward_model if is_reward else load_causal_lm
        return cls(load(folder, trust_remote_code, on_device=True).eval(), load_tokenizer(folder, trust_remote_code),
                   batch_size)

    def __call__(self, prompts: list, replies: list[str]):
        import torch

        from tasks.blocks.generation import _chat

        self.tokenizer.padding_side = "right"
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [_chat(self.tokenizer, p, r) for p, r in zip(prompts[start: start + self.batch_size],
                                                               replies[start: start + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1].float()
            last = enc["attention_mask"].sum(1) - 1
            rows.append(hidden[torch.arange(len(texts)), last].cpu())
        x = torch.cat(rows) if rows else torch.zeros(0, 1)
        if self.mean is None:
            self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-4)
        return (x - self.mean) / self.std

    def close(self):
        from tasks.machinery.modeling import free

        free(self.model)


class SimulatedRater:
    """A rater who knows the ground truth and sometimes slips: P(first better) is 1, 0 or 0.5 (equal scores), a
    decided label flipped with probability `label_noise`."""

    def __init__(self, settings: RaterSettings, seed: int):
        from tasks.blocks.judges import load_function

        self.truth, self.noise = load_function(settings.truth), settings.label_noise
        self.rng = random.Random(seed)

    def scores(self, prompts, replies) -> list[float]:
        return [float(s) for s in self.truth(prompts, [[{"role": "assistant", "content": r}] for r in replies])]

    def label(self, prompts, first, second, noisy: bool = True) -> list[float]:
        a, b = self.scores(prompts, first), self.scores(prompts, second)
        labels = []
        for x, y in zip(a, b):
            label = 0.5 if x == y else float(x > y)
            if noisy and label != 0.5 and self.rng.random() < self.noise:
                label = 1.0 - label
            labels.append(label)
        return labels

    def close(self):
        pass


class JudgeRater:
    def __init__(self, judge):
        self.judge = judge

    def label(self, prompts, first, second, noisy: bool = True) -> list[float]:
        return [float(v) for v in self.judge.prefer(prompts, first, second)]

    def close(self):
        self.judge.close()
