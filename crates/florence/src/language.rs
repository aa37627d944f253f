//! The BART encoder-decoder language model (spec §6), with an incremental decoder: a
//! self-attention KV cache per layer, and cross-attention keys/values computed once per image
//! and shared by all of that image's beams.

use candle_core::{IndexOp, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::config::TextConfig;
use crate::error::Result;
use crate::nn::{attention, Epilogue, LayerNorm, Linear, Matrix, WeightFormat};

/// BART's learned positions are offset by two rows (a fairseq legacy).
const POSITION_OFFSET: usize = 2;

#[derive(Debug, Clone)]
struct BartAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl BartAttention {
    fn new(d: usize, heads: usize, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(d, d, vb.pp("q_proj"), format)?,
            k_proj: Linear::new(d, d, vb.pp("k_proj"), format)?,
            v_proj: Linear::new(d, d, vb.pp("v_proj"), format)?,
            out_proj: Linear::new(d, d, vb.pp("out_proj"), format)?,
            heads,
            head_dim: d / heads,
        })
    }

    /// `[B, L, d]` to `[B, heads, L, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, l, _) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, l, self.heads * self.head_dim))?)
    }

    fn scaled_query(&self, x: &Tensor, decode: bool) -> Result<Tensor> {
        let q = if decode { self.q_proj.forward_decode(x, Epilogue::None)? } else { self.q_proj.forward(x)? };
        Ok((q * (self.head_dim as f64).powf(-0.5))?)
    }

    /// Keys and values of `x`, split into heads.
    fn key_values(&self, x: &Tensor, decode: bool) -> Result<(Tensor, Tensor)> {
        let (k, v) = if decode {
            (self.k_proj.forward_decode(x, Epilogue::None)?, self.v_proj.forward_decode(x, Epilogue::None)?)
        } else {
            (self.k_proj.forward(x)?, self.v_proj.forward(x)?)
        };
        Ok((self.split_heads(&k)?, self.split_heads(&v)?))
    }

    /// `x` plus its unmasked self-attention over the whole sequence (the encoder).
    fn forward_full_residual(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.split_heads(&self.scaled_query(x, false)?)?;
        let (k, v) = self.key_values(x, false)?;
        self.out_proj.forward_then(&self.merge_heads(&attention(&q, &k, &v)?)?, Epilogue::Residual(x))
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: BartAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: BartAttention::new(d, cfg.encoder_attention_heads, vb.pp("self_attn"), format)?,
            self_attn_layer_norm: LayerNorm::new(d, vb.pp("self_attn_layer_norm"))?,
            fc1: Linear::new(d, cfg.encoder_ffn_dim, vb.pp("fc1"), format)?,
            fc2: Linear::new(cfg.encoder_ffn_dim, d, vb.pp("fc2"), format)?,
            final_layer_norm: LayerNorm::new(d, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.self_attn_layer_norm.forward(&self.self_attn.forward_full_residual(x)?)?;
        let y = self.fc2.forward_then(&self.fc1.forward_then(&x, Epilogue::Gelu)?, Epilogue::Residual(&x))?;
        self.final_layer_norm.forward(&y)
    }
}

