import json
from pathlib import Path

import pytest

from tasks.machinery import synthetic
from tests.conftest import posttrain_home

ROOT = Path(__file__).resolve().parents[2]


def tiny_settings(stage: str) -> dict:
    """configs/tiny.yaml's settings of one stage, without its kind and inputs: the tiny size for test recipes."""
    import yaml

    instance = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["stages"][stage]
    return {k: v for k, v in instance.items() if k not in ("kind", "inputs")}


@pytest.fixture(scope="session", autouse=True)
def prefect_server(prefect_harness):
    yield


@pytest.fixture(scope="module")
def state_home(tmp_path_factory):
    with posttrain_home(tmp_path_factory.mktemp("posttrain-home")) as home:
        yield home


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The tiny recipe, its prepared data and a pretrained tiny base model, made by the plain functions."""
    from flows.config import load_config
    from tasks.kinds.prepare_data import prepare_data
    from tasks.kinds.pretrain import pretrain

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    root = tmp_path_factory.mktemp("prepared")
    (root / "data").mkdir()
    prepare_data(cfg.stages["prepare_data"], root / "data", seed=0)
    (root / "base").mkdir()
    texts = [r["text"] for r in synthetic.generate("corpus", corpus_size=400)]
    pretrain(cfg.stages["pretrain"], texts, root / "base", seed=0)
    return cfg, root


def write_data(folder: Path) -> dict[str, Path]:
    """The demo's synthetic parts as JSONL files, so a test can edit a row."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in ("sft", "preference", "eval"):
        paths[part] = folder / f"{part}.jsonl"
        paths[part].write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate(part)))
    return paths


def run_cli(home: Path, *overrides: str, config: str = "configs/tiny.yaml", extra=()) -> tuple[int, dict]:
    from flows.cli import main

    summary_path = home / "summary.json"
    summary_path.unlink(missing_ok=True)
    args = ["run", "--config", str(ROOT / config), "--summary-json", str(summary_path), *extra]
    for item in overrides:
        args += ["--set", item]
    code = main(args)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return code, summary
