"""The reference trainer's data rules: discovery of the three folder forms and ShareGPT records,
caption clean-up, the long-caption filter, SplitMix64 + Fisher-Yates, the split and the epoch order."""

import json
import os
from dataclasses import dataclass

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MASK64 = (1 << 64) - 1

# The task prompts as transformers' Florence2Processor expands them (its _construct_prompts tables).
WITHOUT_INPUT = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}


def construct_prompt(prompt):
    """Florence2Processor._construct_prompts for one prompt."""
    for token, text in WITHOUT_INPUT.items():
        if token in prompt:
            if prompt != token:
                raise ValueError(f"Task token {token} should be the only content in the prompt.")
            prompt = text
            break
    for token, text in WITH_INPUT.items():
        if token in prompt:
            prompt = text.format(input=prompt.replace(token, "").strip())
            break
    return prompt


def clean_caption(text):
    """Florence-2ner's clean-up: one left-to-right pass of replace('  ', ' '), then str.strip()."""
    return text.replace("  ", " ").strip()


@dataclass
class Sample:
    prompt: str
    image: str
    caption_file: str  # or "file.jsonl#index" for a ShareGPT record
    caption: str
    prompt_ids: list
    label_ids: list

    def describe(self, base):
        rel = lambda p: os.path.relpath(p.split("#")[0], base) + ("#" + p.split("#")[1] if "#" in p else "")
        return dict(prompt=self.prompt, image=os.path.relpath(self.image, base), caption_file=rel(self.caption_file),
                    caption=self.caption, prompt_len=len(self.prompt_ids), label_len=len(self.label_ids))


def find_image(folder, stem):
    for ext in IMAGE_EXTS:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def read_caption(path):
    """Florence-2ner's `open(path, "r").read()`: UTF-8 text mode, universal newlines."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def image_error(path):
    """None if PIL opens and converts the image as Florence-2ner's dataset does, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
        return None
    except Exception as e:  # noqa: BLE001 - any failure makes the image unreadable
        return str(e) or type(e).__name__


def caption_names(folder):
    """The `*.txt` files of `folder` (not recursive: `glob("*.txt")`), in byte order."""
    names = [n for n in os.listdir(folder) if n.endswith(".txt") and os.path.isfile(os.path.join(folder, n))]
    return sorted(names, key=lambda n: n.encode())


def pair(prompt, image_dir, cap_path, found):
    """(prompt, image, caption file, text), or None with the caption noted as imageless/unreadable."""
    image = find_image(image_dir, os.path.basename(cap_path)[:-4])
    if image is None:
        found["no_image"].append(cap_path)
        return None
    try:
        return (prompt, image, cap_path, read_caption(cap_path))
    except UnicodeDecodeError as e:
        found["unreadable"].append((cap_path, str(e)))
        return None


def beside(prompt, folder, found):
    """Forms (a) and (b): `<stem>.txt` beside the images, in byte order of the caption's name."""
    out = [pair(prompt, folder, os.path.join(folder, n), found) for n in caption_names(folder)]
    return [r for r in out if r is not None]


def by_prompt_folders(folder, found):
    """Form (c): subfolders named after task prompts hold `<stem>.txt`, images in the folder itself;
    samples in byte order of the caption's relative path (`<PROMPT>/<stem>.txt`)."""
    rels = []
    for sub in os.listdir(folder):
        if os.path.isdir(os.path.join(folder, sub)):
            rels += [f"{sub}/{n}" for n in caption_names(os.path.join(folder, sub))]
    out = []
    for rel in sorted(rels, key=lambda r: r.encode()):
        sub, name = rel.split("/")
        out.append(pair(sub, folder, os.path.join(folder, sub, name), found))
    return [r for r in out if r is not None]


