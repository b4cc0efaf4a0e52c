"""A teacher: the model or OpenAI-compatible endpoint that writes replies for synthetic data (synthesize) and
candidate prompts (prompt_search)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.endpoints import EndpointSettings


class TeacherSettings(EndpointSettings):
    backend: Literal["model", "endpoint"] = Field("model", description="model: the stage's `teacher` input (a local "
                                                  "or Hub model, or a policy of this pipeline); endpoint: an "
                                                  "OpenAI-compatible chat API (`url`, `model`).")
    system: str | None = Field(None, description="A system message the teacher is given before each prompt (not "
                               "kept in the data).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy, one distinct reply).")
    max_new_tokens: int = Field(256, ge=1, description="Longest reply, in tokens.")
    batch_size: int = Field(64, ge=1, description="model: prompts per generation batch.")

    @model_validator(mode="after")
    def _endpoint_has_url(self) -> "TeacherSettings":
        if self.backend == "endpoint":
            self.check_endpoint("teacher")
        return self


def teach(cfg: TeacherSettings, teacher, prompts: list[str], samples: int, seed: int,
          trust_remote_code: bool = False) -> list[list[str]]:
    """`samples` replies per prompt from the teacher model (a folder or Hub id) or endpoint."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    chats = [system + [{"role": "user", "content": p}] for p in prompts]
    if cfg.backend == "endpoint":
        from tasks.blocks.endpoints import ChatEndpoint

        flat = ChatEndpoint(cfg, "teacher").complete_many([c for c in chats for _ in range(samples)],
                                                          cfg.max_new_tokens, cfg.temperature)
        return [[r.strip() for r in flat[i * samples: (i + 1) * samples]] for i in range(len(prompts))]
    from tasks.blocks.generation import sample_replies
    from tasks.machinery.modeling import free, load_causal_lm, load_tokenizer

    model = load_causal_lm(teacher, trust_remote_code, on_device=True)
    try:
        return sample_replies(model, load_tokenizer(teacher, trust_remote_code), chats, samples, cfg.max_new_tokens,
                              cfg.temperature, seed, cfg.batch_size)
    finally:
        free(model)
