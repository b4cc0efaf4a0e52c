"""`posttrain gc`: lists what no run needs, deletes it only with --yes, and keeps everything else."""

import os
import time

from flows.gc import delete, find_garbage
from tasks.machinery.store import ArtifactStore


def _commit(store, area, key, text="x"):
    with store.write(area, key) as out:
        (out.path / "f.txt").write_text(text)
    return out.ref


def _age(path, hours):
    old = time.time() - hours * 3600
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (old, old))
    os.utime(path, (old, old))


def test_gc_finds_each_kind_of_garbage_and_deletes_only_with_yes(tmp_path):
    store = ArtifactStore(str(tmp_path))
    kept = _commit(store, "sft", "sft-kept")
    stale = _commit(store, "sft", "sft-stale")
    _commit(store, "sft.checkpoints", "sft-kept-step000000004")
    _commit(store, "sft.checkpoints", "sft-running-step000000004")  # its stage has not committed: keep
    bad = _commit(store, "dpo", "dpo-bad")
    store.quarantine(bad.uri, "model.safetensors does not match its digest")
    old_orphan = tmp_path / "sft" / "sft-kept" / "attempt-deadbeef0001"
    old_orphan.mkdir()
    (old_orphan / "f.txt").write_text("half")
    _age(old_orphan, 48)
    young_orphan = tmp_path / "sft" / "sft-kept" / "attempt-deadbeef0002"  # maybe being written right now
    young_orphan.mkdir()

    found = find_garbage(store, referenced={kept.uri}, min_age_hours=24)
    reasons = {os.path.relpath(g.path, tmp_path): g.reason for g in found}
    assert reasons["sft/sft-kept/attempt-deadbeef0001"] == "orphaned attempt (never committed)"
    assert reasons["sft.checkpoints/sft-kept-step000000004"] == "checkpoint of the committed output sft/sft-kept"
    assert reasons["sft/sft-stale"] == "output no recent run references"
    assert any(p.startswith("dpo/dpo-bad/MANIFEST.json.corrupt-") and "does not match" in r for p, r in reasons.items())
    assert any(p.startswith("dpo/dpo-bad/attempt-") for p in reasons)
    assert not any("deadbeef0002" in p or "sft-running" in p or p == "sft/sft-kept" for p in reasons)
    assert all(g.bytes >= 0 for g in found)

    assert store.lookup("sft", "sft-stale") is not None, "a dry run deletes nothing"
    delete(store, found)
    assert store.lookup("sft", "sft-stale") is None and not (tmp_path / "sft" / "sft-stale").exists()
    assert store.lookup("sft", "sft-kept") == kept and store.materialize(kept).joinpath("f.txt").read_text() == "x"
    assert not old_orphan.exists() and young_orphan.exists()
    assert store.list_keys("sft.checkpoints") == ["sft-running-step000000004"]
    assert find_garbage(store, referenced={kept.uri}, min_age_hours=24) == []
    assert stale.uri != kept.uri


def test_without_tracking_every_committed_output_is_kept(tmp_path):
    store = ArtifactStore(str(tmp_path))
    _commit(store, "sft", "sft-a")
    assert find_garbage(store, referenced=None) == []


def test_cli_lists_then_deletes_and_has_a_version(tmp_path, monkeypatch, capsys):
    import pytest

    from flows.cli import main

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    store = ArtifactStore(str(tmp_path / "store"))
    _commit(store, "sft", "sft-a")
    (tmp_path / "store" / "sft" / "sft-a" / "attempt-orphan00001").mkdir()
    args = ["gc", "--storage-root", str(tmp_path / "store"), "--keep-days", "0", "--min-age-hours", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "orphaned attempt" in out and "run again with --yes to delete" in out
    assert (tmp_path / "store" / "sft" / "sft-a" / "attempt-orphan00001").exists()
    assert main([*args, "--yes"]) == 0
    assert "deleted 1 item(s)" in capsys.readouterr().out
    assert not (tmp_path / "store" / "sft" / "sft-a" / "attempt-orphan00001").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("posttrain ")


def test_the_base_of_a_kept_adapter_is_kept(tmp_path):
    import json

    def adapter(area, key, base):
        with store.write(area, key) as out:
            (out.path / "adapter_config.json").write_text("{}")
            (out.path / "adapter_base.json").write_text(json.dumps({"uri": base.uri, "digest": base.digest}))
        return out.ref

    store = ArtifactStore(str(tmp_path))
    full = _commit(store, "sft", "sft-full")
    lora = adapter("sft", "sft-lora", full)
    dpo = adapter("dpo", "dpo-lora", lora)  # an adapter over an adapter over full weights
    _commit(store, "sft", "sft-unused")
    found = {os.path.relpath(g.path, tmp_path) for g in find_garbage(store, referenced={dpo.uri})}
    assert found == {"sft/sft-unused"}, "the adapter's base, and that base's base, stay"
