"""The PyTorch reference trainer `florence train` is checked against (issue 14).

    python tools/reference/train_ref.py fixtures [--out DIR]
        rewrites crates/florence-train/tests/fixtures/train (model, data, runs, grads; see its README.md)
    python tools/reference/train_ref.py train CONFIG --output DIR [--max-steps N]
        runs CONFIG (Florence-2ner's keys, YAML or JSON): DIR/metrics.jsonl, DIR/final.safetensors, DIR/run.json

The model is transformers' native Florence2ForConditionalGeneration; CAME is came-pytorch 0.1.3, AdamW
torch.optim.AdamW. The semantics (config defaults, data order, collation, loss, accumulation,
schedules, clipping, freezing, evaluation) are crates/florence-train/SEMANTICS.md; each function
below says which rule it implements. Everything runs on one CPU thread, deterministically:
the same command writes bit-identical files.
"""

import argparse
import json
import math
import os
import sys

import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer, Florence2ForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import florence_ref as ref  # noqa: E402
import train_data as data  # noqa: E402

IGNORE = -100
PAD, DECODER_START = 1, 2

# Every key a config may carry. The ones that change nothing here are accepted (the Rust trainer
# prints a note for those that do not apply to it).
KEYS = {
    "model_name", "task_prompt", "dataset_path", "dataset_config", "epochs", "optimizer", "learning_rate",
    "min_learning_rate", "lr_scheduler", "warmup_steps", "train_batch_size", "eval_batch_size",
    "gradient_accumulation_steps", "clip_grad_norm", "weight_decay", "seed", "save_steps", "eval_steps",
    "save_total_limit", "eval_split", "eval_split_ratio", "freeze_vision", "freeze_language", "freeze_other",
    "gradient_checkpointing", "run_name", "shuffle", "loss_normalization", "pad_in_loss", "output_dir",
    "eval_before_training", "attn_implementation", "use_bf16", "wandb_project", "wandb_entity",
    "filtering_processes_per_thread", "filtering_batch_size", "dataloader_num_workers",
    "dataloader_prefetch_factor", "print_first_batch_predictions", "do_extra_eval",
}
REQUIRED = ("model_name", "epochs", "optimizer", "learning_rate", "train_batch_size")
DEFAULTS = dict(
    min_learning_rate=0.0, lr_scheduler="Cosine", warmup_steps=0, eval_batch_size=None, gradient_accumulation_steps=1, clip_grad_norm=0.0, weight_decay=0.0, seed=42,
    eval_steps=0, eval_split=0, freeze_vision=False, freeze_language=False, freeze_other=False, shuffle=True,
    loss_normalization="mean", pad_in_loss=False, eval_before_training=False,
)


def load_config(path):
    with open(path) as f:
        # PyYAML follows YAML 1.1, where 3e-06 (no dot) is a string; JSON files are read as JSON.
        cfg = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise SystemExit(f"{path}: unknown keys {unknown}")
    missing = [k for k in REQUIRED if k not in cfg]
    if not ("dataset_config" in cfg or ("task_prompt" in cfg and "dataset_path" in cfg)):
        missing.append("task_prompt + dataset_path, or dataset_config")
    if missing:
        raise SystemExit(f"{path}: missing keys {missing}")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in cfg.items() if v is not None})
    if out["eval_batch_size"] is None:
        out["eval_batch_size"] = out["train_batch_size"]
    if "eval_split" not in cfg and "eval_split_ratio" in cfg:
        out["eval_split"] = cfg["eval_split_ratio"]
    out["optimizer"] = {"OptimiAdamW": "AdamW"}.get(out["optimizer"], out["optimizer"])
    out["base_dir"] = os.path.dirname(os.path.abspath(path))
    return out


# ---------------------------------------------------------------- model


def load_model(model_dir):
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.train()  # every dropout is 0 in the references' configs, so train mode is deterministic
    return model


def group_of(name):
    """The freeze group of a native parameter name. The tied embedding (`shared`, the encoder's and
    decoder's `embed_tokens` and `lm_head`) is one parameter and belongs to the language model."""
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.language_model.") or name == "lm_head.weight":
        return "language"
    assert name.startswith("model.multi_modal_projector."), name
    return "other"


