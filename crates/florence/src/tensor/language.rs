//! The BART encoder-decoder on the tensor path (spec §6): teacher-forced over whole sequences,
//! with attention masks, dropout and the loss, for training.
//!
//! Same struct names and checkpoint keys as the fast path ([`crate::language`]); the arithmetic
//! is transformers' `BartModel` in training: additive masks holding the dtype's minimum, dropout
//! after the embeddings, on the attention probabilities, after the MLP activation and on every
//! residual branch.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder};

use super::loss::cross_entropy_sum;
use super::ops::{dropout, softmax_last_dim, LayerNorm, Mode};
use super::segment::Segment;
use crate::config::TextConfig;
use crate::error::{Error, Result};

/// BART's learned positions are offset by two rows (a fairseq legacy).
const POSITION_OFFSET: usize = 2;
/// The padding token: prompts and labels are right-padded with it.
const PAD: u32 = 1;
/// The token the decoder starts from (`</s>`).
const DECODER_START: u32 = 2;
/// BART's layer-norm epsilon.
const LN_EPS: f64 = 1e-5;

/// One micro-batch's text, collated as Florence-2ner and transformers collate it
/// (crates/florence-train/SEMANTICS.md, "One micro-batch").
#[derive(Debug, Clone)]
pub struct TextInputs {
    /// Prompt ids `[B, P]` `u32`, right-padded with the pad id (1).
    pub prompt_ids: Tensor,
    /// `[B, P]` f32: 1 for prompt tokens, 0 for padding.
    pub prompt_mask: Tensor,
    /// `[B, L]` `u32`: `shift_tokens_right(labels, pad = 1, start = 2)`, ignored positions as pad.
    pub decoder_input_ids: Tensor,
    /// `[B, L]` `u32`: the labels; ignored positions hold the pad id.
    pub labels: Tensor,
    /// `[B, L]` f32: 1 where a label counts in the loss.
    pub label_mask: Tensor,
    /// The number of counted labels (the sum of `label_mask`).
    pub label_count: usize,
}

impl TextInputs {
    /// Collates prompt ids and label ids (`<s> caption </s>`) of one micro-batch: both are
    /// right-padded with the pad id; padded labels are ignored, or counted with `pad_in_loss`
    /// (Florence-2ner's option: the model learns to emit padding after `</s>`).
    pub fn new(prompts: &[Vec<u32>], labels: &[Vec<u32>], pad_in_loss: bool, device: &Device) -> Result<Self> {
        let b = prompts.len();
        if b == 0 || labels.len() != b {
            return Err(Error::usage(format!(
                "a micro-batch of {b} prompts and {} label lists: give one of each per sample, at least one",
                labels.len()
            )));
        }
        if prompts.iter().chain(labels).any(Vec::is_empty) {
            return Err(Error::usage(
                "an empty prompt or label list: prompts and labels carry <s> and </s> at least",
            ));
        }
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let l = labels.iter().map(Vec::len).max().unwrap_or(0);
        let (mut prompt_ids, mut prompt_mask) = (vec![PAD; b * p], vec![0f32; b * p]);
        let (mut label_ids, mut label_mask) = (vec![PAD; b * l], vec![pad_in_loss as u8 as f32; b * l]);
        let mut decoder_input_ids = vec![PAD; b * l];
        for (i, (prompt, label)) in prompts.iter().zip(labels).enumerate() {
            prompt_ids[i * p..][..prompt.len()].copy_from_slice(prompt);
            prompt_mask[i * p..][..prompt.len()].fill(1.0);
            label_ids[i * l..][..label.len()].copy_from_slice(label);
            label_mask[i * l..][..label.len()].fill(1.0);
        }
        // Ignored labels are already pad here, which is what the shift puts in their place.
        for (row, labels) in decoder_input_ids.chunks_exact_mut(l).zip(label_ids.chunks_exact(l)) {
            row[0] = DECODER_START;
            row[1..].copy_from_slice(&labels[..l - 1]);
        }
        let label_count = label_mask.iter().filter(|&&m| m != 0.0).count();
        Ok(Self {
            prompt_ids: Tensor::from_vec(prompt_ids, (b, p), device)?,
            prompt_mask: Tensor::from_vec(prompt_mask, (b, p), device)?,
            decoder_input_ids: Tensor::from_vec(decoder_input_ids, (b, l), device)?,
            labels: Tensor::from_vec(label_ids, (b, l), device)?,
            label_mask: Tensor::from_vec(label_mask, (b, l), device)?,
            label_count,
        })
    }