/// The BART encoder over `[image features ; prompt embeddings]`.
#[derive(Debug, Clone)]
pub struct BartEncoder {
    embed_positions: Embedding,
    layernorm_embedding: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl BartEncoder {
    fn new(cfg: &TextConfig, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        Ok(Self {
            embed_positions: candle_nn::embedding(
                cfg.max_position_embeddings + POSITION_OFFSET,
                cfg.d_model,
                vb.pp("embed_positions"),
            )?,
            layernorm_embedding: LayerNorm::new(cfg.d_model, vb.pp("layernorm_embedding"))?,
            layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp("layers").pp(i), format))
                .collect::<Result<_>>()?,
        })
    }

    /// `inputs_embeds` `[B, L, d]` (already embedded, unscaled) to the memory `[B, L, d]`.
    pub fn forward(&self, inputs_embeds: &Tensor) -> Result<Tensor> {
        let (_, l, _) = inputs_embeds.dims3()?;
        let pos = self.embed_positions.embeddings().narrow(0, POSITION_OFFSET, l)?;
        let mut x = self.layernorm_embedding.forward(&inputs_embeds.broadcast_add(&pos)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: BartAttention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: BartAttention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

/// Per-layer decoder state of a generation: the growing self-attention cache and the fixed
/// cross-attention keys/values.
#[derive(Debug, Clone)]
struct LayerState {
    /// `[rows, heads, t, head_dim]` keys and values of the tokens decoded so far.
    self_kv: Option<(Tensor, Tensor)>,
    /// `[images, heads, L, head_dim]` keys and values of the encoder memory.
    cross_kv: (Tensor, Tensor),
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: BartAttention::new(d, heads, vb.pp("self_attn"), format)?,
            self_attn_layer_norm: LayerNorm::new(d, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: BartAttention::new(d, heads, vb.pp("encoder_attn"), format)?,
            encoder_attn_layer_norm: LayerNorm::new(d, vb.pp("encoder_attn_layer_norm"))?,
            fc1: Linear::new(d, cfg.decoder_ffn_dim, vb.pp("fc1"), format)?,
            fc2: Linear::new(cfg.decoder_ffn_dim, d, vb.pp("fc2"), format)?,
            final_layer_norm: LayerNorm::new(d, vb.pp("final_layer_norm"))?,
        })
    }

    /// One new token per row: `x` `[rows, 1, d]`, rows grouped by image (`rows_per_image` each).
    fn step(&self, x: &Tensor, state: &mut LayerState, rows_per_image: usize) -> Result<Tensor> {
        let sa = &self.self_attn;
        let q = sa.split_heads(&sa.scaled_query(x, true)?)?;
        let (k, v) = sa.key_values(x, true)?;
        let (k, v) = match state.self_kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            None => (k, v),
        };
        let y = sa.out_proj.forward_decode(&sa.merge_heads(&attention(&q, &k, &v)?)?, Epilogue::Residual(x))?;
        state.self_kv = Some((k, v));
        let x = self.self_attn_layer_norm.forward(&y)?;

        // All beams of an image attend to the same memory: fold them into the query length
        // instead of repeating the memory's keys and values per beam.
        let ca = &self.encoder_attn;
        let (rows, _, d) = x.dims3()?;
        let images = rows / rows_per_image;
        let q = ca
            .scaled_query(&x, true)?
            .reshape((images, rows_per_image, ca.heads, ca.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let (ck, cv) = &state.cross_kv;
        let y = attention(&q, ck, cv)?.transpose(1, 2)?.reshape((rows, 1, d))?;
        let x = self.encoder_attn_layer_norm.forward(&ca.out_proj.forward_decode(&y, Epilogue::Residual(&x))?)?;

        let y = self.fc2.forward_decode(&self.fc1.forward_decode(&x, Epilogue::Gelu)?, Epilogue::Residual(&x))?;
        self.final_layer_norm.forward(&y)
    }
}

/// The BART decoder and the (tied) language-model head.
#[derive(Debug, Clone)]
pub struct BartDecoder {
    /// The shared token embeddings (tied with `lm_head`).
    embed_tokens: Matrix,
    embed_scale: f64,
    embed_positions: Embedding,
    layernorm_embedding: LayerNorm,
    layers: Vec<DecoderLayer>,
    /// The (tied) output projection, with `final_logits_bias` as its bias when present.
    lm_head: Linear,
    max_positions: usize,
}

/// The decoder's state during one generation over a batch of images.
#[derive(Debug, Clone)]
pub struct DecoderState {
    layers: Vec<LayerState>,
    rows_per_image: usize,
    /// Tokens fed so far (the next token's position).
    pub position: usize,
}

impl DecoderState {
    /// Reorders the self-attention caches so that row `i` continues from old row `order[i]`.
    pub fn reorder(&mut self, order: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.self_kv.take() {
                layer.self_kv = Some((k.index_select(order, 0)?, v.index_select(order, 0)?));
            }
        }
        Ok(())
    }
}