def noise_driven(trainable, cfg):
    """Trainable tensors whose final value float noise decides under CAME: the attention key biases
    (BART's `k_proj.bias`, the key third of DaViT's window-attention `qkv.bias`) get a gradient that
    is zero in exact arithmetic (softmax ignores a constant shift), ~1e-13 in f32, and CAME
    normalises it per element (eps 1e-30) into steps of about lr; a window `qkv.bias`'s RMS clip
    couples its query and value thirds to that noise. AdamW's eps 1e-8 damps such gradients."""
    if cfg["optimizer"] != "CAME":
        return []
    return [n for n in trainable if n.endswith("k_proj.bias") or n.endswith("window_attn.qkv.bias")]


def apply_freeze(model, cfg):
    frozen = {g for g in ("vision", "language", "other") if cfg[f"freeze_{g}"]}
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) not in frozen)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def image_tokens(model, size):
    with torch.no_grad():
        return model.get_image_features(torch.zeros(1, 3, size[1], size[0])).pooler_output.shape[1]


# ---------------------------------------------------------------- one micro-batch


def collate(samples, ctx):
    """pixel_values; encoder input = image placeholders then the prompt ids, right-padded with
    pad and masked (image positions always 1); labels `<s> caption </s>` right-padded with -100
    (pad ids with pad_in_loss); decoder_input_ids = shift_tokens_right(labels, pad, 2)."""
    pv = torch.stack([ctx["pixels"](s.image) for s in samples])
    p_len = max(len(s.prompt_ids) for s in samples)
    prompt_ids = torch.full((len(samples), p_len), PAD, dtype=torch.long)
    prompt_mask = torch.zeros((len(samples), p_len), dtype=torch.long)
    l_len = max(len(s.label_ids) for s in samples)
    label_pad = PAD if ctx["pad_in_loss"] else IGNORE
    labels = torch.full((len(samples), l_len), label_pad, dtype=torch.long)
    for i, s in enumerate(samples):
        prompt_ids[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        prompt_mask[i, : len(s.prompt_ids)] = 1
        labels[i, : len(s.label_ids)] = torch.tensor(s.label_ids)
    n_img = ctx["n_image_tokens"]
    placeholders = torch.full((len(samples), n_img), ctx["image_token_id"], dtype=torch.long)
    dec_in = torch.full_like(labels, PAD)
    dec_in[:, 1:] = labels[:, :-1]
    dec_in[:, 0] = DECODER_START
    dec_in.masked_fill_(dec_in == IGNORE, PAD)
    return dict(
        pixel_values=pv, prompt_ids=prompt_ids, prompt_mask=prompt_mask, labels=labels, decoder_input_ids=dec_in,
        input_ids=torch.cat([placeholders, prompt_ids], 1),
        attention_mask=torch.cat([torch.ones_like(placeholders), prompt_mask], 1),
    )


def ce_sum(model, batch):
    """(sum over non-ignored positions of -log_softmax(logits)[label] over the full vocabulary, count)."""
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]).logits
    labels = batch["labels"]
    valid = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll[valid].sum(), int(valid.sum())


# ---------------------------------------------------------------- schedules


class RexLR(torch.optim.lr_scheduler.LRScheduler):
    """Florence-2ner's REX schedule, driven as torch drives it: the constructor passes
    last_epoch=0 and torch's initial step moves it to 1, so optimizer step s runs at last_step = s.
    Warmup (1 <= t <= W): lr * t / W; after it, z = (R - u) / R with u = t - W, R = T - W:
    min + (lr - min) * z / (0.1 + 0.9 z) written as lr * (rho + (1 - rho) * z / (0.1 + 0.9 z)),
    rho = min / lr; min_lr once u >= R (and at u = -1 or R <= 0, as in Florence-2ner)."""

    def __init__(self, optimizer, max_lr, min_lr, total_steps, warmup_steps):
        self.min_lr, self.max_lr = min_lr, max_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, last_epoch=0)

    def get_lr(self):
        t, w = self.last_epoch, self.warmup_steps
        if 1 <= t <= w:
            return [base * t / w for base in self.base_lrs]
        after, remaining = t - w, self.total_steps - w
        if after >= remaining or after == -1 or remaining <= 0:
            return [self.min_lr for _ in self.base_lrs]
        z = (remaining - after % remaining) / remaining
        rho = self.min_lr / self.max_lr
        return [base * (rho + (1.0 - rho) * (z / (0.1 + 0.9 * z))) for base in self.base_lrs]


