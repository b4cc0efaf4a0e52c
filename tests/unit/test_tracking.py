from tasks.machinery import tracking


def test_metric_names_are_sanitized():
    assert tracking.sanitize_metric_name("policy/task_accuracy") == "policy/task_accuracy"
    assert tracking.sanitize_metric_name("eval:loss@k=5") == "eval_loss_k_5"
    assert tracking.sanitize_metric_name("/rewards/chosen/") == "rewards/chosen"


def test_flatten_nested_config():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}}


def test_secrets_are_redacted():
    cfg = {"tracking": {"uri": "https://alice:s3cr3t@mlflow.example.com"}, "aws_secret_access_key": "abc",
           "token": "", "cache_key": "sft-1", "max_new_tokens": 8, "hf_token": "hf_x",
           "paths": ["s3://bucket/x", "http://u:p@h/"]}
    out = tracking.redact(cfg)
    assert out["tracking"]["uri"] == "https://***@mlflow.example.com"
    assert out["aws_secret_access_key"] == "***" and out["token"] == "" and out["cache_key"] == "sft-1"
    assert out["max_new_tokens"] == 8 and out["hf_token"] == "***"
    assert out["paths"] == ["s3://bucket/x", "http://***@h/"]
    assert "s3cr3t" not in repr(out)


def test_long_params_are_cut_with_a_marker_not_dropped(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = tracking.ensure_experiment(uri, "t")
    run_id = tracking.start_run(uri, experiment, "r", {})
    tracking.log_params(uri, run_id, {"short": 1, "long": "x" * 7000, "listy": [1, 2]})
    run = tracking.client(uri).get_run(run_id)
    assert run.data.params["short"] == "1" and run.data.params["listy"] == "[1, 2]"
    assert len(run.data.params["long"]) == tracking.MAX_PARAM_CHARS
    assert run.data.params["long"].endswith("full value in config/resolved.yaml]")
    assert run.data.tags["posttrain.params_cut"] == "long"


def test_credentials_are_stripped_for_parameters_and_found_again_in_the_local_environment(monkeypatch):
    from tasks.machinery.tracking import strip_credentials, with_local_credentials

    secret = "https://alice:pa55word@mlflow.example.com:5000"
    assert strip_credentials(secret) == "https://mlflow.example.com:5000"
    assert strip_credentials("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret)
    assert with_local_credentials("https://mlflow.example.com:5000") == secret
    assert with_local_credentials("https://mlflow.example.com:5000/") == secret
    assert with_local_credentials("https://other.example.com") == "https://other.example.com", "only the same server"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com:5000")
    assert with_local_credentials("https://mlflow.example.com:5000") == "https://mlflow.example.com:5000"


def test_a_password_in_the_recipe_moves_out_of_the_flow_parameters(monkeypatch):
    from flows.config import PipelineConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test, whatever the code sets
    cfg = PipelineConfig.model_validate({"model": {"base": "org/name"}, "tracking": {"uri": "https://u:pw@host"},
                                         **{"data": {k: {"source": "x.jsonl"} for k in ("sft", "preference", "eval")}}})
    safe = cfg.without_credentials()
    assert "pw" not in safe.model_dump_json()
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == "https://u:pw@host"
    assert safe.resolved().tracking.uri == "https://u:pw@host", "the run itself still authenticates"
