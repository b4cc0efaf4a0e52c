"""What a run records of its hardware, and what `posttrain reproduce` promises from it."""

from flows.reproduce import CROSS_HARDWARE_ATOL, CROSS_HARDWARE_RTOL, Recorded, Tolerance, compare
from tasks.machinery import hardware


def test_the_description_names_cpu_kernels_threads_and_build():
    info = hardware.describe()
    for key in ("machine", "cpu_model", "cpu_flags", "cpu_capability", "torch_threads", "torch", "cuda", "gpus"):
        assert str(info[key]), key
    import torch

    assert info["torch_threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    tags = hardware.as_tags(info)
    assert hardware.from_tags({**tags, "other": "x"}) == {k: str(v) for k, v in info.items()}


def test_differences_name_what_changes_the_numbers_and_ignore_what_does_not():
    info = {k: str(v) for k, v in hardware.describe().items()}
    assert hardware.differences(info, info) == []
    assert hardware.differences(info, {**info, "cpu_model": "another CPU, same instructions"}) == []
    moved = hardware.differences(info, {**info, "torch_threads": "64", "cpu_capability": "DEFAULT"})
    assert moved == [f"cpu_capability: {info['cpu_capability']} -> DEFAULT", f"torch_threads: {info['torch_threads']} -> 64"]


def _recorded(metrics, digests, machine):
    return Recorded("run", {}, {}, {}, metrics, digests, {}, {"pipeline": machine, "sft": machine})


def test_same_hardware_demands_exact_equality():
    tolerance = Tolerance.for_hardware(False, None, None)
    assert tolerance.describe() == "exact equality" and tolerance.digests_must_match
    rec = _recorded({"a": 0.5, "b": 1.0}, {"sft": "d1"}, {})
    summary = {"metrics": {"a": 0.5, "b": 1.0000001}, "stages": [{"name": "sft", "output_digest": "d1"}]}
    assert [r[3] for r in compare(rec, summary, tolerance)] == ["equal", "differs", "equal"]


def test_other_hardware_compares_within_the_printed_tolerance_and_shows_digests():
    tolerance = Tolerance.for_hardware(True, None, None)
    assert (tolerance.rtol, tolerance.atol) == (CROSS_HARDWARE_RTOL, CROSS_HARDWARE_ATOL)
    assert str(CROSS_HARDWARE_ATOL) in tolerance.describe() and not tolerance.digests_must_match
    rec = _recorded({"acc": 0.67, "loss": 2.0, "far": 0.2}, {"sft": "d1"}, {})
    summary = {"metrics": {"acc": 0.69, "loss": 2.0, "far": 0.6}, "stages": [{"name": "sft", "output_digest": "d2"}]}
    rows = {r[0]: r[3] for r in compare(rec, summary, tolerance)}
    assert rows == {"acc": "within tolerance", "loss": "equal", "far": "differs", "sft output digest": "differs (expected)"}
    assert Tolerance.for_hardware(True, 0.0, 0.0).describe() == "exact equality", "the user's tolerance wins"


def test_a_stage_computed_on_another_machine_is_named():
    here = {k: str(v) for k, v in hardware.describe().items()}
    rec = Recorded("run", {}, {}, {}, {}, {}, {}, {"pipeline": here, "sft": {**here, "gpus": "NVIDIA H200"}})
    assert rec.hardware_differences(here) == [f"sft: gpus: NVIDIA H200 -> {here['gpus']}"]