    /// The encoder's additive key mask `[B, 1, 1, N + P]` for `n_image` image positions (always
    /// attended) before the prompt.
    fn encoder_mask(&self, n_image: usize, dtype: DType) -> Result<Tensor> {
        let b = self.prompt_mask.dim(0)?;
        let image = Tensor::ones((b, n_image), DType::F32, self.prompt_mask.device())?;
        additive_mask(&Tensor::cat(&[&image, &self.prompt_mask], 1)?, dtype)
    }
}

/// The most negative value of `dtype`: what transformers adds to masked attention scores.
fn masked_value(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::BF16 => half::bf16::MIN.to_f64(),
        DType::F16 => half::f16::MIN.to_f64(),
        _ => f32::MIN as f64,
    }
}

/// A 1/0 key mask `[B, S]` as additive scores `[B, 1, 1, S]`: 0 where attended, the dtype's
/// minimum elsewhere.
fn additive_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let min = masked_value(dtype);
    let (b, s) = mask.dims2()?;
    // 1 * -min + min is exactly 0: the two extremes cancel.
    Ok(mask.to_dtype(dtype)?.affine(-min, min)?.reshape((b, 1, 1, s))?)
}

/// The decoder's causal mask `[1, 1, L, L]`: position `i` sees keys `j <= i`.
fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let idx = Tensor::arange(0u32, len as u32, device)?;
    let future = idx.unsqueeze(0)?.broadcast_gt(&idx.unsqueeze(1)?)?;
    Ok(future
        .to_dtype(dtype)?
        .affine(masked_value(dtype), 0.0)?
        .reshape((1, 1, len, len))?)
}

#[derive(Debug, Clone)]
pub(super) struct BartAttention {
    q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    attention_dropout: f64,
}

impl BartAttention {
    fn new(cfg: &TextConfig, heads: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads,
            head_dim: d / heads,
            attention_dropout: cfg.attention_dropout,
        })
    }

    /// `[B, L, d]` to `[B, heads, L, head_dim]`.
    pub(super) fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Queries from `x` `[B, Lq, d]` attend to keys and values from `kv` `[B, Lk, d]`; `mask`
    /// (additive) broadcasts to `[B, heads, Lq, Lk]`.
    fn forward(&self, x: &Tensor, kv: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let k = self.split_heads(&self.k_proj.forward(kv)?)?;
        let v = self.split_heads(&self.v_proj.forward(kv)?)?;
        self.attend(x, &k, &v, Some(mask), mode)
    }

    /// Queries from `x` `[B, Lq, d]` attend to keys and values already projected and split,
    /// `[B, heads, Lk, head_dim]` (a decoder's cache); `mask` as in `forward`.
    pub(super) fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let scaling = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads(&(self.q_proj.forward(x)? * scaling)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = dropout(&softmax_last_dim(&scores)?, self.attention_dropout, mode)?;
        let (b, _, l, _) = q.dims4()?;
        let y = probs
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        Ok(self.out_proj.forward(&y)?)
    }
}

/// A layer's MLP, `fc2(dropout(gelu(fc1(x))))`.
pub(super) fn mlp(fc1: &Linear, fc2: &Linear, activation_dropout: f64, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
    let h = fc1.forward(x)?.gelu_erf()?;
    Ok(fc2.forward(&dropout(&h, activation_dropout, mode)?)?)
}

/// Post-LN residual: `norm(x + dropout(branch))`.
pub(super) fn residual(x: &Tensor, branch: &Tensor, norm: &LayerNorm, p: f64, mode: &mut Mode) -> Result<Tensor> {
    norm.forward(&(x + dropout(branch, p, mode)?)?)
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: BartAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    dropout: f64,
    activation_dropout: f64,
}

impl EncoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: BartAttention::new(cfg, cfg.encoder_attention_heads, vb.pp("self_attn"))?,
            self_attn_layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(d, cfg.encoder_ffn_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.encoder_ffn_dim, d, vb.pp("fc2"))?,
            final_layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("final_layer_norm"))?,
            dropout: cfg.dropout,
            activation_dropout: cfg.activation_dropout,
        })
    }

    /// `x` `[B, S, d]` with the additive key mask `mask` `[B, 1, 1, S]`.
    fn forward(&self, x: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let a = self.self_attn.forward(x, x, mask, mode)?;
        let x = residual(x, &a, &self.self_attn_layer_norm, self.dropout, mode)?;
        let m = mlp(&self.fc1, &self.fc2, self.activation_dropout, &x, mode)?;
        residual(&x, &m, &self.final_layer_norm, self.dropout, mode)
    }
}

