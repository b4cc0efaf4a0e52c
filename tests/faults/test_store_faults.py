"""Faults of the artifact store: S3 failing writes (injected at the endpoint) and the disk filling up
(a corrupted output is in test_kill.py). Each ends in a completed pipeline equal to an uninterrupted
run, with nothing half-written left to be read as complete."""

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tasks.machinery.store import ArtifactStore, Ref

from .conftest import STAGES, Pipeline, digests
from .s3proxy import FaultyS3, Rule

pytestmark = pytest.mark.faults


def _stage_runs(home, stage):
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`posttrain.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def test_s3_errors_during_writes_are_retried_until_the_stage_commits(tmp_path, moto_s3, run_pipeline, reference):
    from tests.servers import s3_client

    s3_client(moto_s3["aws"]).create_bucket(Bucket="faults")
    proxy = FaultyS3(moto_s3["url"])
    # The first upload of the sft output fails as many times as the S3 client tries it (3 attempts in
    # standard retry mode; s3fs does not retry ServiceUnavailable itself), so that stage attempt fails
    # and Prefect retries the stage, whose uploads go through. Counted, not timed: the same on any machine.
    proxy.rules.append(Rule("PUT", "/faults/run/sft/", status=503, code="ServiceUnavailable",
                            message="Service is unable to handle request.", times=3))
    env = {**moto_s3["aws"], "AWS_ENDPOINT_URL": proxy.url, "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}
    try:
        code, summary, output = run_pipeline(tmp_path, "storage.root=s3://faults/run", env=env)
    finally:
        proxy.close()
    assert code == 0, output
    assert len(proxy.injected) == 3, "the client tried the failing upload 3 times"
    assert len({p.split("?")[0] for _, p, _ in proxy.injected}) == 1
    assert all(m == "PUT" and "/faults/run/sft/" in p for m, p, _ in proxy.injected)
    runs = _stage_runs(tmp_path, "sft")
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"], \
        "the upload failed past the client's retries, so one stage attempt failed and its retry completed"
    assert "Service is unable to handle request" in runs[0].data.tags["posttrain.error"]
    assert digests(summary) == reference["digests"]
    sft = next(s for s in summary["stages"] if s["name"] == "sft")
    s3 = s3_client(moto_s3["aws"])
    listed = s3.list_objects_v2(Bucket="faults", Prefix=f"run/sft/{sft['cache_key']}/")["Contents"]
    attempts = {o["Key"].split("/")[3] for o in listed if "/attempt-" in o["Key"]}
    assert len(attempts) == 1, f"failed attempts are removed from the bucket: {attempts}"


def _mount_tmpfs(path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")


def test_a_full_disk_fails_the_stage_cleanly_and_the_retry_completes_once_space_is_freed(tmp_path, prefect_api,
                                                                                            reference):
    store_dir, gate = tmp_path / "store", tmp_path / "space-freed"
    _mount_tmpfs(store_dir, "1500k")
    try:
        # The failed stage holds before its retry until the test has freed space: one event after the
        # other, whatever the machine's speed.
        p = Pipeline(tmp_path, prefect_api, f"storage.root={store_dir}", "orchestration.retry_delay_seconds=[0]",
                     env={"POSTTRAIN_HOLD_AT": f"*:retry={gate}"})
        p.wait_for_line(r"No space left on device.*transient, retrying", timeout=300)
        p.wait_for_line(r"held at \w+:retry", timeout=60)
        used = subprocess.run(["df", "--output=used", str(store_dir)], capture_output=True, text=True).stdout
        subprocess.run(["mount", "-o", "remount,size=64m", str(store_dir)], check=True)
        gate.touch()
        code, summary = p.wait()
        assert code == 0, p.output()
        assert digests(summary) == reference["digests"]
        store = ArtifactStore(str(store_dir))
        for stage in summary["stages"]:
            assert store.problem(Ref(stage["output_uri"], stage["output_digest"])) is None
            assert len(list((store_dir / stage["kind"] / stage["cache_key"]).glob("attempt-*"))) == 1, \
                f"{stage['name']}: the attempt that hit the full disk was removed"
        full = [(s, r) for s in STAGES for r in _stage_runs(tmp_path, s) if r.info.status == "FAILED"]
        assert len(full) == 1, f"one stage attempt failed on the full disk (df used: {used}): {full}"
        assert "No space left on device" in full[0][1].data.tags["posttrain.error"]
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], capture_output=True)
