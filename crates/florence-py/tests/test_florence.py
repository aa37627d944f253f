"""florence_rs.Florence: the same records as `florence caption --format jsonl` for every input
kind, errors by type and message, and the GIL released while the model runs."""

import threading
import time

import numpy as np
import pytest
from PIL import Image

import florence_rs
from conftest import IMAGES

SETTINGS = [
    dict(task="<CAPTION>"),
    dict(task="<OD>", num_beams=1, max_new_tokens=20),
    dict(task="<CAPTION_TO_PHRASE_GROUNDING>", text_input="a green car", max_new_tokens=16),
    dict(task="<MORE_DETAILED_CAPTION>", num_beams=1, do_sample=True, seed=7, top_k=5, max_new_tokens=12),
    dict(task="What is this?", num_beams=2, min_new_tokens=5, max_new_tokens=12),
]

NAMES = ["noise_rgb.png", "gradient_rgba.png", "gray8.png", "gray16.png", "palette.png"]


def inputs(name):
    """The image as each input kind `caption` takes, with how it is named in the record."""
    path = IMAGES / name
    pil = Image.open(path)
    array = np.asarray(pil) if pil.mode in ("RGB", "L", "RGBA", "LA") else np.asarray(pil.convert("RGB"))
    return {
        "path": str(path),
        "pathlike": path,
        "bytes": path.read_bytes(),
        "array": array,
        "fortran-order array": np.asfortranarray(array),
        "pil": pil,
    }


@pytest.fixture(scope="module")
def model(small_model):
    return florence_rs.Florence(small_model, threads=2)


def test_records_equal_the_cli_for_every_input_kind(model, small_model, cli_record):
    checked = 0
    for i, settings in enumerate(SETTINGS):
        name = NAMES[i % len(NAMES)]
        want = cli_record(small_model, IMAGES / name, **settings)
        kinds = inputs(name)
        task = settings.get("task", "<CAPTION>")
        options = {k: v for k, v in settings.items() if k != "task"}
        got = model.caption(list(kinds.values()), task=task, batch_size=2, **options)
        for kind, record in zip(kinds, got):
            expected = dict(want)
            if kind in ("path", "pathlike"):
                expected["path"] = str(IMAGES / name)
            else:
                expected.pop("path")
            assert record == expected, (kind, settings)
            checked += 1
    assert checked == len(SETTINGS) * 6


def test_every_fixture_image_as_array_equals_its_file(model, small_model, cli_record):
    for name in NAMES:
        want = cli_record(small_model, IMAGES / name, max_new_tokens=10)
        [got] = model.caption([inputs(name)["pil"]], max_new_tokens=10)
        assert got["ids"] == want["ids"], name


def test_a_bad_image_fails_alone(model, tmp_path):
    cut = tmp_path / "cut.png"
    data = (IMAGES / "noise_rgb.png").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    good = IMAGES / "noise_rgb.png"
    records = model.caption(
        [str(good), str(cut), b"not an image", str(tmp_path / "missing.png"), np.zeros((4, 4), np.float32), 7, str(good)],
        max_new_tokens=8,
    )
    assert [("text" in r, "error" in r) for r in records] == [(True, False)] + [(False, True)] * 5 + [(True, False)]
    assert records[0] == records[6]
    assert "truncated" in records[1]["error"] and records[1]["path"] == str(cut)
    assert "not a recognized image format" in records[2]["error"]
    assert "missing.png" in records[3]["error"]
    assert "float32" in records[4]["error"]
    assert "int object is not an image" in records[5]["error"]


def test_errors_are_python_exceptions_with_the_cli_message(model, small_model, tmp_path):
    with pytest.raises(ValueError, match="needs a text input"):
        model.caption([], task="<CAPTION_TO_PHRASE_GROUNDING>")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        model.caption([], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature needs do_sample=True"):
        model.caption([], temperature=0.5)
    with pytest.raises(ValueError, match="num_beams has the wrong type"):
        model.caption([], num_beams="three")
    with pytest.raises(TypeError, match="unexpected keyword 'beams'"):
        model.caption([], beams=3)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        model.caption([], batch_size=0)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        florence_rs.Florence(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        florence_rs.Florence(tmp_path / "empty")
    with pytest.raises(ValueError, match='dtype must be "f32" or "bf16"'):
        florence_rs.Florence(small_model, dtype="f16")
    with pytest.raises(ValueError, match="built without CUDA"):
        florence_rs.Florence(small_model, device="cuda")
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or auto"):
        florence_rs.Florence(small_model, device="gpu")
    assert model.caption([]) == []


def test_the_gil_is_released_while_the_model_runs(long_model):
    model = florence_rs.Florence(long_model, threads=1)
    ticks = 0
    done = threading.Event()

    def count():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    before = ticks
    started = time.monotonic()
    [record] = model.caption([str(IMAGES / "noise_rgb.png")], num_beams=1, max_new_tokens=1500, min_new_tokens=1500)
    elapsed = time.monotonic() - started
    during = ticks - before
    done.set()
    counter.join()
    assert len(record["ids"]) == 1501
    assert elapsed > 0.2, f"too quick to tell ({elapsed:.3f} s)"
    # A thread that could not run would tick once or twice; a free one ticks every millisecond or so.
    assert during > elapsed * 100, f"{during} ticks in {elapsed:.2f} s"