def sharegpt(path):
    """JSON (a list) or JSONL records: image path relative to the file, human turn = task prompt
    with `<image>` removed and stripped, gpt turn = caption."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f) if path.endswith(".json") else [json.loads(l) for l in f if l.strip()]
    out = []
    for i, rec in enumerate(records):
        image = rec["images"][0] if "images" in rec else rec["image"]
        human = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
        gpt = next(t["value"] for t in rec["conversations"] if t["from"] == "gpt")
        out.append((human.replace("<image>", "").strip(), os.path.join(os.path.dirname(path), image), f"{path}#{i}", gpt))
    return out


def raw_sources(cfg, found):
    """`dataset_path` (with `task_prompt`) and `dataset_config`, in the order the keys are written."""
    base = cfg["base_dir"]
    resolve = lambda p: os.path.join(base, p)
    as_list = lambda v: [v] if isinstance(v, str) else v
    is_sharegpt = lambda p: p.lower().endswith((".json", ".jsonl"))
    out = []
    for key in cfg:
        if key == "dataset_path":  # form (a), or ShareGPT files
            for entry in as_list(cfg[key]):
                path = resolve(entry)
                out += sharegpt(path) if is_sharegpt(path) else beside(cfg["task_prompt"], path, found)
        elif key == "dataset_config" and isinstance(cfg[key], dict):  # form (b)
            for prompt, folders in cfg[key].items():
                for folder in as_list(folders):
                    out += beside(prompt, resolve(folder), found)
        elif key == "dataset_config":  # form (c), and ShareGPT files
            for entry in cfg[key]:
                path = resolve(entry)
                out += sharegpt(path) if is_sharegpt(path) else by_prompt_folders(path, found)
    return out


def discover(cfg, tok, max_label_len):
    """All samples in source order; captions cleaned; a caption whose label (`<s> caption </s>`)
    is longer than the decoder's positions is dropped, then images PIL cannot open and convert
    are dropped, both before the split. Captions without an image are skipped and listed."""
    found = dict(no_image=[], unreadable=[])
    samples, dropped = [], []
    prompt_cache = {}
    for prompt, image, cap_file, raw in raw_sources(cfg, found):
        caption = clean_caption(raw)
        label = tok(caption)["input_ids"]
        if len(label) > max_label_len:
            dropped.append((cap_file, len(label)))
            continue
        if prompt not in prompt_cache:
            prompt_cache[prompt] = tok(construct_prompt(prompt))["input_ids"]
        samples.append(Sample(prompt, image, cap_file, caption, prompt_cache[prompt], label))
    kept = []
    for s in samples:
        why = image_error(s.image)
        if why is None:
            kept.append(s)
        else:
            found["unreadable"].append((s.image, why))
    return dict(samples=kept, dropped=dropped, **found)


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def shuffled(items, seed):
    """Fisher-Yates: for i in n-1 .. 1: j = next() % (i + 1); swap(i, j)."""
    items = list(items)
    rng = SplitMix64(seed)
    for i in range(len(items) - 1, 0, -1):
        j = rng.next() % (i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def split(n, cfg):
    """Indices into `samples`: eval = the first k of the (shuffled) list, train = the rest;
    k = floor(n * eval_split) for eval_split < 1, else min(eval_split, n)."""
    order = shuffled(range(n), cfg["seed"]) if cfg["shuffle"] else list(range(n))
    es = cfg["eval_split"] or 0
    k = int(n * es) if es < 1 else min(int(es), n)
    return dict(eval=order[:k], train=order[k:])


def epoch_order(train, cfg, epoch):
    """Epoch e: the split's train list shuffled with SplitMix64(seed + e + 1) (fresh each epoch)."""
    return shuffled(train, (cfg["seed"] + epoch + 1) & MASK64) if cfg["shuffle"] else list(train)


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def image_size(model_dir):
    """(width, height) from preprocessor_config.json."""
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        size = json.load(f)["size"]
    return (size["width"], size["height"]) if "width" in size else (size["shortest_edge"],) * 2
