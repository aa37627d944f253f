"""Fixtures for florence-train's optimizers, schedules and gradient clipping.

    python tools/reference/optim_ref.py [--out DIR]
        rewrites crates/florence-train/tests/fixtures/optim:
        came.safetensors, adamw.safetensors  (params, grads, params and state after each step)
        clip.safetensors                     (grads, total norms, clipped grads)
        optim.json                           (per-step rates and decays, clip cases, schedule rates)

The optimizers and schedules are the reference trainer's own (train_ref.make_optimizer,
train_ref.make_scheduler: came-pytorch 0.1.3's CAME, torch.optim.AdamW with foreach=False, torch's
schedulers driven as Florence-2ner drives them), so the Rust port and the trainer reference cannot
drift apart. Clipping is torch.nn.utils.clip_grad_norm_ with foreach=False. Everything runs on one
CPU thread: the same command writes bit-identical files.
"""

import argparse
import os
import sys
import warnings

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import florence_ref as ref  # noqa: E402
import train_ref  # noqa: E402

OUT = os.path.join(HERE, "..", "..", "crates", "florence-train", "tests", "fixtures", "optim")

# 2-D, 3-D (factored over the last two dims), 1-D (unfactored), 1x1 and a tall matrix.
SHAPES = {"w2d": (5, 7), "w3d": (2, 3, 4), "b1d": (6,), "one": (1, 1), "tall": (40, 3)}
# The rate of each step changes, as a schedule changes it.
RATES = [1e-3, 5e-4, 2e-3]
DECAY = {"CAME": 0.01, "AdamW": 0.1}
# Gradient scales differ per tensor so that the RMS clip of CAME and the norms matter.
SCALES = {"w2d": 1.0, "w3d": 0.05, "b1d": 3.0, "one": 0.5, "tall": 1e-3}

# (kind, lr, min_lr, warmup, total), W = 0 included; rates are written for steps 1 ..= 2T + 3,
# past T so that the cosine's restart branch (torch's recursion) is covered.
SCHEDULES = [
    (kind, lr, lo, w, t)
    for kind in ("REX", "Cosine", "Constant", "Linear")
    for (lr, lo, w, t) in [(1e-4, 0.0, 0, 20), (2e-5, 1e-6, 5, 40), (1e-3, 1e-5, 1, 7), (3e-4, 3e-5, 10, 10),
                           (5e-5, 5e-6, 3, 100)]
]


def optimizer_run(name):
    """3 steps of `name` on SHAPES: the tensors before and after each step, with torch's state."""
    g = torch.Generator().manual_seed(1234)
    params = {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in SHAPES.items()}
    cfg = dict(optimizer=name, learning_rate=RATES[0], weight_decay=DECAY[name])
    opt = train_ref.make_optimizer(list(params.values()), cfg)
    out = {f"init.{k}": p.detach().clone() for k, p in params.items()}
    for s, lr in enumerate(RATES, start=1):
        for k, p in params.items():
            p.grad = torch.randn(p.shape, generator=g) * SCALES[k]
            out[f"grad{s}.{k}"] = p.grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for k, p in params.items():
            out[f"param{s}.{k}"] = p.detach().clone()
            for slot, v in opt.state[p].items():
                if torch.is_tensor(v) and slot not in ("RMS", "step"):
                    out[f"state{s}.{k}.{slot}"] = v.clone()
    return out


def clip_cases():
    """clip_grad_norm_ (foreach=False) on random grads: clipping, not clipping, norm only."""
    g = torch.Generator().manual_seed(99)
    grads = [torch.randn(s, generator=g) * SCALES[k] for k, s in SHAPES.items()]
    tensors = {f"grad.{i}": t.clone() for i, t in enumerate(grads)}
    cases = []
    for c, max_norm in enumerate([0.5, 1e3, 0.0]):
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
        for i, p in enumerate(params):
            tensors[f"clipped{c}.{i}"] = p.grad.clone()
        cases.append(dict(max_norm=max_norm, norm=norm.item()))
    return tensors, cases


def schedule_rates(kind, lr, lo, w, t):
    """The optimizer's lr before the scheduler's s-th step(), s = 1 ..= 2T + 3."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cfg = dict(lr_scheduler=kind, warmup_steps=w, learning_rate=lr, min_learning_rate=lo)
    sched = train_ref.make_scheduler(opt, cfg, t)
    rates = []
    for _ in range(2 * t + 3):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.simplefilter("ignore")  # torch's deprecation note for SequentialLR's step(0)
    os.makedirs(args.out, exist_ok=True)
    for name in ("CAME", "AdamW"):
        save_file(optimizer_run(name), os.path.join(args.out, f"{name.lower()}.safetensors"))
    clip_tensors, clip_meta = clip_cases()
    save_file(clip_tensors, os.path.join(args.out, "clip.safetensors"))
    ref.write_json(os.path.join(args.out, "optim.json"), dict(
        shapes={k: list(s) for k, s in SHAPES.items()},
        rates=RATES,
        weight_decay=DECAY,
        clip=clip_meta,
        schedules=[dict(kind=k, lr=lr, min_lr=lo, warmup=w, total=t, rates=schedule_rates(k, lr, lo, w, t))
                   for (k, lr, lo, w, t) in SCHEDULES],
    ))


if __name__ == "__main__":
    main()
