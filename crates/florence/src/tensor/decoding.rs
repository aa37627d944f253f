//! Generation on the tensor path: the model on any candle device (a CUDA GPU), in f32 or bf16,
//! decoding incrementally with a key/value cache that stays on the device.
//!
//! The searches (beam search, greedy, sampling) are the library's own [`generation`] step
//! machines, which see one row of next-token logits per beam; everything the decoder keeps
//! between steps lives on the device, and a beam reorder is one gather of the cache's rows.

use candle_core::{DType, Device, Tensor};

use super::language::{embed, mlp, residual, BartLanguageModel, DecoderLayer};
use super::ops::Mode;
use super::{Florence2, Parameters};
use crate::checkpoint::Checkpoint;
use crate::config::Florence2Config;
use crate::error::{Error, Result};
use crate::generation::{self, GenerationConfig, Sequence, StepDecoder};

/// Florence-2 on the tensor path, loaded for generation: its parameters in one dtype on one
/// device.
#[derive(Debug)]
pub struct Generator {
    model: Florence2,
    /// Keeps the tensors the model reads; none is trainable.
    _params: Parameters,
    dtype: DType,
    device: Device,
    max_positions: usize,
}

impl Generator {
    /// Reads a checked `checkpoint` onto `device` in `dtype` (f32, bf16 or f16).
    pub fn load(config: &Florence2Config, checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::unsupported(format!(
                "the tensor path generates in f32, bf16 or f16, not {dtype:?}"
            )));
        }
        let params = Parameters::from_checkpoint(config, checkpoint, device, |_| false)?.cast_view(dtype)?;
        Ok(Self {
            model: Florence2::new(config, &params)?,
            _params: params,
            dtype,
            device: device.clone(),
            max_positions: config.text.max_position_embeddings,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The most tokens the decoder can hold.
    pub fn max_decoder_positions(&self) -> usize {
        self.max_positions
    }

    /// Generates for every image of `pixel_values` (`[B, 3, H, W]` f32, on any device) after
    /// the same `prompt`, with the settings `gen`.
    pub fn generate(&self, pixel_values: &Tensor, prompt: &[u32], gen: &GenerationConfig) -> Result<Vec<Sequence>> {
        let pixel_values = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let memory = self.model.memory(&pixel_values, prompt)?;
        let mut decoder = TensorDecoder::new(self.model.language_model(), &memory, gen.num_beams, gen.max_length())?;
        generation::generate(gen, pixel_values.dim(0)?, &mut decoder)
    }
}

/// A decoding in progress over a fixed set of images, one group of consecutive rows each (its
/// beams): the cross-attention keys and values of every layer, computed once from the encoder's
/// output, and a self-attention cache allocated for the longest sequence.
pub struct TensorDecoder<'a> {
    lm: &'a BartLanguageModel,
    /// Each layer's cross-attention keys and values, `[rows, heads, S, head_dim]`.
    cross: Vec<(Tensor, Tensor)>,
    /// Each layer's self-attention keys and values, time first: `[capacity, rows, heads,
    /// head_dim]`, so that a step writes one contiguous block and a reorder gathers the filled
    /// block's rows.
    cache: Vec<(Tensor, Tensor)>,
    /// Tokens fed so far.
    len: usize,
    capacity: usize,
    rows_per_image: usize,
    /// The image of each group of rows now held, in order.
    held: Vec<usize>,
    /// Beam reorders asked for since the last step, by image.
    pending: Vec<Option<Vec<u32>>>,
}

impl<'a> TensorDecoder<'a> {
    /// A decoder over the encoder output `memory` `[B, S, d]`, with `rows_per_image` rows per
    /// image and room for `capacity` tokens per row.
    pub fn new(lm: &'a BartLanguageModel, memory: &Tensor, rows_per_image: usize, capacity: usize) -> Result<Self> {
        let images = memory.dim(0)?;
        let rows = Tensor::new(
            (0..images as u32)
                .flat_map(|i| std::iter::repeat_n(i, rows_per_image))
                .collect::<Vec<u32>>(),
            memory.device(),
        )?;
        let mut cross = Vec::new();
        let mut cache = Vec::new();
        for layer in &lm.decoder.layers {
            let a = &layer.encoder_attn;
            // Projected per image, then repeated per beam: the beams of an image share memory.
            let project = |p: &candle_nn::Linear| -> Result<Tensor> {
                Ok(a.split_heads(&candle_nn::Module::forward(p, memory)?)?
                    .index_select(&rows, 0)?)
            };
            let (k, v) = (project(&a.k_proj)?, project(&a.v_proj)?);
            let (_, heads, _, head_dim) = k.dims4()?;
            let empty = || {
                Tensor::zeros(
                    (capacity, images * rows_per_image, heads, head_dim),
                    k.dtype(),
                    k.device(),
                )
            };
            cache.push((empty()?, empty()?));
            cross.push((k, v));
        }
        Ok(Self {
            lm,
            cross,
            cache,
            len: 0,
            capacity,
            rows_per_image,
            held: (0..images).collect(),
            pending: vec![None; images],
        })
    }

