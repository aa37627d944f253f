"""Builds the tiny dataset of crates/florence-train/tests/fixtures/data/set (all three folder forms,
ShareGPT .json and .jsonl, messy whitespace, CRLF, a caption without image, a too-long caption, a
corrupt and a truncated image, a missing ShareGPT image) and writes what train_data.py discovers
and orders to <config>.expected.json beside each config.

    python tools/reference/data_ref.py   (from the repository root; needs ../shared/testdata)
"""

import io
import json
import os
import random
import shutil
import sys

import yaml
from PIL import Image
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
import train_data as data  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "crates", "florence-train", "tests", "fixtures", "data")
SET = os.path.join(OUT, "set")
TOKENIZER = os.path.join(ROOT, "..", "shared", "testdata", "tokenizer-florence")
MAX_LABEL_LEN = 24
rng = random.Random(0)


def image(path, size=8, fmt="PNG", cut=None):
    im = Image.new("RGB", (size, size))
    im.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
    buf = io.BytesIO()
    im.save(buf, fmt)
    raw = buf.getvalue()
    with open(path, "wb") as f:
        f.write(raw[: int(len(raw) * cut)] if cut else raw)


def text(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode("utf-8"))


def build():
    shutil.rmtree(SET, ignore_errors=True)
    for d in ["a", "b", "c/<CAPTION>", "c/<OD>", "c/<MORE_DETAILED_CAPTION>", "c/<OCR>"]:
        os.makedirs(os.path.join(SET, d))
    a = lambda n: os.path.join(SET, "a", n)
    image(a("img1.png"))
    text(a("img1.txt"), " A  cat   sat\u3000on a mat.\x1f\n")
    image(a("Zeta.png"))
    text(a("Zeta.txt"), "zeta comes first in byte order")
    image(a("b.jpg"), fmt="JPEG")
    image(a("b.png"))
    text(a("b.txt"), "the jpg wins over the png")
    text(a("lonely.txt"), "a caption without an image")
    image(a("long.png"))
    text(a("long.txt"), " ".join(["a very long caption that the decoder cannot hold"] * 4))
    with open(a("bad.png"), "wb") as f:
        f.write(b"not an image at all")
    text(a("bad.txt"), "the image is corrupt")
    image(a("crlf.png"))
    text(a("crlf.txt"), "line one\r\nline two\rline three\r\n")
    b = lambda n: os.path.join(SET, "b", n)
    image(b("dog.png"))
    text(b("dog.txt"), "<loc_1><loc_2><loc_30><loc_40>")
    image(b("two.png"))
    text(b("two.txt"), "\u00a0two\u2003 spaces  \t")
    c = lambda *n: os.path.join(SET, "c", *n)
    for n in ["c1", "c2", "c3"]:
        image(c(n + ".png"))
    image(c("trunc.png"), size=32, cut=0.6)
    text(c("<CAPTION>", "c1.txt"), "caption of c1")
    text(c("<CAPTION>", "c9.txt"), "no image for c9")
    text(c("<OD>", "c2.txt"), "cat<loc_10><loc_20><loc_30><loc_40>")
    text(c("<OD>", "c1.txt"), "dog<loc_1><loc_2><loc_3><loc_4>")
    text(c("<MORE_DETAILED_CAPTION>", "c3.txt"), "a  longer   description")
    text(c("<OCR>", "trunc.txt"), "the image is cut short")
    rec = lambda human, gpt, **img: dict(img, conversations=[dict({"from": "human", "value": human}),
                                                             dict({"from": "gpt", "value": gpt})])
    with open(os.path.join(SET, "s.json"), "w") as f:
        json.dump([rec("<image>\n<CAPTION>", "  a json  caption ", image="c/c1.png"),
                   rec("<image><OD>", "x<loc_5><loc_6><loc_7><loc_8>", images=["c/c2.png"]),
                   rec("<image>\n<CAPTION>", "its image is missing", image="missing.png")], f, indent=1)
    with open(os.path.join(SET, "s.jsonl"), "w") as f:
        f.write(json.dumps(rec("<REGION_TO_DESCRIPTION><loc_1><loc_2><loc_3><loc_4>", "a region", image="b/dog.png")))
        f.write("\n\n")
        f.write(json.dumps(rec("<image>Free text prompt", "free", image="a/img1.png")) + "\n")
    common = dict(model_name="microsoft/Florence-2-base", epochs=2, optimizer="CAME", learning_rate=1.0e-5)
    configs = {
        "form_ab.yaml": dict(common, train_batch_size=2, gradient_accumulation_steps=2, seed=7, eval_split=0.25,
                             task_prompt="<CAPTION>", dataset_path="a",
                             dataset_config={"<DETAILED_CAPTION>": "b", "Describe:": ["a"],
                                             "<CAPTION_TO_PHRASE_GROUNDING> a dog": ["b"]}),
        "form_c.yaml": dict(common, train_batch_size=3, gradient_accumulation_steps=2, seed=123456789,
                            eval_split=2, dataset_config=["c", "s.json", "s.jsonl"]),
    }
    for name, cfg in configs.items():
        with open(os.path.join(SET, name), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    return list(configs)


def expected(name, tok):
    with open(os.path.join(SET, name)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(base_dir=SET, shuffle=True)
    rel = lambda p: os.path.relpath(str(p).split("#")[0], SET) + ("#" + str(p).split("#")[1] if "#" in str(p) else "")
    found = data.discover(cfg, tok, MAX_LABEL_LEN)
    samples = found["samples"]
    split = data.split(len(samples), cfg)
    B, A = cfg["train_batch_size"], cfg["gradient_accumulation_steps"]
    epochs = [data.epoch_order(split["train"], cfg, e) for e in range(cfg["epochs"])]
    return dict(
        max_label_len=MAX_LABEL_LEN,
        samples=[dict(prompt=s.prompt, image=rel(s.image), caption_file=rel(s.caption_file), caption=s.caption,
                      prompt_ids=s.prompt_ids, label_ids=s.label_ids) for s in samples],
        dropped_long=[[rel(p), n] for p, n in found["dropped"]],
        no_image=[rel(p) for p in found["no_image"]],
        unreadable=[rel(p) for p, _ in found["unreadable"]],
        split=split,
        epoch_orders=epochs,
        windows=[[data.chunks(w, B) for w in data.chunks(order, B * A)] for order in epochs],
    )


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    for name in build():
        out = os.path.join(OUT, name.replace(".yaml", ".expected.json"))
        with open(out, "w") as f:
            json.dump(expected(name, tok), f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(out)


if __name__ == "__main__":
    main()