/// The learned positions `[max + 2, d]` under `vb`.
fn embed_positions(cfg: &TextConfig, vb: &VarBuilder) -> Result<Tensor> {
    let rows = cfg.max_position_embeddings + POSITION_OFFSET;
    Ok(vb.pp("embed_positions").get((rows, cfg.d_model), "weight")?)
}

/// `dropout(norm(x + positions))` for token embeddings `x` `[B, L, d]` at positions
/// `start..start + L`, as BART's encoder and decoder both begin (`start` is 0 but for the steps
/// of generation).
pub(super) fn embed(
    x: &Tensor,
    positions: &Tensor,
    start: usize,
    norm: &LayerNorm,
    p: f64,
    mode: &mut Mode,
) -> Result<Tensor> {
    let len = start + x.dim(1)?;
    let max = positions.dim(0)? - POSITION_OFFSET;
    if len > max {
        return Err(Error::usage(format!(
            "a sequence of {len} positions exceeds the language model's {max}; shorten the prompt or caption"
        )));
    }
    let rows = positions.narrow(0, POSITION_OFFSET + start, x.dim(1)?)?;
    let x = norm.forward(&x.broadcast_add(&rows.to_dtype(x.dtype())?)?)?;
    dropout(&x, p, mode)
}

/// The BART encoder over `[image features ; prompt embeddings]`.
#[derive(Debug, Clone)]
pub struct BartEncoder {
    embed_positions: Tensor,
    layernorm_embedding: LayerNorm,
    layers: Vec<EncoderLayer>,
    dropout: f64,
}

impl BartEncoder {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embed_positions: embed_positions(cfg, &vb)?,
            layernorm_embedding: LayerNorm::new(cfg.d_model, LN_EPS, vb.pp("layernorm_embedding"))?,
            layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            dropout: cfg.dropout,
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    pub(super) self_attn: BartAttention,
    pub(super) self_attn_layer_norm: LayerNorm,
    pub(super) encoder_attn: BartAttention,
    pub(super) encoder_attn_layer_norm: LayerNorm,
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
    pub(super) final_layer_norm: LayerNorm,
    pub(super) dropout: f64,
    pub(super) activation_dropout: f64,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, heads) = (cfg.d_model, cfg.decoder_attention_heads);
        Ok(Self {
            self_attn: BartAttention::new(cfg, heads, vb.pp("self_attn"))?,
            self_attn_layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: BartAttention::new(cfg, heads, vb.pp("encoder_attn"))?,
            encoder_attn_layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("encoder_attn_layer_norm"))?,
            fc1: linear(d, cfg.decoder_ffn_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.decoder_ffn_dim, d, vb.pp("fc2"))?,
            final_layer_norm: LayerNorm::new(d, LN_EPS, vb.pp("final_layer_norm"))?,
            dropout: cfg.dropout,
            activation_dropout: cfg.activation_dropout,
        })
    }

    /// `x` `[B, L, d]` under the causal mask `causal`, attending to `memory` `[B, S, d]` under
    /// its key mask `memory_mask`.
    fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        (causal, memory_mask): (&Tensor, &Tensor),
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let a = self.self_attn.forward(x, x, causal, mode)?;
        let x = residual(x, &a, &self.self_attn_layer_norm, self.dropout, mode)?;
        let c = self.encoder_attn.forward(&x, memory, memory_mask, mode)?;
        let x = residual(&x, &c, &self.encoder_attn_layer_norm, self.dropout, mode)?;
        let m = mlp(&self.fc1, &self.fc2, self.activation_dropout, &x, mode)?;
        residual(&x, &m, &self.final_layer_norm, self.dropout, mode)
    }
}

/// The BART decoder (its head lives with the shared embedding in [`BartLanguageModel`]).
#[derive(Debug, Clone)]
pub struct BartDecoder {
    pub(super) embed_positions: Tensor,
    pub(super) layernorm_embedding: LayerNorm,
    pub(super) layers: Vec<DecoderLayer>,
    dropout: f64,
}

impl BartDecoder {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embed_positions: embed_positions(cfg, &vb)?,
            layernorm_embedding: LayerNorm::new(cfg.d_model, LN_EPS, vb.pp("layernorm_embedding"))?,
            layers: (0..cfg.decoder_layers)
                .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            dropout: cfg.dropout,
        })
    }
}

