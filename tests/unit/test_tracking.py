from tasks import tracking


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