def make_scheduler(opt, cfg, total):
    """REX; Cosine and Constant behind Florence-2ner's LinearLR warmup (1e-20 -> 1 over W steps,
    SequentialLR with milestone W) when W > 0; Linear = transformers' get_linear_schedule_with_warmup
    (its own warmup 0 -> lr over W steps, then a linear decay reaching min at step T). The rate step s
    uses is the optimizer's lr before the scheduler's s-th step()."""
    name, w, lr0, lo = cfg["lr_scheduler"], cfg["warmup_steps"], cfg["learning_rate"], cfg["min_learning_rate"]
    S = torch.optim.lr_scheduler
    if name == "REX":
        return RexLR(opt, lr0, lo, total, w)
    if name == "Linear":
        rho = lo / lr0

        def factor(t):  # transformers' lr_lambda; with rho = 0 exactly its value
            if t < w:
                return t / max(1, w)
            frac = max(0.0, (total - t) / max(1, total - w))
            return rho + (1.0 - rho) * frac

        return S.LambdaLR(opt, factor)
    if name == "Cosine":
        main = S.CosineAnnealingLR(opt, T_max=total - w + 1, eta_min=lo)
    elif name == "Constant":
        main = S.LambdaLR(opt, lambda _: 1.0)
    else:
        raise SystemExit(f"lr_scheduler: unknown value {name!r} (REX, Cosine, Constant, Linear)")
    if w <= 0:
        return main
    warm = S.LinearLR(opt, start_factor=1e-20, end_factor=1.0, total_iters=w)
    return S.SequentialLR(opt, [warm, main], milestones=[w])


