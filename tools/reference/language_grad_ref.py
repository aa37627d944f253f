"""Writes the gradients transformers' BART gives every language-model parameter of the native
fixture model on one micro-batch: the reference for the tensor path's backward
(crates/florence/src/tensor/language_tests.rs, `gradients_equal_transformers`).

    python tools/reference/language_grad_ref.py [--out crates/florence/tests/fixtures/language_grad.safetensors]

The micro-batch is collated as crates/florence-train/SEMANTICS.md says ("One micro-batch"), with
`pad_in_loss` (so padding ids are fed to the decoder and counted, and the embedding's
`padding_idx` matters): random image embeddings (the projector's output) then the prompt, right-
padded and masked; labels right-padded; decoder inputs shifted right. The objective is the summed
cross-entropy over the counted positions. Dropout is off (eval mode). Gradients are saved under
the remote layout's names (`grad.language_model.model.…`), with the inputs and the loss.
"""

import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import Florence2ForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "..", "crates", "florence", "tests", "fixtures"))
PAD, DECODER_START = 1, 2
# Must equal `batch` in language_tests.rs.
PROMPTS = [[0, 5, 17, 300, 2], [0, 9, 2]]
LABELS = [[0, 40, 41, 4242, 43, 2], [0, 50, 2]]
N_IMAGE = 5


def padded(rows, width, fill):
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "language_grad.safetensors"))
    args = ap.parse_args()

    model = Florence2ForConditionalGeneration.from_pretrained(
        os.path.join(FIXTURES, "models", "native_f32"), dtype=torch.float32
    )
    model.eval()
    lm = model.model.language_model
    d = lm.config.d_model

    torch.manual_seed(0)
    image = torch.rand(len(PROMPTS), N_IMAGE, d) * 2 - 1
    prompt_ids = padded(PROMPTS, max(map(len, PROMPTS)), PAD)
    prompt_mask = (padded([[1] * len(p) for p in PROMPTS], prompt_ids.shape[1], 0)).long()
    labels = padded(LABELS, max(map(len, LABELS)), PAD)  # pad_in_loss: padding counted
    dec_in = torch.full_like(labels, PAD)
    dec_in[:, 1:] = labels[:, :-1]
    dec_in[:, 0] = DECODER_START

    inputs_embeds = torch.cat([image, lm.get_input_embeddings()(prompt_ids)], 1)
    attention_mask = torch.cat([torch.ones(len(PROMPTS), N_IMAGE, dtype=torch.long), prompt_mask], 1)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=dec_in)
    logits = model.lm_head(out.last_hidden_state)
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, labels.unsqueeze(-1)).sum()
    loss.backward()

    tensors = {"image_embeds": image.contiguous(), "loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        if name.startswith("model.language_model."):
            remote = "language_model.model." + name[len("model.language_model."):]
            tensors["grad." + remote] = p.grad.detach().contiguous()
    save_file(tensors, args.out)
    print(f"{args.out}: loss {loss.item():.6f}, {len(tensors) - 2} gradients")


if __name__ == "__main__":
    main()
