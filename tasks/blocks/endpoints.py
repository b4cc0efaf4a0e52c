"""An OpenAI-compatible chat API as a client: how to reach it (`EndpointSettings`: URL, model, the API key read
from an environment variable and never logged) and `ChatEndpoint` (concurrent requests, timeouts, retries
with back-off on timeouts, transport errors, 429 and 5xx). Judges and teachers ask through it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pydantic import Field

from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")


class EndpointSettings(Section):
    """How to reach an OpenAI-compatible chat API (a judge's, a teacher's)."""

    model: str | None = Field(None, description="endpoint: the model name sent with each request.")
    url: str | None = Field(None, description="endpoint: base URL of the API, e.g. http://127.0.0.1:8000/v1 "
                            "(requests go to <url>/chat/completions).")
    api_key_env: str = Field("OPENAI_API_KEY", description="endpoint: the environment variable holding the API key "
                             "(read at run time; the key itself is never in a recipe, log or cache key).")
    concurrency: int = Field(8, ge=1, description="endpoint: requests in flight at once.")
    timeout_seconds: float = Field(60.0, gt=0, description="endpoint: seconds before one request is given up.")
    retries: int = Field(3, ge=0, description="endpoint: retries of a request that timed out or got a 429/5xx.")
    retry_backoff_seconds: float = Field(1.0, ge=0, description="endpoint: wait before the first retry; doubles "
                                         "with each further one (at most 30 s).")

    def check_endpoint(self, who: str) -> None:
        missing = [name for name in ("url", "model") if not getattr(self, name)]
        if missing:
            raise ValueError(f"{who} backend 'endpoint' needs {' and '.join(missing)}")


class EndpointError(RuntimeError):
    pass


class ChatEndpoint:
    """An OpenAI-compatible chat API: POST <url>/chat/completions, `concurrency` requests in flight, each with a
    timeout and retries with back-off on timeouts, transport errors, 429 and 5xx. `role` names it in errors and
    progress lines (a judge, a teacher)."""

    def __init__(self, cfg: EndpointSettings, role: str = "judge"):
        self.cfg, self.role = cfg, role
        self.url = cfg.url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict:
        key = os.environ.get(self.cfg.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def complete_many(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0,
                      parse=None, what: str = "replies") -> list:
        """Each conversation's reply (through `parse`, when given), in order."""
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        started, done = time.monotonic(), [0]
        lock = threading.Lock()

        with httpx.Client(timeout=self.cfg.timeout_seconds, headers=self._headers()) as http:
            def ask(messages: list[dict]):
                body = {"model": self.cfg.model, "messages": messages, "temperature": temperature,
                        "max_tokens": max_tokens}
                reply = self._request(http, body)
                value = parse(reply) if parse else reply
                with lock:
                    done[0] += 1
                    if done[0] % 100 == 0 or done[0] == len(conversations):
                        logger.info("%s %s: %d/%d %s (%.0f s)", self.role, self.cfg.model, done[0], len(conversations),
                                    what, time.monotonic() - started)
                return value

            with ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix=self.role) as pool:
                return list(pool.map(ask, conversations))

    def _request(self, http, body: dict) -> str:
        import httpx

        problem = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(self.cfg.retry_backoff_seconds * 2.0 ** (attempt - 1), 30.0))
            try:
                response = http.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"no answer within {self.cfg.timeout_seconds:g} s"
                continue
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:  # a bad model name, a bad key: asking again will not help
                raise EndpointError(f"{self.role} endpoint {self.url}: HTTP {response.status_code}: "
                                    f"{response.text[:300]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise EndpointError(f"{self.role} endpoint {self.url}: not an OpenAI chat completion: "
                                    f"{response.text[:300]}") from None
        raise EndpointError(f"{self.role} endpoint {self.url}: {problem} after {self.cfg.retries + 1} attempts")
