import json

import pytest

from tasks.store import MANIFEST, ArtifactError, ArtifactStore, Ref, safe_component


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


def test_two_writers_of_one_key_both_leave_a_complete_output(tmp_path):
    store = ArtifactStore(str(tmp_path))
    first, second = _write(store), _write(store)
    assert first == second
    assert (store.materialize(second) / "model.bin").read_bytes() == b"weights"


@pytest.mark.parametrize("name", ["..", "a/b", "", "../../etc"])
def test_names_cannot_climb_out_of_the_root(tmp_path, name):
    with pytest.raises(ValueError):
        safe_component(name)
    with pytest.raises(ValueError):
        with ArtifactStore(str(tmp_path)).write(name, "k"):
            pass
