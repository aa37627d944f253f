//! Florence-2 inference in pure Rust, token for token the same as transformers.
//!
//! [`Florence`] is a loaded model with its tokenizer and image processor; [`pipeline`] captions
//! whole datasets with it (decode ahead, batches, sinks for caption files and manifests). The
//! public modules are [`preprocess`] (decoding, Pillow-exact resizing, normalization),
//! [`generation`] (beam search, greedy, sampling), [`tasks`] (prompts and post-processing),
//! [`pipeline`] and [`hub`]; the model's own layers (the DaViT vision tower, the projector,
//! BART, the checkpoint readers and the CPU kernels) are private, behind [`Florence2`].
//!
//! ```no_run
//! use florence::{Florence, LoadOptions, Task};
//!
//! # fn main() -> florence::Result<()> {
//! let model = Florence::load("models/Florence-2-base".as_ref(), &LoadOptions::default())?;
//! let image = florence::preprocess::load_image("photo.jpg".as_ref())?;
//! let task = Task::new("<MORE_DETAILED_CAPTION>", None)?;
//! let out = model.run(&[image], &task, model.generation_config())?;
//! println!("{}", out[0].result);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod batching;
pub mod checkpoint;
mod config;
pub mod device;
mod error;
pub mod generation;
pub mod hub;
mod language;
mod model;
mod nn;
pub mod pipeline;
mod precision;
pub mod preprocess;
mod projector;
pub mod tasks;
pub mod tensor;
mod tokenizer;
mod vision;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

pub use config::{Florence2Config, GenerationOverrides, Layout, PreprocessorConfig, TextConfig, VisionConfig};
pub use error::{Error, ErrorKind, Result};
pub use generation::{EarlyStopping, GenerationConfig, GenerationRequest, SamplingConfig, SamplingRequest};
pub use language::SequenceCache;
pub use model::{Florence2, IncrementalDecoder};
pub use nn::WeightFormat;
pub use precision::{Dtype, Precision, Quantize};
pub use preprocess::{ImageProcessor, PreparedImage, RgbImage};
pub use tasks::{Task, TaskResult};
pub use tokenizer::FlorenceTokenizer;

/// How to load a model. The default (f32 weights on the CPU) is exact with transformers.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How the vision tower's attention and MLP weights are held.
    pub vision_weights: WeightFormat,
    /// How the language model's weights (token embeddings and `lm_head` included) are held.
    pub language_weights: WeightFormat,
    /// Where the tensors live. On the CPU the model runs on our kernels (the fast path); on
    /// any other device (a CUDA GPU) on the [tensor path](tensor::Generator), in f32 when both
    /// weight formats are f32 and in bf16 when both are bf16.
    pub device: Device,
    /// Run on the tensor path on the CPU too: what a GPU runs, to check it against the fast
    /// path (several times slower there).
    pub tensor_path: bool,
    /// Refuse a checkpoint with tensors the model does not use, instead of loading it with a
    /// [warning](Florence::warnings). A tensor the model needs missing is refused either way.
    pub strict: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            vision_weights: WeightFormat::F32,
            language_weights: WeightFormat::F32,
            device: Device::Cpu,
            tensor_path: false,
            strict: false,
        }
    }
}

impl LoadOptions {
    /// The dtype the tensor path computes in: the weight formats' own, one for the whole model.
    fn tensor_dtype(&self) -> Result<candle_core::DType> {
        match (self.vision_weights, self.language_weights) {
            (WeightFormat::F32, WeightFormat::F32) => Ok(candle_core::DType::F32),
            (WeightFormat::Bf16, WeightFormat::Bf16) => Ok(candle_core::DType::BF16),
            _ => Err(Error::unsupported(format!(
                "on {} the model computes in one dtype, f32 or bf16, and int8 weights are for the CPU; \
                 drop --quantize",
                device_name(&self.device)
            ))),
        }
    }
}

/// A device as messages name it.
fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "the CPU".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("CUDA GPU {gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("Metal GPU {gpu_id}"),
    }
}

/// What runs a [`Florence`]'s network.
#[derive(Debug)]
enum Engine {
    /// Our CPU kernels.
    Kernels(Box<Florence2>),
    /// The tensor path, on a GPU (or on the CPU when asked).
    Tensor(Box<tensor::Generator>),
}

