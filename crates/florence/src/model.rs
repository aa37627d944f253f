//! The whole Florence-2 model: vision encoder, projector and language model, loaded from a
//! checkpoint in either layout.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{Checkpoint, InPlacePages, WeightFiles};
use crate::config::{Florence2Config, Layout};
use crate::error::{Error, Result};
use crate::generation::StepDecoder;
use crate::language::{BartLanguageModel, SequenceCache};
use crate::nn::MatrixSource;
use crate::projector::ImageProjector;
use crate::vision::DaViT;
use crate::LoadOptions;

/// Florence-2 for conditional generation.
#[derive(Debug, Clone)]
pub struct Florence2 {
    /// The configuration the model was built from.
    pub config: Florence2Config,
    /// The layout the weights were stored in.
    pub layout: Layout,
    vision_tower: DaViT,
    projector: ImageProjector,
    language_model: BartLanguageModel,
    /// The language model's pages of the mapped checkpoint, populated by [`settle_memory`]
    /// once the first pass of the vision tower is over: during it they would add to its peak of
    /// activations.
    ///
    /// [`settle_memory`]: Self::settle_memory
    // Measured: peak RSS 1237 MB instead of 1080 for base when all pages were populated at load.
    language_pages: Arc<Mutex<Option<InPlacePages>>>,
    device: Device,
    /// See [`warnings`](Self::warnings).
    warnings: Vec<String>,
}

impl Florence2 {
    /// Loads the weights of `files` for `config`, holding the weight matrices of the vision
    /// tower and of the language model in the formats `options` asks for (computation is f32
    /// throughout). The files are first checked against the config: a tensor it needs is
    /// missing, or (with `options.strict`) one it does not use is present, is an error; unused
    /// tensors otherwise become a [warning](Self::warnings).
    pub fn load(config: Florence2Config, files: &WeightFiles, options: &LoadOptions) -> Result<Self> {
        let mut checkpoint = Checkpoint::open(files)?;
        let warning = checkpoint.check(&config, options.strict)?;
        let mut model = Self::build(config, &checkpoint, options)?;
        model.warnings.extend(warning);
        Ok(model)
    }

    /// Builds the model from the tensors of a checked `checkpoint`.
    pub(crate) fn build(config: Florence2Config, checkpoint: &Checkpoint, options: &LoadOptions) -> Result<Self> {
        let device = &options.device;
        if !device.is_cpu() {
            // The fast path reads host memory; `Florence::load` runs the tensor path elsewhere.
            return Err(Error::unsupported(
                "Florence2 runs on the CPU kernels; load a model for a GPU with Florence::load, which runs the tensor path there",
            ));
        }
        let layout = checkpoint.layout;
        let path = checkpoint.path().to_path_buf();
        let vb = VarBuilder::from_backend(Box::new(checkpoint), DType::F32, device.clone());
        let wrap = |e: Error| match e {
            Error::Tensor(t) => Error::checkpoint(
                &path,
                format!(
                    "does not match config.json: {t}; check that the weights and config.json are from the same model"
                ),
            ),
            other => other,
        };
        let matrices = |format| MatrixSource::new(format, Some(checkpoint));
        let vision_tower =
            DaViT::new(&config.vision, vb.pp("vision_tower"), matrices(options.vision_weights)).map_err(wrap)?;
        let projector = ImageProjector::new(&config.vision, vb.clone()).map_err(wrap)?;
        let vision_pages = checkpoint.take_in_place();
        let language_model =
            BartLanguageModel::new(&config.text, vb, matrices(options.language_weights)).map_err(wrap)?;
        let language_pages = checkpoint.take_in_place();
        vision_pages.populate_in_background();
        Ok(Self {
            config,
            layout,
            vision_tower,
            projector,
            language_model,
            language_pages: Arc::new(Mutex::new(Some(language_pages))),
            device: device.clone(),
            warnings: Vec::new(),
        })
    }

