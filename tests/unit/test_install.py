"""The install the README gives is the one CI runs, and its constraints file pins a consistent set."""

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_dependency_but_torch():
    pins = _constraints()
    assert "torch" not in pins and not any(n.startswith(("nvidia-", "triton")) for n in pins), \
        "torch is installed first, a CPU or CUDA build; pinning it (or its CUDA libraries) here would fight that"
    requirements = importlib.metadata.requires("posttrain") or []
    direct = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]).lower() for r in requirements}
    assert direct - {"torch"} <= set(pins), f"unpinned direct dependencies: {sorted(direct - {'torch'} - set(pins))}"


def test_the_aws_client_stack_is_pinned_to_one_consistent_release():
    pins = _constraints()
    assert pins["boto3"] == pins["botocore"], "boto3 and botocore are released in lockstep"
    # aiobotocore (what s3fs uses) allows a narrow botocore range; the pinned botocore is inside it.
    requirement = next(r for r in importlib.metadata.requires("aiobotocore") if r.startswith("botocore"))
    low, high = re.search(r">=([\d.]+)", requirement).group(1), re.search(r"<([\d.]+)", requirement).group(1)
    version = tuple(map(int, pins["botocore"].split(".")))
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split("."))), requirement


def test_ci_runs_the_readme_test_command_verbatim_in_a_fresh_virtualenv():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = ('pip install torch==2.13.0 uv==0.13.9 && uv pip install --system-certs --compile-bytecode -c constraints.txt '
               '-e ".[test,ray,docs]" && mkdocs build --strict && python -m pytest')
    assert f"```bash\n{command}\n```" in readme and f"\n{command}\n" in ci
    assert f"```bash\n{command}\n```" in (ROOT / "docs" / "tests.md").read_text()
    assert "python3 -m venv" in ci and 'source "$venv/bin/activate"' in ci
    assert "pip install torch==2.13.0 uv==0.13.9 && uv pip install --system-certs --compile-bytecode -c constraints.txt -e . && posttrain run" in readme


def test_a_test_file_is_one_group_that_one_worker_runs(request):
    """The suite runs each test file (the fault suite: its folder) on one xdist worker, so a module's or a
    session's fixtures are built once, not on both workers. pytest 9.2 with pytest-xdist 3.8 silently dropped
    the grouping (pytest-xdist#1386: the group suffix is written to a node-id field pytest no longer reads), which
    doubled the longest fixtures' time; the suffix on this test's own id says the grouping is in force."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs only on a pytest-xdist worker with --dist loadgroup (the suite's default)")
    assert request.node.nodeid.endswith("@unit/test_install"), request.node.nodeid