/// The result for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Generated ids, starting with the decoder start token.
    pub ids: Vec<u32>,
    /// `ids` decoded with special tokens kept (`batch_decode(ids, skip_special_tokens=False)`).
    pub raw: String,
    /// The post-processed answer: text, or boxes, quadrilaterals or polygons in pixels.
    pub result: TaskResult,
}

/// A loaded Florence-2 model with its tokenizer, image processor and default generation settings.
#[derive(Debug)]
pub struct Florence {
    engine: Engine,
    warnings: Vec<String>,
    tokenizer: FlorenceTokenizer,
    processor: ImageProcessor,
    generation: GenerationConfig,
    dir: PathBuf,
}

impl Florence {
    /// Loads a model directory as downloaded from the hub (`config.json`, weights, tokenizer,
    /// `preprocessor_config.json`), in either checkpoint layout.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "is not a directory; pass the folder of a downloaded Florence-2 model",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::checkpoint(
                dir,
                "has no config.json; is this a Florence-2 model folder?",
            ));
        }
        let config = Florence2Config::from_file(&config_path)?;
        let processor = ImageProcessor::new(Self::preprocessor_config(dir)?);
        // The tokenizer is parsed on a thread of its own while the weights load (about a tenth
        // of a second each); its errors still come first.
        let (tokenizer, model) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| FlorenceTokenizer::from_dir(dir));
            let model = Self::load_model(dir, config, options);
            let tokenizer = tokenizer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (tokenizer, model)
        });
        let (tokenizer, ((engine, warnings), generation)) = (tokenizer?, model?);
        Ok(Self {
            engine,
            warnings,
            tokenizer,
            processor,
            generation,
            dir: dir.to_path_buf(),
        })
    }

    #[allow(clippy::type_complexity)]
    fn load_model(
        dir: &Path,
        config: Florence2Config,
        options: &LoadOptions,
    ) -> Result<((Engine, Vec<String>), GenerationConfig)> {
        let files = checkpoint::WeightFiles::discover(dir)?;
        let generation = Self::default_generation(&config, dir)?;
        if options.device.is_cpu() && !options.tensor_path {
            let model = Florence2::load(config, &files, options)?;
            let warnings = model.warnings().to_vec();
            return Ok(((Engine::Kernels(Box::new(model)), warnings), generation));
        }
        let dtype = options.tensor_dtype()?;
        let mut checkpoint = checkpoint::Checkpoint::open(&files)?;
        let warnings = checkpoint.check(&config, options.strict)?.into_iter().collect();
        let generator = tensor::Generator::load(&config, &checkpoint, &options.device, dtype)?;
        Ok(((Engine::Tensor(Box::new(generator)), warnings), generation))
    }

    fn preprocessor_config(dir: &Path) -> Result<PreprocessorConfig> {
        for name in ["preprocessor_config.json", "processor_config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                return PreprocessorConfig::from_file(&p);
            }
        }
        Ok(PreprocessorConfig::default())
    }

    /// The checkpoint's own generation settings over the remote-code defaults (spec §7).
    ///
    /// Microsoft's remote code takes them from `text_config` and ignores `generation_config.json`;
    /// transformers' native model reads `generation_config.json`.
    fn default_generation(config: &Florence2Config, dir: &Path) -> Result<GenerationConfig> {
        let t = &config.text;
        let mut g = GenerationConfig {
            decoder_start_token_id: t.decoder_start_token_id,
            eos_token_id: t.eos_token_id,
            pad_token_id: t.pad_token_id,
            max_new_tokens: 1024.min(t.max_position_embeddings),
            ..Default::default()
        };
        g.apply(&t.generation);
        let gen_path = dir.join("generation_config.json");
        if config.config_layout == Layout::Native && gen_path.is_file() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::io(&gen_path, e))?;
            #[derive(Deserialize)]
            struct File {
                #[serde(flatten)]
                fields: config::GenerationOverrides,
            }
            let f: File = serde_json::from_str(&text)
                .map_err(|e| Error::config(format!("not valid JSON: {e}")).in_file(&gen_path))?;
            g.apply(&f.fields);
        }
        g.max_new_tokens = g.max_new_tokens.min(t.max_position_embeddings);
        Ok(g)
    }

    /// The generation settings the checkpoint asks for.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// What loading found wrong with the model folder without refusing it, one line each, for
    /// the caller to show (the library prints nothing): tensors in the weights that the model
    /// config.json describes does not use.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The network on our CPU kernels: vision tower, projector and language model, to run
    /// stage by stage (benchmarks, continuous batching). A model loaded on another device
    /// runs whole batches through [`run`](Self::run) only.
    pub fn network(&self) -> Result<&Florence2> {
        match &self.engine {
            Engine::Kernels(network) => Ok(network),
            Engine::Tensor(g) => Err(Error::unsupported(format!(
                "this needs the model on the CPU kernels, and it was loaded on {} (the tensor path); \
                 load it on the CPU (--device cpu)",
                device_name(g.device())
            ))),
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        match &self.engine {
            Engine::Kernels(network) => network.device(),
            Engine::Tensor(g) => g.device(),
        }
    }

    /// The most tokens the decoder can hold: the bound of `max_new_tokens`.
    pub fn max_decoder_positions(&self) -> usize {
        match &self.engine {
            Engine::Kernels(network) => network.max_decoder_positions(),
            Engine::Tensor(g) => g.max_decoder_positions(),
        }
    }

    /// The tokenizer, with Florence-2's added tokens.
    pub fn tokenizer(&self) -> &FlorenceTokenizer {
        &self.tokenizer
    }

    /// The image processor, at this model's input size.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stacks the pixel values of `images` into `[B, 3, H, W]`.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let prepared: Vec<PreparedImage> = images.iter().map(|img| self.processor.prepare(img)).collect();
        self.stack(&prepared)
    }

    fn stack(&self, images: &[PreparedImage]) -> Result<Tensor> {
        let c = &self.processor.config;
        let mut data = Vec::with_capacity(images.len() * 3 * c.width * c.height);
        for img in images {
            if img.pixel_values.len() != 3 * c.width * c.height {
                return Err(Error::usage(format!(
                    "an image was prepared at another size than this model's {}x{}",
                    c.width, c.height
                )));
            }
            data.extend_from_slice(&img.pixel_values);
        }
        // On the host: the kernels read it there, and the tensor path uploads it in its dtype.
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, c.height, c.width),
            &Device::Cpu,
        )?)
    }

    /// Runs `task` on a batch of images with the settings `gen`.
    pub fn run(&self, images: &[RgbImage], task: &Task, gen: &GenerationConfig) -> Result<Vec<Output>> {
        let prepared: Vec<PreparedImage> = images.iter().map(|img| self.processor.prepare(img)).collect();
        self.run_prepared(&prepared, task, gen)
    }

    /// [`run`](Self::run) on images already resized and normalized by [`ImageProcessor::prepare`]
    /// (for example on a loader thread, while the model works on the previous batch).
    pub fn run_prepared(&self, images: &[PreparedImage], task: &Task, gen: &GenerationConfig) -> Result<Vec<Output>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        gen.validate(self.max_decoder_positions())?;
        let prompt = self.tokenizer.encode(&task.prompt)?;
        let seqs = match &self.engine {
            Engine::Kernels(network) => on_pool_thread(|| {
                let features = network.vision_features(&self.stack(images)?)?;
                network.settle_memory();
                let features = network.project(&features)?;
                let memory = network.encode(&features, &prompt)?;
                let mut decoder = network.decoder(&memory, gen.num_beams)?;
                generation::generate(gen, images.len(), &mut decoder)
            })?,
            Engine::Tensor(g) => g.generate(&self.stack(images)?, &prompt, gen)?,
        };
        seqs.into_iter()
            .zip(images)
            .map(|(ids, img)| self.output(ids, task, (img.width, img.height)))
            .collect()
    }

    /// The result of `task` for generated `ids` on an image of `(width, height)` pixels.
    pub fn output(&self, ids: Vec<u32>, task: &Task, (width, height): (u32, u32)) -> Result<Output> {
        let raw = self.tokenizer.decode(&ids, false)?;
        let result = task.post_process(&raw, width, height);
        Ok(Output { ids, raw, result })
    }
}

/// Runs `f` on a thread of the current rayon pool: the global one, unless called from inside
/// another pool; at once if this thread already is one of the pool's. The model enters a
/// parallel section for every layer of every decoding step; from a thread outside the pool each
/// entry hands the work over and sleeps until it is done, while a pool thread shares the work
/// and keeps going.
// Measured: a decoding step takes about 12% less time this way (f32 base).
pub fn on_pool_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// `../shared/testdata` beside the repository, for tests.
#[cfg(test)]
pub(crate) fn testdata_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata");
    assert!(
        dir.is_dir(),
        "{} is missing: these tests need the shared test data beside the repository (../shared/testdata)",
        dir.display()
    );
    dir
}