def make_optimizer(params, cfg):
    if cfg["optimizer"] == "CAME":
        from came_pytorch import CAME

        return CAME(params, lr=cfg["learning_rate"], eps=(1e-30, 1e-16), clip_threshold=1.0,
                    betas=(0.9, 0.999, 0.9999), weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "AdamW":
        return torch.optim.AdamW(params, lr=cfg["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg["weight_decay"], foreach=False)
    raise SystemExit(f"optimizer: unknown value {cfg['optimizer']!r} (CAME, AdamW, OptimiAdamW)")


# ---------------------------------------------------------------- the loop


def evaluate(model, samples, cfg, ctx):
    """Token mean over the whole eval list: total CE sum / total count."""
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for mb in data.chunks(samples, cfg["eval_batch_size"]):
            s, k = ce_sum(model, collate(mb, ctx))
            tot += s.item()
            n += k
    model.train()
    return tot / n


def context(model, tok, cfg, model_dir):
    size = data.image_size(model_dir)
    cache = {}

    def pixels(path):
        if path not in cache:
            cache[path] = ref.pixel_values(path, size)
        return cache[path]

    return dict(pixels=pixels, n_image_tokens=image_tokens(model, size), image_token_id=model.config.image_token_id,
                pad_in_loss=bool(cfg["pad_in_loss"]), tokenizer=tok)


def train(cfg, out_dir, max_steps=None, tokenizer_dir=None):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg["seed"])
    model_dir = os.path.normpath(os.path.join(cfg["base_dir"], cfg["model_name"]))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model = load_model(model_dir)
    ctx = context(model, tok, cfg, model_dir)
    max_label = model.config.text_config.max_position_embeddings
    found = data.discover(cfg, tok, max_label)
    split = data.split(len(found["samples"]), cfg)
    trainable = apply_freeze(model, cfg)
    params = [p for _, p in trainable]
    opt = make_optimizer(params, cfg)
    B, A, epochs = cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["epochs"]
    spe = math.ceil(math.ceil(len(split["train"]) / B) / A)
    total = epochs * spe
    sched = make_scheduler(opt, cfg, total)
    token_count = cfg["loss_normalization"] == "token_count"
    assert cfg["loss_normalization"] in ("mean", "token_count"), cfg["loss_normalization"]
    eval_list = [found["samples"][i] for i in split["eval"]]

    os.makedirs(out_dir, exist_ok=True)
    metrics = open(os.path.join(out_dir, "metrics.jsonl"), "w")

    def log(obj):
        metrics.write(json.dumps(obj) + "\n")
        metrics.flush()

    if eval_list and cfg["eval_before_training"]:
        log({"step": 0, "eval_loss": evaluate(model, eval_list, cfg, ctx)})
    step, orders = 0, []
    stop = max_steps if max_steps is not None else total
    for epoch in range(epochs):
        if step >= stop:
            break
        order = data.epoch_order(split["train"], cfg, epoch)
        orders.append(order)
        for window in data.chunks(data.chunks(order, B), A):
            if step >= stop:
                break
            opt.zero_grad(set_to_none=True)
            loss_acc, tok_acc = 0.0, 0
            for mb in window:
                s_i, n_i = ce_sum(model, collate([found["samples"][j] for j in mb], ctx))
                if token_count:
                    s_i.backward()
                    loss_acc += s_i.item()
                    tok_acc += n_i
                else:
                    loss_i = s_i / n_i
                    (loss_i / A).backward()
                    loss_acc += loss_i.item()
            if token_count:
                for p in params:
                    p.grad.div_(tok_acc)
                loss = loss_acc / tok_acc
            else:
                loss = loss_acc / A
            lr = opt.param_groups[0]["lr"]
            grads = [p.grad for p in params]
            assert all(g is not None for g in grads), "a trainable parameter got no gradient"
            if cfg["clip_grad_norm"] and cfg["clip_grad_norm"] > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad_norm"])
            else:
                norm = torch.nn.utils.get_total_norm(grads)
            opt.step()
            sched.step()
            step += 1
            log({"step": step, "epoch": step / spe, "lr": lr, "loss": loss, "grad_norm": norm.item()})
            if eval_list and cfg["eval_steps"] and step % cfg["eval_steps"] == 0:
                log({"step": step, "eval_loss": evaluate(model, eval_list, cfg, ctx)})
    # As Florence-2ner: the last step is evaluated if no eval_steps boundary did it.
    if eval_list and step > 0 and not (cfg["eval_steps"] and step % cfg["eval_steps"] == 0):
        log({"step": step, "eval_loss": evaluate(model, eval_list, cfg, ctx)})
    metrics.close()

    final = {n: p.detach().contiguous().clone() for n, p in model.named_parameters()}
    save_file(final, os.path.join(out_dir, "final.safetensors"))
    ref.write_json(os.path.join(out_dir, "run.json"), dict(
        samples=[s.describe(cfg["base_dir"]) for s in found["samples"]], dropped=[dict(caption_file=os.path.relpath(f.split("#")[0], cfg["base_dir"]), label_len=n) for f, n in found["dropped"]],
        unreadable=[dict(image=os.path.relpath(p, cfg["base_dir"]), reason=why) for p, why in found["unreadable"]],
        eval=split["eval"], train=split["train"], epoch_orders=orders, steps_per_epoch=spe, total_steps=total,
        max_steps=max_steps, steps_run=step, n_image_tokens=ctx["n_image_tokens"],
        trainable=[n for n, _ in trainable], noise_driven=noise_driven([n for n, _ in trainable], cfg),
    ))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("config")
    t.add_argument("--output", required=True)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--tokenizer", help="tokenizer folder when the model folder has none")
    f = sub.add_parser("fixtures")
    f.add_argument("--out")
    args = ap.parse_args()
    if args.cmd == "train":
        train(load_config(args.config), args.output, args.max_steps, args.tokenizer)
    else:
        import train_fixtures

        train_fixtures.main(args.out)


if __name__ == "__main__":
    main()