    /// Brings the cache to the rows of `images` (a subset of those held, in order), each
    /// image's rows in the order its last reorder asked for: one gather, or nothing when
    /// neither changed.
    fn gather(&mut self, images: &[usize]) -> Result<()> {
        let unchanged = images == self.held.as_slice();
        if unchanged && images.iter().all(|&i| self.pending[i].is_none()) {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(images.len() * self.rows_per_image);
        for &image in images {
            let group = self.held.iter().position(|&h| h == image).ok_or_else(|| {
                Error::usage(format!(
                    "decoding step over image {image}, which is not (or no longer) in this decoder"
                ))
            })?;
            let base = (group * self.rows_per_image) as u32;
            match self.pending[image].take() {
                Some(order) => rows.extend(order.iter().map(|&r| base + r)),
                None => rows.extend((0..self.rows_per_image as u32).map(|r| base + r)),
            }
        }
        let device = self.cross[0].0.device().clone();
        let index = Tensor::new(rows.as_slice(), &device)?;
        for (k, v) in &mut self.cache {
            for t in [k, v] {
                let (_, _, heads, head_dim) = t.dims4()?;
                let fresh = Tensor::zeros((self.capacity, rows.len(), heads, head_dim), t.dtype(), &device)?;
                if self.len > 0 {
                    fresh.slice_set(&t.narrow(0, 0, self.len)?.index_select(&index, 1)?, 0, 0)?;
                }
                *t = fresh;
            }
        }
        if !unchanged {
            // The images that left drop out of the cross-attention rows too; every row of an
            // image holds the same memory, so reorders do not touch them.
            let groups: Vec<u32> = rows
                .chunks(self.rows_per_image)
                .map(|g| g[0] - g[0] % self.rows_per_image as u32)
                .flat_map(|base| base..base + self.rows_per_image as u32)
                .collect();
            let index = Tensor::new(groups.as_slice(), &device)?;
            for (k, v) in &mut self.cross {
                *k = k.index_select(&index, 0)?;
                *v = v.index_select(&index, 0)?;
            }
            self.held = images.to_vec();
        }
        Ok(())
    }

    /// One decoder layer on the step's hidden states `x` `[rows, 1, d]`, writing this step's
    /// keys and values at position `self.len` of the layer's cache.
    fn layer_step(&self, layer: &DecoderLayer, l: usize, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let a = &layer.self_attn;
        let rows = x.dim(0)?;
        let (cache_k, cache_v) = &self.cache[l];
        for (cache, proj) in [(cache_k, &a.k_proj), (cache_v, &a.v_proj)] {
            let (_, _, heads, head_dim) = cache.dims4()?;
            let new = candle_nn::Module::forward(proj, x)?.reshape((1, rows, heads, head_dim))?;
            cache.slice_set(&new, 0, self.len)?;
        }
        // [len + 1, rows, heads, hd] to [rows, heads, len + 1, hd].
        let past =
            |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, 0, self.len + 1)?.permute((1, 2, 0, 3))?.contiguous()?) };
        let h = a.attend(x, &past(cache_k)?, &past(cache_v)?, None, mode)?;
        let x = residual(x, &h, &layer.self_attn_layer_norm, layer.dropout, mode)?;
        let (k, v) = &self.cross[l];
        let c = layer.encoder_attn.attend(&x, k, v, None, mode)?;
        let x = residual(&x, &c, &layer.encoder_attn_layer_norm, layer.dropout, mode)?;
        let m = mlp(&layer.fc1, &layer.fc2, layer.activation_dropout, &x, mode)?;
        residual(&x, &m, &layer.final_layer_norm, layer.dropout, mode)
    }
}

impl StepDecoder for TensorDecoder<'_> {
    fn step(&mut self, images: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != images.len() * self.rows_per_image {
            return Err(Error::usage(format!(
                "{} tokens for {} images of {} rows",
                tokens.len(),
                images.len(),
                self.rows_per_image
            )));
        }
        if self.len == self.capacity {
            return Err(Error::usage(format!(
                "the decoder holds {} tokens per row and is full",
                self.capacity
            )));
        }
        self.gather(images)?;
        let mut mode = Mode::eval();
        let device = self.cross[0].0.device();
        let ids = Tensor::new(tokens, device)?.unsqueeze(1)?;
        let d = &self.lm.decoder;
        let dtype = self.cross[0].0.dtype();
        let x = self.lm.embed_tokens(&ids)?.to_dtype(dtype)?;
        let mut x = embed(&x, &d.embed_positions, self.len, &d.layernorm_embedding, 0.0, &mut mode)?;
        for (l, layer) in d.layers.iter().enumerate() {
            x = self.layer_step(layer, l, &x, &mut mode)?;
        }
        self.len += 1;
        let logits = self.lm.lm_head(&x)?.squeeze(1)?;
        Ok(logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2()?)
    }

    fn reorder(&mut self, image: usize, order: &[u32]) -> Result<()> {
        if order.len() != self.rows_per_image || order.iter().any(|&r| r as usize >= self.rows_per_image) {
            return Err(Error::usage(format!(
                "a reorder of {order:?} for images of {} rows",
                self.rows_per_image
            )));
        }
        match self.pending.get_mut(image) {
            Some(slot) => {
                // A second reorder before the next step applies on top of the first.
                *slot = Some(match slot.take() {
                    Some(first) => order.iter().map(|&r| first[r as usize]).collect(),
                    None => order.to_vec(),
                });
                Ok(())
            }
            None => Err(Error::usage(format!("no image {image} to reorder"))),
        }
    }
}
