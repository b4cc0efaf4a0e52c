"""Judges: one interface over a rule, a local model and an OpenAI-compatible endpoint; prompts versioned in the
MLflow prompt registry. The endpoint tests talk to a real local HTTP server (tests/openai_server.py, its own
process) that judges by a deterministic rule, the demo's arithmetic checker."""

import logging

import pytest

from tasks.blocks.endpoints import EndpointError
from tasks.blocks.judges import (JudgeSettings, VerdictCache, build_judge, judge_prompts, judge_sources,
                          parse_verdict, prompt_ref, render)
from tests.servers import OpenAIServer

KEY = "sk-test-never-logged-0123456789"
Q = [[{"role": "user", "content": "What is 7 plus 5?"}], [{"role": "user", "content": "Add 2 and 3."}]]


@pytest.fixture
def server_factory(tmp_path):
    servers = []

    def start(*args):
        servers.append(OpenAIServer(tmp_path, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def registry(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def endpoint_judge(server, registry, tmp_path, modes=("score", "compare"), **settings):
    cfg = JudgeSettings(backend="endpoint", url=server.url, model="rule-judge", api_key_env="TEST_JUDGE_KEY",
                        retry_backoff_seconds=0.01, **settings)
    refs = judge_sources(cfg, modes, "judge", registry)
    return build_judge(cfg, judge_prompts(refs, "judge"), tracking_uri=registry,
                       cache=VerdictCache(tmp_path / "verdicts.sqlite"))


def test_endpoint_judge_scores_and_compares_through_the_openai_api(server_factory, registry, tmp_path, monkeypatch,
                                                                     caplog):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server = server_factory("--api-key", KEY)
    judge = endpoint_judge(server, registry, tmp_path)
    caplog.set_level(logging.DEBUG)
    assert judge.score(Q, ["12", "6"]) == [10.0, 1.0]
    # Both orders: a right reply beats a wrong one whichever way round; the server's position bias (it says A
    # when it cannot tell) cancels out to 0.5.
    assert judge.prefer(Q, ["12", "6"], ["2", "5"]) == [1.0, 0.0]
    assert judge.prefer(Q, ["12", "9"], ["12", "4"]) == [0.5, 0.5]
    assert judge.as_reward_function()(Q, [[{"role": "assistant", "content": "12"}]] * 2) == [10.0, 1.0]
    asked = server.stats()
    assert any("Question: What is 7 plus 5?" in p and "Reply: 12" in p for p in asked["prompts"])
    seen = asked["requests"]
    # A second ask comes from the verdict cache: no request reaches the server.
    assert judge.score(Q, ["12", "6"]) == [10.0, 1.0] and server.stats()["requests"] == seen
    assert KEY not in caplog.text and KEY.encode() not in (tmp_path / "verdicts.sqlite").read_bytes()


def test_endpoint_judge_sends_requests_concurrently(server_factory, registry, tmp_path):
    server = server_factory("--delay", "1.0")
    judge = endpoint_judge(server, registry, tmp_path, modes=("score",), concurrency=8)
    replies = [str(n) for n in range(16)]
    assert judge.score([Q[0]] * 16, replies) == [10.0 if r == "12" else 1.0 for r in replies]
    assert server.stats()["max_in_flight"] > 1, "requests were sent one at a time"
    assert server.stats()["max_in_flight"] <= 8


def test_a_slow_endpoint_times_out_with_a_clear_error(server_factory, registry, tmp_path):
    server = server_factory("--delay", "3")
    judge = endpoint_judge(server, registry, tmp_path, modes=("score",), timeout_seconds=0.2, retries=1)
    with pytest.raises(EndpointError, match=r"no answer within 0.2 s after 2 attempts"):
        judge.score(Q[:1], ["12"])


def test_a_failing_endpoint_is_retried_then_reported(server_factory, registry, tmp_path, monkeypatch):
    flaky = server_factory("--fail-first", "2", "--status", "503")
    assert endpoint_judge(flaky, registry, tmp_path, modes=("score",), retries=2).score(Q[:1], ["12"]) == [10.0]
    assert flaky.stats()["requests"] == 3, "two 503s, then the answer"
    down = server_factory("--fail-first", "1000", "--status", "500")
    with pytest.raises(EndpointError, match=r"HTTP 500 after 3 attempts"):
        endpoint_judge(down, registry, tmp_path / "b", modes=("score",), retries=2).score(Q[:1], ["7"])
    monkeypatch.setenv("TEST_JUDGE_KEY", "wrong")
    locked = server_factory("--api-key", KEY)
    with pytest.raises(EndpointError, match=r"HTTP 401"):
        endpoint_judge(locked, registry, tmp_path / "c", modes=("score",), retries=3).score(Q[:1], ["12"])
    assert locked.stats()["requests"] == 1, "a refused key is not retried"


def test_judge_prompts_are_versioned_in_the_prompt_registry(registry):
    from mlflow import MlflowClient

    cfg = JudgeSettings(backend="endpoint", url="http://127.0.0.1:1/v1", model="m")
    first = prompt_ref(cfg, "score", registry)
    assert first["uri"] == "prompts:/posttrain-judge-endpoint-score/1"
    assert prompt_ref(cfg, "score", registry) == first, "the same text is the same version"
    edited = cfg.model_copy(update={"prompt": "Score 1-10.\nQuestion: {{question}}\nReply: {{answer}}"})
    second = prompt_ref(edited, "score", registry)
    assert second["uri"].endswith("/2") and second["digest"] != first["digest"], "an edit is a new version and key"
    pinned = cfg.model_copy(update={"prompt": "prompts:/posttrain-judge-endpoint-score/1"})
    assert prompt_ref(pinned, "score", registry) == first
    version = MlflowClient(registry).load_prompt("prompts:/posttrain-judge-endpoint-score/2")
    assert "{{question}}" in version.template
    with pytest.raises(ValueError, match=r"a compare prompt uses \{\{answer_a\}\}, \{\{answer_b\}\}, \{\{question\}\}"):
        prompt_ref(edited, "compare", registry)
    with pytest.raises(ValueError, match="not in the MLflow prompt registry"):
        prompt_ref(cfg.model_copy(update={"prompt": "prompts:/nope/9"}), "score", registry)


def test_judge_settings_say_what_a_backend_needs():
    with pytest.raises(ValueError, match="judge backend 'endpoint' needs url and model"):
        JudgeSettings(backend="endpoint")
    with pytest.raises(ValueError, match="expected module:function"):
        JudgeSettings(backend="rule", function="tasks.machinery.synthetic")
    rule = build_judge(JudgeSettings(backend="rule", function="tasks.machinery.synthetic:arithmetic_reward"))
    assert rule.score(Q, ["12", "5"]) == [1.0, 1.0] and rule.prefer(Q, ["12", "4"], ["2", "5"]) == [1.0, 0.0]
    assert parse_verdict("score", "Score: 7/10") == 7.0 and parse_verdict("compare", "B.") == 0.0
    assert parse_verdict("compare", "neither") == 0.5
    with pytest.raises(EndpointError, match="no score"):
        parse_verdict("score", "great answer")
    with pytest.raises(ValueError, match=r"unknown variable \{\{answr\}\}"):
        render("{{answr}}", answer="x")


def test_a_local_model_judges_from_its_next_token_probabilities(tmp_path, registry):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.machinery.modeling import build_tokenizer, save_model

    texts = ["What is 7 plus 5? 12 Yes No A B"] * 20
    tokenizer = build_tokenizer(texts, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config), tokenizer, tmp_path / "judge")
    cfg = JudgeSettings(backend="hf_model")
    refs = judge_sources(cfg, ("score", "compare"), "judge", registry)
    judge = build_judge(cfg, judge_prompts(refs, "judge"), judge_model=tmp_path / "judge", tracking_uri=registry,
                        cache=VerdictCache(tmp_path / "verdicts.sqlite"))
    scores = judge.score(Q, ["12", "6"])
    assert all(0.0 < s < 1.0 for s in scores) and judge.score(Q, ["12", "6"]) == scores
    forward = judge.prefer(Q, ["12", "6"], ["2", "5"])
    backward = judge.prefer(Q, ["2", "5"], ["12", "6"])
    assert forward == pytest.approx([1 - b for b in backward]), "asked both ways round, the verdict is symmetric"
    with pytest.raises(ValueError, match="the stage has no `judge` input"):
        build_judge(cfg, judge_prompts(refs, "judge"), tracking_uri=registry)


def test_an_endpoint_judges_every_pair_of_models_for_the_win_rate_matrix(server_factory, registry, tmp_path,
                                                                          monkeypatch):
    """evaluate's pairwise verdicts from a compare-only endpoint judge: one ask per pair and prompt (both orders),
    never a score; the verdicts read both ways."""
    from tasks.kinds.evaluate import win_rates

    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server = server_factory("--api-key", KEY)
    judge = endpoint_judge(server, registry, tmp_path, modes=("compare",))
    assert judge.scores_of(Q, {"right": ["12", "5"]}) is None  # compares pairs: no per-reply score
    answers = {"right": ["12", "5"], "wrong": ["2", "6"], "half": ["12", "6"]}
    pairs = [("right", "wrong"), ("right", "half"), ("wrong", "half")]
    judged = win_rates(Q, answers, pairs, None, judge)
    assert judged["right/win_rate_vs_wrong"] == [1.0, 1.0] and judged["wrong/win_rate_vs_right"] == [0.0, 0.0]
    assert judged["right/win_rate_vs_half"] == [0.5, 1.0] and judged["half/win_rate_vs_wrong"] == [1.0, 0.5]
    asked = server.stats()
    assert asked["requests"] == len(set(asked["prompts"])) <= 2 * len(pairs) * len(Q)  # a repeated ask is cached


def test_a_rule_judge_scores_each_models_replies_once():
    """evaluate's judge_score and, from those scores, the pairwise verdicts of a scoring judge."""
    from tasks.kinds.evaluate import win_rates

    judge = build_judge(JudgeSettings(backend="rule", function="tasks.machinery.synthetic:arithmetic_reward"))
    answers = {"right": ["12", "5"], "wrong": ["2", "6"], "half": ["12", "6"]}
    scores = judge.scores_of(Q, answers)
    assert scores == {"right": [1.0, 1.0], "wrong": [0.0, 0.0], "half": [1.0, 0.0]}
    judged = win_rates(Q, answers, [("right", "half"), ("wrong", "half")], scores)
    assert judged["right/win_rate_vs_half"] == [0.5, 1.0] and judged["half/win_rate_vs_wrong"] == [1.0, 0.5]