impl BartDecoder {
    fn new(cfg: &TextConfig, vb: VarBuilder, root: &VarBuilder, shared: &Matrix, format: WeightFormat) -> Result<Self> {
        let (vocab, d) = shared.dims();
        let final_logits_bias = if root.contains_tensor("language_model.final_logits_bias") {
            Some(root.get((1, vocab), "language_model.final_logits_bias")?.squeeze(0)?)
        } else {
            None
        };
        Ok(Self {
            embed_tokens: shared.clone(),
            embed_scale: if cfg.scale_embedding { (d as f64).sqrt() } else { 1.0 },
            embed_positions: candle_nn::embedding(
                cfg.max_position_embeddings + POSITION_OFFSET,
                d,
                vb.pp("embed_positions"),
            )?,
            layernorm_embedding: LayerNorm::new(d, vb.pp("layernorm_embedding"))?,
            layers: (0..cfg.decoder_layers)
                .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i), format))
                .collect::<Result<_>>()?,
            lm_head: Linear::from_weights(shared.clone(), final_logits_bias)?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Rows of the output vocabulary (including any padding rows of native checkpoints).
    pub fn vocab_size(&self) -> usize {
        self.lm_head.out_dim()
    }

    /// The most decoder positions a generation can use.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Prepares a generation: the cross-attention keys/values of `memory` `[images, L, d]`.
    pub fn start(&self, memory: &Tensor, rows_per_image: usize) -> Result<DecoderState> {
        let layers = self
            .layers
            .iter()
            .map(|l| Ok(LayerState { self_kv: None, cross_kv: l.encoder_attn.key_values(memory, false)? }))
            .collect::<Result<_>>()?;
        Ok(DecoderState { layers, rows_per_image, position: 0 })
    }

    /// Feeds one token per row and returns the next-token logits `[rows, vocab]` (f32).
    pub fn step(&self, tokens: &[u32], state: &mut DecoderState) -> Result<Tensor> {
        let dev = self.embed_positions.embeddings().device();
        let mut x = self.embed_tokens.rows_f32(tokens, dev)?;
        if self.embed_scale != 1.0 {
            x = (x * self.embed_scale)?;
        }
        let pos = self.embed_positions.embeddings().i(state.position + POSITION_OFFSET)?;
        let x = x.broadcast_add(&pos)?.unsqueeze(1)?;
        let mut x = self.layernorm_embedding.forward(&x)?;
        for (layer, ls) in self.layers.iter().zip(state.layers.iter_mut()) {
            x = layer.step(&x, ls, state.rows_per_image)?;
        }
        state.position += 1;
        self.lm_head.forward_decode(&x.squeeze(1)?, Epilogue::None)
    }
}

/// The language model: shared token embeddings, encoder, decoder and head.
#[derive(Debug, Clone)]
pub struct BartLanguageModel {
    /// `[vocab, d]`, tied to the decoder's input embeddings and `lm_head` as transformers ties them
    /// (a checkpoint's own copies of those are ignored).
    shared: Matrix,
    pub encoder: BartEncoder,
    pub decoder: BartDecoder,
}

impl BartLanguageModel {
    /// Loads `language_model.*`; `root` is the checkpoint root (for the logits bias). Weight
    /// matrices, the shared embeddings included, are held in `format`.
    pub fn new(cfg: &TextConfig, root: VarBuilder, format: WeightFormat) -> Result<Self> {
        let vb = root.pp("language_model").pp("model");
        let shared = vb.get_unchecked("shared.weight")?;
        let (vocab, d) = shared.dims2()?;
        if d != cfg.d_model {
            return Err(crate::Error::config(format!(
                "token embeddings are {vocab}x{d} but text_config.d_model is {}",
                cfg.d_model
            )));
        }
        let shared = Matrix::new(shared, format)?;
        Ok(Self {
            encoder: BartEncoder::new(cfg, vb.pp("encoder"), format)?,
            decoder: BartDecoder::new(cfg, vb.pp("decoder"), &root, &shared, format)?,
            shared,
        })
    }

    /// Embeds prompt token ids with the shared embeddings, scaled by `sqrt(d_model)` when
    /// `scale_embedding` is set, as transformers' `BartScaledWordEmbedding` does: `[ids.len(), d]`.
    pub fn embed_prompt(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        let x = self.shared.rows_f32(ids, device)?;
        Ok(if self.decoder.embed_scale != 1.0 { (x * self.decoder.embed_scale)? } else { x })
    }
}
