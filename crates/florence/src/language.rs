//! The BART encoder-decoder language model (spec §6), with an incremental decoder: a
//! self-attention KV cache per layer, and cross-attention keys/values computed once per image
//! and shared by all of that image's beams.

use candle_core::{IndexOp, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::config::TextConfig;
use crate::error::Result;
use crate::nn::{attend_rows, attention, Epilogue, HeadKv, Keys, LayerNorm, Linear, Matrix, MatrixSource};

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
    fn new(d: usize, heads: usize, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(d, d, vb.pp("q_proj"), weights)?,
            k_proj: Linear::new(d, d, vb.pp("k_proj"), weights)?,
            v_proj: Linear::new(d, d, vb.pp("v_proj"), weights)?,
            out_proj: Linear::new(d, d, vb.pp("out_proj"), weights)?,
            heads,
            head_dim: d / heads,
        })
    }

    /// `[B, L, d]` to `[B, heads, L, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, l, _) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, l, self.heads * self.head_dim))?)
    }

    /// `x` plus its unmasked self-attention over the whole sequence (the encoder).
    fn forward_full_residual(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.split_heads(&(self.q_proj.forward(x)? * self.scaling())?)?;
        let k = self.split_heads(&self.k_proj.forward(x)?)?;
        let v = self.split_heads(&self.v_proj.forward(x)?)?;
        self.out_proj
            .forward_residual(&self.merge_heads(&attention(&q, &k, &v)?)?, x)
    }

    fn scaling(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// The scaled queries `[rows, d]` of a decoding step's rows `x`.
    fn step_queries(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut q = self.q_proj.forward_decode(x, rows, Epilogue::None)?;
        let scaling = self.scaling() as f32;
        q.iter_mut().for_each(|q| *q *= scaling);
        Ok(q)
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
    fn new(cfg: &TextConfig, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: BartAttention::new(d, cfg.encoder_attention_heads, vb.pp("self_attn"), weights)?,
            self_attn_layer_norm: LayerNorm::new(d, vb.pp("self_attn_layer_norm"))?,
            fc1: Linear::new(d, cfg.encoder_ffn_dim, vb.pp("fc1"), weights)?,
            fc2: Linear::new(cfg.encoder_ffn_dim, d, vb.pp("fc2"), weights)?,
            final_layer_norm: LayerNorm::new(d, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .self_attn_layer_norm
            .forward(&self.self_attn.forward_full_residual(x)?)?;
        let y = self.fc2.forward_residual(&self.fc1.forward_gelu(&x)?, &x)?;
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
    fn new(cfg: &TextConfig, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        Ok(Self {
            embed_positions: candle_nn::embedding(
                cfg.max_position_embeddings + POSITION_OFFSET,
                cfg.d_model,
                vb.pp("embed_positions"),
            )?,
            layernorm_embedding: LayerNorm::new(cfg.d_model, vb.pp("layernorm_embedding"))?,
            layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp("layers").pp(i), weights))
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

/// One layer's cache for one image.
#[derive(Debug, Clone)]
struct LayerCache {
    /// Per head, the self-attention keys and values of every token fed so far, `[steps, rows,
    /// hd]`: what row `r` of the image held at step `s`, whichever beam that was then
    /// ([`SequenceCache::lineage`] says which).
    self_k: Vec<Vec<f32>>,
    self_v: Vec<Vec<f32>>,
    /// Cross-attention keys of the image's encoder memory, transposed per head: `[heads, hd, L]`.
    cross_k_t: Vec<f32>,
    /// Cross-attention values of the image's encoder memory, `[heads, L, hd]`.
    cross_v: Vec<f32>,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let d = cfg.d_model;
        let heads = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: BartAttention::new(d, heads, vb.pp("self_attn"), weights)?,
            self_attn_layer_norm: LayerNorm::new(d, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: BartAttention::new(d, heads, vb.pp("encoder_attn"), weights)?,
            encoder_attn_layer_norm: LayerNorm::new(d, vb.pp("encoder_attn_layer_norm"))?,
            fc1: Linear::new(d, cfg.decoder_ffn_dim, vb.pp("fc1"), weights)?,
            fc2: Linear::new(cfg.decoder_ffn_dim, d, vb.pp("fc2"), weights)?,
            final_layer_norm: LayerNorm::new(d, vb.pp("final_layer_norm"))?,
        })
    }

    /// One new token per row: `x` `[rows, d]` to `[rows, d]`. Rows come image by image, as
    /// many as each image's cache has; `self_starts[i][r]` are the offsets in image `i`'s
    /// per-head cache of the entries its row `r` attends to.
    fn step(
        &self,
        x: &[f32],
        caches: &mut [&mut LayerCache],
        groups: &[usize],
        self_starts: &[Vec<Vec<usize>>],
        memory_starts: &[Vec<Vec<usize>>],
    ) -> Result<Vec<f32>> {
        let rows: usize = groups.iter().sum();
        let sa = &self.self_attn;
        let (heads, hd) = (sa.heads, sa.head_dim);
        let q = sa.step_queries(x, rows)?;
        let k = sa.k_proj.forward_decode(x, rows, Epilogue::None)?;
        let v = sa.v_proj.forward_decode(x, rows, Epilogue::None)?;
        let mut row = 0;
        for (cache, &n) in caches.iter_mut().zip(groups) {
            for (h, (kc, vc)) in cache.self_k.iter_mut().zip(&mut cache.self_v).enumerate() {
                for r in row..row + n {
                    kc.extend_from_slice(&k[r * heads * hd + h * hd..][..hd]);
                    vc.extend_from_slice(&v[r * heads * hd + h * hd..][..hd]);
                }
            }
            row += n;
        }
        let caches: Vec<&LayerCache> = caches.iter().map(|c| &**c).collect();
        // An image's beams read its cache together (their slots sit side by side at each step),
        // each through its own lineage.
        let y = attend_rows(&q, heads, hd, groups, |i, h| HeadKv {
            keys: Keys::Rows(&caches[i].self_k[h]),
            values: &caches[i].self_v[h],
            starts: &self_starts[i],
        });
        let x = self
            .self_attn_layer_norm
            .forward_rows(&sa.out_proj.forward_decode(&y, rows, Epilogue::Residual(x))?);

        // All beams of an image attend to the same memory keys and values.
        let ca = &self.encoder_attn;
        let q = ca.step_queries(&x, rows)?;
        let y = attend_rows(&q, heads, hd, groups, |i, h| {
            let head_len = memory_starts[i][0].len() * hd;
            HeadKv {
                keys: Keys::Transposed(&caches[i].cross_k_t[h * head_len..][..head_len]),
                values: &caches[i].cross_v[h * head_len..][..head_len],
                starts: &memory_starts[i],
            }
        });
        let x =
            self.encoder_attn_layer_norm
                .forward_rows(&ca.out_proj.forward_decode(&y, rows, Epilogue::Residual(&x))?);

        let h = self.fc1.forward_decode(&x, rows, Epilogue::Gelu)?;
        Ok(self
            .final_layer_norm
            .forward_rows(&self.fc2.forward_decode(&h, rows, Epilogue::Residual(&x))?))
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
    head_dim: usize,
}

/// The decoder's state for one image during generation: its beams' self-attention caches and
/// its memory's cross-attention keys and values. Each image has its own, so that an image can
/// join a running batch or leave it at any step (and images of different lengths, prompts or
/// beam counts can step together).
#[derive(Debug, Clone)]
pub struct SequenceCache {
    layers: Vec<LayerCache>,
    rows: usize,
    /// Offsets of the memory's values in one head's cross-attention cache (one list, shared by
    /// all rows).
    memory_starts: Vec<Vec<usize>>,
    /// Per row, the cache row its sequence occupied at each step. Reordering beams rewrites
    /// these short lists instead of copying every layer's cache, as transformers does.
    lineage: Vec<Vec<u32>>,
    /// Tokens fed so far (the next token's position).
    position: usize,
}

impl SequenceCache {
    /// Rows (beams) of this image.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Makes row `i` continue from the sequence of old row `order[i]`.
    pub fn reorder(&mut self, order: &[u32]) -> Result<()> {
        if order.len() != self.rows || order.iter().any(|&o| o as usize >= self.rows) {
            return Err(crate::Error::usage(format!(
                "a beam order for {} rows: {order:?}",
                self.rows
            )));
        }
        self.lineage = order.iter().map(|&o| self.lineage[o as usize].clone()).collect();
        Ok(())
    }

    /// Per row, the offsets in a head's self-attention cache of the entries it attends to,
    /// once this step's slot is appended.
    fn self_starts(&mut self, hd: usize) -> Vec<Vec<usize>> {
        let rows = self.rows;
        for (r, lineage) in self.lineage.iter_mut().enumerate() {
            lineage.push(r as u32);
        }
        self.lineage
            .iter()
            .map(|l| {
                l.iter()
                    .enumerate()
                    .map(|(s, &row)| (s * rows + row as usize) * hd)
                    .collect()
            })
            .collect()
    }
}

impl BartDecoder {
    fn new(
        cfg: &TextConfig,
        vb: VarBuilder,
        root: &VarBuilder,
        shared: &Matrix,
        weights: MatrixSource,
    ) -> Result<Self> {
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
                .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i), weights))
                .collect::<Result<_>>()?,
            lm_head: Linear::from_weights(shared.clone(), final_logits_bias)?,
            max_positions: cfg.max_position_embeddings,
            head_dim: d / cfg.decoder_attention_heads,
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

    /// Prepares a generation: one cache per image of `memory` `[images, L, d]`, with the
    /// cross-attention keys and values of its memory and `rows_per_image` rows.
    pub fn start(&self, memory: &Tensor, rows_per_image: usize) -> Result<Vec<SequenceCache>> {
        let (images, len, _) = memory.dims3()?;
        let mut caches: Vec<SequenceCache> = (0..images)
            .map(|_| SequenceCache {
                layers: Vec::with_capacity(self.layers.len()),
                rows: rows_per_image,
                memory_starts: vec![(0..len).map(|s| s * self.head_dim).collect()],
                lineage: vec![Vec::new(); rows_per_image],
                position: 0,
            })
            .collect();
        for l in &self.layers {
            let ca = &l.encoder_attn;
            let split = |p: &Linear| -> Result<Tensor> {
                Ok(p.forward(memory)?.reshape((images, len, ca.heads, ca.head_dim))?)
            };
            let k_t = split(&ca.k_proj)?.permute((0, 2, 3, 1))?.contiguous()?;
            let v = split(&ca.v_proj)?.permute((0, 2, 1, 3))?.contiguous()?;
            for (i, cache) in caches.iter_mut().enumerate() {
                cache.layers.push(LayerCache {
                    self_k: vec![Vec::new(); ca.heads],
                    self_v: vec![Vec::new(); ca.heads],
                    cross_k_t: k_t.i(i)?.flatten_all()?.to_vec1()?,
                    cross_v: v.i(i)?.flatten_all()?.to_vec1()?,
                });
            }
        }
        Ok(caches)
    }

    /// Feeds one token per row of each cache's image (rows image by image, in the order of
    /// `caches`) and returns the next-token logits, `[rows, vocab]` row-major. The images may be
    /// at different positions.
    pub fn step(&self, tokens: &[u32], caches: &mut [&mut SequenceCache]) -> Result<Vec<f32>> {
        let groups: Vec<usize> = caches.iter().map(|c| c.rows).collect();
        let rows: usize = groups.iter().sum();
        if tokens.len() != rows {
            return Err(crate::Error::usage(format!(
                "{} tokens fed to a decoder of {rows} rows",
                tokens.len()
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.position >= self.max_positions) {
            return Err(crate::Error::usage(format!(
                "a generation reached the decoder's {} positions",
                c.position
            )));
        }
        let dev = self.embed_positions.embeddings().device();
        let mut x: Vec<f32> = self.embed_tokens.rows_f32(tokens, dev)?.flatten_all()?.to_vec1()?;
        let d = x.len() / rows;
        let scale = self.embed_scale as f32;
        let mut row = 0;
        for (cache, &n) in caches.iter().zip(&groups) {
            let pos: Vec<f32> = self
                .embed_positions
                .embeddings()
                .i(cache.position + POSITION_OFFSET)?
                .to_vec1()?;
            for x in x[row * d..(row + n) * d].chunks_exact_mut(d) {
                x.iter_mut().zip(&pos).for_each(|(x, p)| *x = *x * scale + p);
            }
            row += n;
        }
        let mut x = self.layernorm_embedding.forward_rows(&x);

        let self_starts: Vec<Vec<Vec<usize>>> = caches.iter_mut().map(|c| c.self_starts(self.head_dim)).collect();
        // Lent out for the step (the layers borrow the caches mutably), then put back.
        let memory_starts: Vec<Vec<Vec<usize>>> = caches
            .iter_mut()
            .map(|c| std::mem::take(&mut c.memory_starts))
            .collect();
        let mut out = Ok(());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut LayerCache> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            match layer.step(&x, &mut layer_caches, &groups, &self_starts, &memory_starts) {
                Ok(y) => x = y,
                Err(e) => {
                    out = Err(e);
                    break;
                }
            }
        }
        for (c, starts) in caches.iter_mut().zip(memory_starts) {
            c.memory_starts = starts;
            c.position += 1;
        }
        out?;
        self.lm_head.forward_decode(&x, rows, Epilogue::None)
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
    /// matrices, the shared embeddings included, are held in `weights.format`.
    pub fn new(cfg: &TextConfig, root: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let vb = root.pp("language_model").pp("model");
        let shared = weights.matrix(&vb, "shared.weight", None)?;
        let (vocab, d) = shared.dims();
        if d != cfg.d_model {
            return Err(crate::Error::config(format!(
                "token embeddings are {vocab}x{d} but text_config.d_model is {}",
                cfg.d_model
            )));
        }
        Ok(Self {
            encoder: BartEncoder::new(cfg, vb.pp("encoder"), weights)?,
            decoder: BartDecoder::new(cfg, vb.pp("decoder"), &root, &shared, weights)?,
            shared,
        })
    }

    /// Embeds prompt token ids with the shared embeddings, scaled by `sqrt(d_model)` when
    /// `scale_embedding` is set, as transformers' `BartScaledWordEmbedding` does: `[ids.len(), d]`.
    pub fn embed_prompt(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        let x = self.shared.rows_f32(ids, device)?;
        Ok(if self.decoder.embed_scale != 1.0 {
            (x * self.decoder.embed_scale)?
        } else {
            x
        })
    }
}
