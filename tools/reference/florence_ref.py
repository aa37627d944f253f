"""Shared helpers of the reference harness: random Florence-2 models, the remote-layout
converter, the PIL preprocessing path, and the reference generation call.

The oracle is transformers' native `Florence2ForConditionalGeneration`. Remote-layout
(Microsoft) checkpoints are written by renaming the native state dict (spec section 9), which
the spec verified to be the same function.
"""

import hashlib
import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2VisionConfig

# ../shared/testdata beside the repository, or FLORENCE_TEST_SHARED where it was carried elsewhere
# (tools/cuda/check.sh on a GPU machine).
SHARED = os.environ.get("FLORENCE_TEST_SHARED") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "testdata"))
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# Microsoft's remote code generates with these (spec section 7); native models need them spelled out.
REMOTE_DEFAULTS = dict(no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2)


def native_config(vision, text):
    """A native Florence2Config from vision/text dicts.

    A 51289-row vocabulary (the remote layout's) has no row for `<image>` (51289), so the oracle
    then marks image positions with `<unk>` (3), which no prompt contains."""
    v = Florence2VisionConfig(**vision)
    t = BartConfig(**text)
    image_token_id = 51289 if text["vocab_size"] > 51289 else 3
    return Florence2Config(vision_config=v.to_dict(), text_config=t.to_dict(), image_token_id=image_token_id)


def randomize(model, seed, eos_boost=1.0):
    """Weights with realistic scale: unit-variance activations and logits spread over several
    units, so that generation does not hinge on ties. `eos_boost` scales the `</s>` embedding
    (tied to its logit) so that some hypotheses end before the length limit."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * randn(module.weight.shape))
                module.bias.copy_(0.1 * randn(module.bias.shape))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(randn(module.weight.shape))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                w = module.weight
                fan_in = w[0].numel()
                if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
                    fan_in = w[0].numel()
                w.copy_(randn(w.shape) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * randn(module.bias.shape))
        model.get_input_embeddings().weight[2] *= eos_boost
    model.tie_weights()


def round_weights(model, dtype):
    """Rounds every parameter to `dtype` (kept in f32), as loading a checkpoint stored in it does."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def native_to_remote(name):
    """Inverse of the loader's remote-to-native table (spec section 9)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.multi_modal_projector."):
        rest = name[len("model.multi_modal_projector."):]
        if rest == "image_projection.weight":
            return "image_projection"
        return rest.replace("image_position_embed.", "image_pos_embed.", 1)
    assert name.startswith("model.vision_tower."), name
    rest = name[len("model.vision_tower."):]
    m = re.match(r"convs\.(\d+)\.conv\.(.*)", rest)
    if m:
        return f"vision_tower.convs.{m[1]}.proj.{m[2]}"
    m = re.match(r"blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\.([a-z_0-9]+)\.(.*)", rest)
    if m:
        s, b, block, sub, tail = m.groups()
        attn = "window_attn" if block == "spatial_block" else "channel_attn"
        sub = {
            "conv1": f"conv1.fn.dw.{tail}",
            "conv2": f"conv2.fn.dw.{tail}",
            "norm1": f"{attn}.norm.{tail}",
            "norm2": f"ffn.norm.{tail}",
            "window_attn": f"{attn}.fn.{tail}",
            "channel_attn": f"{attn}.fn.{tail}",
            "ffn": f"ffn.fn.net.{tail}",
        }[sub]
        return f"vision_tower.blocks.{s}.{b}.{block}.{sub}"
    return "vision_tower." + rest


def remote_state_dict(model, with_tied, dtype):
    """The model's weights in Microsoft's layout (vocab padding rows removed)."""
    vocab = 51289
    out = {}
    for name, t in model.state_dict().items():
        if name in ("lm_head.weight",):
            continue
        if name.endswith("embed_tokens.weight"):
            continue
        r = native_to_remote(name)
        if r == "image_projection":
            t = t.t()
        if r == "language_model.model.shared.weight":
            t = t[:vocab]
        out[r] = t.contiguous().to(dtype)
    out["language_model.final_logits_bias"] = torch.zeros(1, vocab, dtype=dtype)
    if with_tied:
        # One storage for all four names, as in Microsoft's files.
        shared = out["language_model.model.shared.weight"] = out["language_model.model.shared.weight"].to(dtype)
        for k in ("language_model.model.encoder.embed_tokens.weight",
                  "language_model.model.decoder.embed_tokens.weight",
                  "language_model.lm_head.weight"):
            out[k] = shared
    return out


def remote_config(vision, text, image_size):
    """A config.json in Microsoft's remote-code format."""
    vision = dict(dict(patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2], patch_padding=[3, 1, 1, 1],
                       patch_prenorm=[False, True, True, True]), **vision)
    t = dict(text)
    t.update(vocab_size=51289, activation_function="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
             decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3,
             early_stopping=True, num_beams=3, scale_embedding=False, is_encoder_decoder=True)
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                     "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "model_type": "florence2",
        "projection_dim": vision["projection_dim"], "is_encoder_decoder": True, "vocab_size": 51289,
        "text_config": t,
        "vision_config": {
            "model_type": "davit", "drop_path_rate": 0.1,
            "patch_size": vision["patch_size"], "patch_stride": vision["patch_stride"],
            "patch_padding": vision["patch_padding"], "patch_prenorm": vision["patch_prenorm"],
            "enable_checkpoint": False, "dim_embed": vision["embed_dim"], "num_heads": vision["num_heads"],
            "num_groups": vision["num_groups"], "depths": vision["depths"], "window_size": vision["window_size"],
            "projection_dim": vision["projection_dim"],
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
    }


def preprocessor_config(size):
    """`size` is a side, or `(width, height)`."""
    w, h = size if isinstance(size, tuple) else (size, size)
    return {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_center_crop": False, "image_processor_type": "CLIPImageProcessor",
        "image_mean": MEAN, "image_std": STD, "processor_class": "Florence2Processor", "resample": 3,
        "size": {"height": h, "width": w}, "crop_size": {"height": h, "width": w},
    }


def pixel_values(path, size):
    """transformers' PIL path: PIL convert('RGB'), PIL bicubic resize of the uint8 image,
    f64 rescale narrowed to f32, then (x - mean) / std in f32; channels first.
    `size` is a side, or `(width, height)`."""
    w, h = size if isinstance(size, tuple) else (size, size)
    img = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def check_against_transformers_processor(path, size):
    """Asserts that `pixel_values` equals transformers' own PIL image processor."""
    from transformers import CLIPImageProcessorPil

    w, h = size if isinstance(size, tuple) else (size, size)
    proc = CLIPImageProcessorPil(size={"height": h, "width": w}, resample=3, do_center_crop=False,
                                 image_mean=MEAN, image_std=STD)
    ref = proc(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    ours = pixel_values(path, size)
    assert torch.equal(ref, ours), f"{path}: manual PIL path differs from CLIPImageProcessorPil"


def sha256_f32(t):
    return hashlib.sha256(t.contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def image_token_count(model, size):
    with torch.no_grad():
        return model.get_image_features(torch.zeros(1, 3, size, size)).shape[1] if hasattr(
            model, "get_image_features") else None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