/// The language model: shared token embeddings, encoder, decoder and the tied head.
#[derive(Debug, Clone)]
pub struct BartLanguageModel {
    /// `[vocab, d]`: the token embeddings of encoder and decoder and the head's weights.
    shared: Tensor,
    /// `[vocab]`, the remote layout's (never trained) logits bias, when the checkpoint has it.
    final_logits_bias: Option<Tensor>,
    embed_scale: f64,
    /// The encoder.
    pub encoder: BartEncoder,
    /// The decoder.
    pub decoder: BartDecoder,
}

impl BartLanguageModel {
    /// Reads `language_model.*` under `vb`, the model's root (see
    /// [`Parameters::var_builder`](super::Parameters::var_builder)).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("language_model");
        let shared = vb.pp("model").get_unchecked("shared.weight")?;
        let (vocab, d) = shared.dims2()?;
        if d != cfg.d_model {
            return Err(Error::config(format!(
                "token embeddings are {vocab}x{d} but text_config.d_model is {}",
                cfg.d_model
            )));
        }
        let final_logits_bias = if vb.contains_tensor("final_logits_bias") {
            Some(vb.get((1, vocab), "final_logits_bias")?.squeeze(0)?)
        } else {
            None
        };
        Ok(Self {
            shared,
            final_logits_bias,
            embed_scale: if cfg.scale_embedding { (d as f64).sqrt() } else { 1.0 },
            encoder: BartEncoder::new(cfg, vb.pp("model").pp("encoder"))?,
            decoder: BartDecoder::new(cfg, vb.pp("model").pp("decoder"))?,
        })
    }

    /// Token embeddings `[B, L, d]` of `ids` `[B, L]`, scaled as `BartScaledWordEmbedding`.
    /// Rows looked up for the pad id pass no gradient back: the embedding is torch's
    /// `Embedding(padding_idx = 1)`.
    pub(super) fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let rows = self.shared.embedding(&ids.flatten_all()?)?.reshape((b, l, ()))?;
        let keep = ids.ne(PAD)?.unsqueeze(D::Minus1)?.broadcast_as(rows.shape())?;
        let rows = keep.where_cond(&rows, &rows.detach())?;
        Ok(if self.embed_scale != 1.0 {
            (rows * self.embed_scale)?
        } else {
            rows
        })
    }

    /// The encoder's embedded input: `image_embeds` `[B, N, d]` then the prompt's embeddings.
    fn encoder_embeddings(&self, image_embeds: &Tensor, prompt_ids: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let (b, p) = (image_embeds.dim(0)?, prompt_ids.dim(0)?);
        if b != p {
            return Err(Error::usage(format!(
                "{b} images' embeddings for {p} prompts: give one image per sample"
            )));
        }
        let text = self.embed_tokens(prompt_ids)?.to_dtype(image_embeds.dtype())?;
        let x = Tensor::cat(&[image_embeds, &text], 1)?;
        let e = &self.encoder;
        embed(&x, &e.embed_positions, 0, &e.layernorm_embedding, e.dropout, mode)
    }

    /// The encoder's output `[B, N + P, d]` for `image_embeds` `[B, N, d]` and one `prompt`
    /// shared by every image (nothing padded, so nothing masked), in evaluation mode: the
    /// memory that generation attends to.
    pub fn encode_prompt(&self, image_embeds: &Tensor, prompt: &[u32]) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let ids = Tensor::new(prompt, image_embeds.device())?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let mut mode = Mode::eval();
        let mut x = self.encoder_embeddings(image_embeds, &ids, &mut mode)?;
        let unmasked = Tensor::zeros((1, 1, 1, x.dim(1)?), x.dtype(), x.device())?;
        for layer in &self.encoder.layers {
            x = layer.forward(&x, &unmasked, &mut mode)?;
        }
        Ok(x)
    }

    /// The encoder's key mask for `memory` `[B, N + P, d]`.
    fn memory_mask(memory: &Tensor, inputs: &TextInputs) -> Result<Tensor> {
        let n_image = memory.dim(1)? - inputs.prompt_ids.dim(1)?;
        inputs.encoder_mask(n_image, memory.dtype())
    }

    /// The logits `[B, L, V]` of the decoder's last hidden states `h` `[B, L, d]`.
    pub(super) fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, l, d) = h.dims3()?;
        let logits = h.reshape((b * l, d))?.matmul(&self.shared.t()?)?;
        let logits = match &self.final_logits_bias {
            Some(bias) => logits.broadcast_add(bias)?,
            None => logits,
        };
        Ok(logits.reshape((b, l, ()))?)
    }

    /// The encoder's output `[B, N + P, d]` for `image_embeds` `[B, N, d]` and the prompts.
    fn encode(&self, image_embeds: &Tensor, inputs: &TextInputs, mode: &mut Mode) -> Result<Tensor> {
        let mut x = self.encoder_embeddings(image_embeds, &inputs.prompt_ids, mode)?;
        let mask = Self::memory_mask(&x, inputs)?;
        for layer in &self.encoder.layers {
            x = layer.forward(&x, &mask, mode)?;
        }
        Ok(x)
    }

    /// Teacher-forced logits `[B, L, V]` over the full vocabulary, in one graph.
    pub fn logits(&self, image_embeds: &Tensor, inputs: &TextInputs, mode: &mut Mode) -> Result<Tensor> {
        let memory = self.encode(image_embeds, inputs, mode)?;
        let masks = DecoderMasks::new(&memory, inputs)?;
        let mut x = self.decoder_embeddings(inputs, memory.dtype(), mode)?;
        for layer in &self.decoder.layers {
            x = layer.forward(&x, &memory, masks.pair(), mode)?;
        }
        self.lm_head(&x)
    }

    /// The decoder's embedded input `[B, L, d]`.
    fn decoder_embeddings(&self, inputs: &TextInputs, dtype: DType, mode: &mut Mode) -> Result<Tensor> {
        let x = self.embed_tokens(&inputs.decoder_input_ids)?.to_dtype(dtype)?;
        let d = &self.decoder;
        embed(&x, &d.embed_positions, 0, &d.layernorm_embedding, d.dropout, mode)
    }

    /// The language model as a chain of segments, from `[image_embeds]` (`[B, N, d]`, the
    /// projector's output) to `[ce_sum]`, the summed cross-entropy of the counted labels:
    /// the encoder's embeddings, each encoder layer, the decoder's embeddings (which pass the
    /// encoder output on), each decoder layer (state `[hidden, encoder output]`), the head and
    /// loss.
    pub fn segments<'a>(&'a self, inputs: &'a TextInputs) -> Vec<Box<dyn Segment + 'a>> {
        let mut chain: Vec<Box<dyn Segment + 'a>> = Vec::new();
        chain.push(Box::new(Link(move |xs: &[Tensor], mode: &mut Mode| {
            Ok(vec![self.encoder_embeddings(&xs[0], &inputs.prompt_ids, mode)?])
        })));
        for layer in &self.encoder.layers {
            chain.push(Box::new(Link(move |xs: &[Tensor], mode: &mut Mode| {
                let mask = Self::memory_mask(&xs[0], inputs)?;
                Ok(vec![layer.forward(&xs[0], &mask, mode)?])
            })));
        }
        chain.push(Box::new(Link(move |xs: &[Tensor], mode: &mut Mode| {
            let x = self.decoder_embeddings(inputs, xs[0].dtype(), mode)?;
            Ok(vec![x, xs[0].clone()])
        })));
        for layer in &self.decoder.layers {
            chain.push(Box::new(Link(move |xs: &[Tensor], mode: &mut Mode| {
                let masks = DecoderMasks::new(&xs[1], inputs)?;
                Ok(vec![layer.forward(&xs[0], &xs[1], masks.pair(), mode)?, xs[1].clone()])
            })));
        }
        chain.push(Box::new(Link(move |xs: &[Tensor], _: &mut Mode| {
            let logits = self.lm_head(&xs[0])?;
            Ok(vec![cross_entropy_sum(&logits, &inputs.labels, &inputs.label_mask)?])
        })));
        chain
    }
}

/// The decoder's two masks: causal self-attention, and the encoder's key mask for
/// cross-attention (no decoder padding mask, as transformers without `decoder_attention_mask`).
struct DecoderMasks {
    causal: Tensor,
    memory: Tensor,
}

impl DecoderMasks {
    fn new(memory: &Tensor, inputs: &TextInputs) -> Result<Self> {
        let len = inputs.decoder_input_ids.dim(1)?;
        Ok(Self {
            causal: causal_mask(len, memory.dtype(), memory.device())?,
            memory: BartLanguageModel::memory_mask(memory, inputs)?,
        })
    }

    fn pair(&self) -> (&Tensor, &Tensor) {
        (&self.causal, &self.memory)
    }
}

/// A segment made of a closure over the model and the micro-batch.
struct Link<F>(F);

impl<F> Segment for Link<F>
where
    F: Fn(&[Tensor], &mut Mode) -> Result<Vec<Tensor>>,
{
    fn forward(&self, inputs: &[Tensor], mode: &mut Mode) -> Result<Vec<Tensor>> {
        (self.0)(inputs, mode)
    }
}

#[cfg(test)]
#[path = "language_tests.rs"]
mod tests;
