"""Fixtures of the Python tests: the committed tiny reference models (with the shared
tokenizer), their images, and the `florence` binary for the CLI's records."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "crates/florence/tests/fixtures"
SHARED = ROOT.parent / "shared/testdata"
IMAGES = FIXTURES / "images"


def model_dir(tmp_path_factory, name):
    """A copy of fixture model `name` with the tokenizer its cases name."""
    out = tmp_path_factory.mktemp(name)
    for f in (FIXTURES / "models" / name).iterdir():
        shutil.copy(f, out / f.name)
    kind = json.loads((FIXTURES / "models" / f"{name}.cases.json").read_text())["tokenizer"]
    files = {
        "tokenizer-florence": [("tokenizer-florence", "tokenizer.json")],
        "microsoft-florence-2-large": [("microsoft-florence-2-large", "tokenizer.json")],
        "vocab-merges": [("tokenizer-florence", "vocab.json"), ("tokenizer-florence", "merges.txt")],
    }[kind]
    for folder, file in files:
        shutil.copy(SHARED / folder / file, out / file)
    return out


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    return model_dir(tmp_path_factory, "remote_f32")


@pytest.fixture(scope="session")
def long_model(tmp_path_factory):
    """4096 decoder positions: long forced captions take seconds."""
    return model_dir(tmp_path_factory, "native_bf16_sharded")


@pytest.fixture(scope="session")
def florence_bin():
    path = Path(os.environ.get("FLORENCE_BIN", ROOT / "target/debug/florence"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it with `cargo build -p florence-cli` or set FLORENCE_BIN")
    return path


@pytest.fixture(scope="session")
def cli_record(florence_bin):
    """The record `florence caption --format jsonl` prints for one image file."""

    def run(model, image, **flags):
        args = [str(florence_bin), "caption", "--model", str(model), "--format", "jsonl"]
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            else:
                args += [flag, str(value)]
        out = subprocess.run(args + [str(image)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return run
