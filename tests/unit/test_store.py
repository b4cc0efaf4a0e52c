import json
from pathlib import Path

import pytest

from tasks.machinery.store import MANIFEST, ArtifactError, ArtifactStore, Ref, safe_component


def _write(store, stage="sft", key="sft-abc", content=b"weights"):
    with store.write(stage, key) as out:
        (out.path / "model.bin").write_bytes(content)
        (out.path / "sub").mkdir()
        (out.path / "sub" / "config.json").write_text("{}")
    return out.ref


def test_commit_writes_manifest_last_and_reads_back(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    ref = _write(store)
    assert ref.uri == f"{store.root_uri}/sft/sft-abc"
    manifest = json.loads((tmp_path / "root" / "sft" / "sft-abc" / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.bin", "sub/config.json"}
    local = store.materialize(ref)
    assert (local / "model.bin").read_bytes() == b"weights"
    assert store.lookup("sft", "sft-abc") == ref


def test_same_content_gives_same_digest(tmp_path):
    a = _write(ArtifactStore(str(tmp_path / "a")))
    b = _write(ArtifactStore(str(tmp_path / "b")))
    assert a.digest == b.digest
    assert _write(ArtifactStore(str(tmp_path / "c")), content=b"other").digest != a.digest


def test_a_stage_that_dies_half_way_leaves_nothing_complete(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.write("sft", "sft-x") as out:
            (out.path / "half.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert store.lookup("sft", "sft-x") is None
    assert not list((tmp_path / "sft" / "sft-x").glob("attempt-*"))


def test_an_orphan_attempt_without_manifest_is_not_an_output(tmp_path):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "sft" / "sft-y" / "attempt-dead").mkdir(parents=True)
    (tmp_path / "sft" / "sft-y" / "attempt-dead" / "model.bin").write_bytes(b"partial")
    assert store.lookup("sft", "sft-y") is None
    with pytest.raises(ArtifactError, match="no MANIFEST.json"):
        store.materialize(Ref(uri=store.uri_for("sft", "sft-y"), digest="0" * 64))


def test_empty_output_is_refused(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ArtifactError, match="wrote no files"):
        with store.write("sft", "sft-z"):
            pass
    assert store.lookup("sft", "sft-z") is None


def test_corruption_is_detected(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ref = _write(store)
    attempt = next((tmp_path / "sft" / "sft-abc").glob("attempt-*"))
    (attempt / "model.bin").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="model.bin does not match its recorded sha256"):
        store.materialize(ref)
    with pytest.raises(ArtifactError, match="not the expected"):
        store.materialize(Ref(uri=ref.uri, digest="f" * 64))


def test_a_second_writer_of_one_key_keeps_the_first_output_and_removes_its_own(tmp_path):
    store = ArtifactStore(str(tmp_path))
    first = _write(store)
    with store.write("sft", "sft-abc") as late:
        (late.path / "model.bin").write_bytes(b"weights")
    assert late.ref == first and late.superseded_by["digest"] == first.digest
    assert len(list((tmp_path / "sft" / "sft-abc").glob("attempt-*"))) == 1, "the loser's attempt is removed"
    assert (store.materialize(first) / "model.bin").read_bytes() == b"weights"


def test_racing_writers_leave_exactly_one_output(tmp_path):
    """Eight writers commit the same key at the same moment: one manifest, one attempt, one reference."""
    import threading

    store, barrier, refs = ArtifactStore(str(tmp_path)), threading.Barrier(8), []

    def writer(i):
        with store.write("sft", "sft-race") as out:
            (out.path / "model.bin").write_bytes(b"weights")
            barrier.wait()
        refs.append(out.ref)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(refs)) == 1 and len(refs) == 8
    manifest = json.loads((tmp_path / "sft" / "sft-race" / MANIFEST).read_text())
    assert [p.name for p in (tmp_path / "sft" / "sft-race").glob("attempt-*")] == [manifest["attempt"]]
    assert not list((tmp_path / "sft" / "sft-race").glob(".MANIFEST*")), "no temporary manifest is left"


def test_a_corrupted_output_is_named_and_quarantined(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ref = _write(store)
    assert store.problem(ref) is None
    attempt = next((tmp_path / "sft" / "sft-abc").glob("attempt-*"))
    (attempt / "model.bin").write_bytes(b"weightz")
    problem = store.problem(ref)
    assert "model.bin does not match its recorded sha256" in problem
    aside = store.quarantine(ref.uri, problem)
    assert store.lookup("sft", "sft-abc") is None, "the key is free to be computed again"
    assert (attempt / "model.bin").exists(), "the bad files stay for inspection"
    assert "model.bin" in Path(aside + ".reason.txt").read_text()
    assert _write(store) == ref, "a recomputed output takes the key"


def test_a_corrupted_checkpoint_falls_back_to_an_older_one(tmp_path):
    from tasks.machinery.checkpoints import StoreCheckpoints

    store = ArtifactStore(str(tmp_path))
    for step in (4, 8):
        with store.write("sft.checkpoints", f"k-step{step:09d}") as out:
            (out.path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    newest = next((tmp_path / "sft.checkpoints" / "k-step000000008").glob("attempt-*"))
    (newest / "trainer_state.json").write_text("{}")
    latest = StoreCheckpoints(store, "sft", "k").latest()
    assert json.loads((latest / "trainer_state.json").read_text())["global_step"] == 4
    assert store.lookup("sft.checkpoints", "k-step000000008") is None


def test_on_s3_the_first_commit_wins_and_corruption_is_found_by_size(s3_env):
    from tests.servers import s3_client

    s3_client(s3_env["aws"]).create_bucket(Bucket="store-unit")
    store = ArtifactStore("s3://store-unit/root")
    first = _write(store)
    with store.write("sft", "sft-abc") as late:
        (late.path / "model.bin").write_bytes(b"weights")
    assert late.ref == first and late.superseded_by is not None
    assert len([p for p in store.fs.ls("store-unit/root/sft/sft-abc", refresh=True) if "attempt-" in p]) == 1
    assert store.problem(first) is None
    manifest = store.read_manifest(first.uri)
    store.fs.pipe_file(f"store-unit/root/sft/sft-abc/{manifest['attempt']}/model.bin", b"short")
    assert "model.bin is missing or has the wrong size" in store.problem(first)
    store.quarantine(first.uri, "test")
    assert store.lookup("sft", "sft-abc") is None


@pytest.mark.parametrize("name", ["..", "a/b", "", "../../etc"])
def test_names_cannot_climb_out_of_the_root(tmp_path, name):
    with pytest.raises(ValueError):
        safe_component(name)
    with pytest.raises(ValueError):
        with ArtifactStore(str(tmp_path)).write(name, "k"):
            pass


def test_a_model_named_by_its_path_inside_the_store_is_read_where_it_is(tmp_path):
    from tasks.machinery.modeling import resolve_model
    from tasks.machinery.context import materialize_input

    store = ArtifactStore(str(tmp_path / "store"))
    with store.write("sft", "sft-abc") as pending:
        (pending.path / "config.json").write_text("{}")
        (pending.path / "model.safetensors").write_bytes(b"weights")
    attempt = next(Path(pending.ref.uri).glob("attempt-*"))
    assert materialize_input(store, resolve_model(str(attempt))) == attempt, "an earlier run's model folder"
    assert (materialize_input(store, pending.ref.to_dict()) / "model.safetensors").read_bytes() == b"weights", \
        "a stage output is still read (and verified) through its manifest"


def test_an_unchanged_local_output_is_verified_without_reading_it_again(tmp_path, monkeypatch):
    import os

    from tasks.machinery import store as store_module

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    store = ArtifactStore(str(tmp_path / "root"))
    ref = _write(store)
    attempt = next((tmp_path / "root" / "sft" / "sft-abc").glob("attempt-*"))
    reads = []
    monkeypatch.setattr(store_module, "sha256_file", lambda p, real=store_module.sha256_file: reads.append(p) or real(p))
    store.materialize(ref)
    assert reads, "files written just now are racy: hashed again"
    for f in (p for p in attempt.rglob("*") if p.is_file()):  # as if written a minute ago
        os.utime(f, ns=(f.stat().st_mtime_ns - 60 * 10**9,) * 2)
    store.materialize(ref)
    reads.clear()
    store.materialize(ref)
    assert not reads, "an unchanged file's stamp is trusted"
    weights = attempt / "model.bin"
    weights.write_bytes(b"weightz")  # same size; the write moves the modification time
    os.utime(weights, ns=(weights.stat().st_mtime_ns - 30 * 10**9,) * 2)
    with pytest.raises(ArtifactError, match="model.bin does not match its recorded sha256"):
        store.materialize(ref)