    /// What loading found wrong with the checkpoint without refusing it, one line each (tensors
    /// the model does not use), for the caller to show.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `pixel_values` `[B, 3, H, W]` to image features `[B, 1 + h*w, d_model]`.
    pub fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.project(&self.vision_features(pixel_values)?)
    }

    /// DaViT's last feature map, channel-last `[B, h, w, C]`.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        refuse_tracked(pixel_values, "vision_features")?;
        self.vision_tower.forward(pixel_values)
    }

    /// The memory policy, applied once, the first time it is called: hands the free pages of
    /// the heap back to the OS and starts mapping the language model's pages of the checkpoint
    /// on a background thread. Call it after the first vision pass, before the language model
    /// runs: the vision tower's activations are free by then, and the language model's pages
    /// would otherwise add to their peak. Later calls do nothing.
    pub fn settle_memory(&self) {
        if let Some(pages) = self.language_pages.lock().unwrap_or_else(|e| e.into_inner()).take() {
            release_free_heap();
            pages.populate_in_background();
        }
    }

    /// Projects a DaViT feature map into language-model embeddings `[B, 1 + h*w, d_model]`.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        refuse_tracked(features, "project")?;
        self.projector.forward(features)
    }

    /// Runs the BART encoder over `[image features ; prompt embeddings]` for every image;
    /// all images share the prompt `prompt_ids` (with `<s>`/`</s>`).
    pub fn encode(&self, image_features: &Tensor, prompt_ids: &[u32]) -> Result<Tensor> {
        refuse_tracked(image_features, "encode")?;
        let b = image_features.dim(0)?;
        let (_, n_img, _) = image_features.dims3()?;
        let max = self.config.text.max_position_embeddings;
        if n_img + prompt_ids.len() > max {
            return Err(Error::usage(format!(
                "the prompt is too long: {} image tokens + {} text tokens exceed the model's {max} positions",
                n_img,
                prompt_ids.len()
            )));
        }
        let text = self
            .language_model
            .embed_prompt(prompt_ids, &self.device)?
            .unsqueeze(0)?
            .repeat((b, 1, 1))?;
        let inputs = Tensor::cat(&[image_features, &text], 1)?;
        self.language_model.encoder.forward(&inputs)
    }

    /// Starts incremental decoding over `memory` `[images, L, d]` with `rows_per_image` beams each.
    pub fn decoder(&self, memory: &Tensor, rows_per_image: usize) -> Result<IncrementalDecoder<'_>> {
        Ok(IncrementalDecoder {
            model: self,
            caches: self.start_sequences(memory, rows_per_image)?,
        })
    }

    /// One decoder cache per image of `memory` `[images, L, d]`, with `rows_per_image` rows
    /// (beams) each, for [`decode_step`](Self::decode_step).
    pub fn start_sequences(&self, memory: &Tensor, rows_per_image: usize) -> Result<Vec<SequenceCache>> {
        self.language_model.decoder.start(memory, rows_per_image)
    }

    /// Feeds one token per row of each cache (rows cache by cache, in order) and returns each
    /// row's next-token logits. The caches may be at different positions and hold different
    /// numbers of rows; a row's logits do not depend on the other rows of the step.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut SequenceCache]) -> Result<Vec<Vec<f32>>> {
        let logits = self.language_model.decoder.step(tokens, caches)?;
        Ok(logits
            .chunks_exact(self.language_model.decoder.vocab_size())
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Decoder positions available to generation.
    pub fn max_decoder_positions(&self) -> usize {
        self.language_model.decoder.max_positions()
    }
}

/// The fast path reads `&[f32]` and has no backward pass: a tensor that tracks gradients would
/// have its graph cut here without a word, so it is refused. Train on [`crate::tensor`].
fn refuse_tracked(t: &Tensor, entry: &str) -> Result<()> {
    if t.track_op() {
        return Err(Error::usage(format!(
            "Florence2::{entry} is inference-only and was given a tensor that tracks gradients; \
             use florence::tensor to train, or detach the tensor"
        )));
    }
    Ok(())
}

/// Hands the free pages of the heap back to the OS. glibc would keep them: the `florence` binary
/// turns trimming off, so that each pass does not pay for fresh zeroed pages again.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A generation in progress over a fixed set of images: the model and one decoder cache per
/// image.
pub struct IncrementalDecoder<'a> {
    model: &'a Florence2,
    caches: Vec<SequenceCache>,
}

impl IncrementalDecoder<'_> {
    /// Next-token logits `[rows, vocab]` after feeding one token per row of every image.
    pub fn step_logits(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let mut caches: Vec<&mut SequenceCache> = self.caches.iter_mut().collect();
        let logits = self.model.language_model.decoder.step(tokens, &mut caches)?;
        let rows = tokens.len();
        Ok(Tensor::from_vec(
            logits,
            (rows, self.model.language_model.decoder.vocab_size()),
            &self.model.device,
        )?)
    }
}

impl StepDecoder for IncrementalDecoder<'_> {
    fn step(&mut self, images: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        // `images` is increasing: walk the caches once, taking the listed ones.
        let mut wanted = images.iter().copied().peekable();
        let mut caches: Vec<&mut SequenceCache> = Vec::with_capacity(images.len());
        for (i, cache) in self.caches.iter_mut().enumerate() {
            if wanted.next_if_eq(&i).is_some() {
                caches.push(cache);
            }
        }
        if wanted.peek().is_some() || caches.len() != images.len() {
            return Err(Error::usage(format!(
                "decoding step over images {images:?}: not increasing indices below {}",
                self.caches.len()
            )));
        }
        self.model.decode_step(tokens, &mut caches)
    }

    fn reorder(&mut self, image: usize, order: &[u32]) -> Result<()> {
        match self.caches.get_mut(image) {
            Some(cache) => cache.reorder(order),
            None => Err(Error::usage(format!("no image {image} to reorder"))),
        }
    }
}
