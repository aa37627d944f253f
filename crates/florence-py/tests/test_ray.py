"""florence_rs.ray.Captioner in a Ray Data pipeline on a local Ray: per path, the CLI's captions;
a bad image keeps its row with `error` filled."""

import json
import shutil

import pytest
import ray

from conftest import IMAGES
from florence_rs.ray import Captioner

NAMES = ["noise_rgb.png", "gradient_rgba.png", "gray8.png", "palette.png"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    for name in NAMES:
        shutil.copy(IMAGES / name, out / name)
    return out


def run(ds, model, **kwargs):
    ds = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"model": str(model), "max_new_tokens": 10, "threads": 1, **kwargs},
        batch_size=2,
        concurrency=1,
        num_cpus=1,
    )
    return {row["path"].rsplit("/", 1)[-1]: row for row in ds.take_all()}


def test_read_images_gives_the_cli_captions(local_ray, folder, small_model, cli_record):
    rows = run(ray.data.read_images(str(folder), include_paths=True, mode="RGB"), small_model)
    assert sorted(rows) == sorted(NAMES)
    for name, row in rows.items():
        want = cli_record(small_model, folder / name, max_new_tokens=10)
        assert row["caption"] == want["text"], name
        assert row["error"] is None
        assert row["image"].ndim == 3, "the input column is kept"


def test_read_binary_files_keeps_a_bad_row(local_ray, folder, small_model, cli_record, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "broken.png").write_bytes((IMAGES / "noise_rgb.png").read_bytes()[:300])
    ds = ray.data.read_binary_files(str(data), include_paths=True)
    rows = run(ds, small_model, task="<OD>")
    assert sorted(rows) == sorted(NAMES + ["broken.png"])
    assert rows["broken.png"]["caption"] is None
    assert "truncated" in rows["broken.png"]["error"]
    for name in NAMES:
        want = cli_record(small_model, folder / name, task="<OD>", max_new_tokens=10)
        assert json.loads(rows[name]["caption"]) == want["result"], name
        assert rows[name]["bytes"] == (folder / name).read_bytes()
