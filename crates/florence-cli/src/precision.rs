//! `--device`: where the model runs; `--dtype` and `--quantize`: how its weights are held (and
//! on a GPU what it computes in); `--strict`: whether weights the model does not use are refused.

use florence::device::DeviceChoice;
use florence::{Error, LoadOptions, WeightFormat};

/// Model loading options shared by the subcommands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Where the model runs: cpu, cuda (the first GPU), cuda:N, or auto (a CUDA GPU when this
    /// build has CUDA support and one is present, else the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "auto", help_heading = "Performance")]
    device: DeviceChoice,
    /// Precision of the weights. On the CPU (default f32): f32 is exact (token for token like
    /// transformers), bf16 halves the memory and the time of each decoding step, products are
    /// computed in f32 either way. On a GPU (default bf16): the whole model computes in this
    /// dtype, with f32 normalizations and softmax; f32 is the exact mode.
    #[arg(long, value_enum, help_heading = "Performance")]
    dtype: Option<Dtype>,
    /// Hold the language model's weights as int8 (weight-only, one scale per 32 values): a
    /// quarter of the f32 memory read per decoding step. Combines with --dtype for the vision
    /// encoder. CPU only.
    #[arg(long, value_enum, help_heading = "Performance")]
    quantize: Option<Quantize>,
    /// Refuse a model whose weights hold tensors its config.json does not use (a sign that the
    /// two do not belong together) instead of warning. Missing tensors are always refused.
    #[arg(long)]
    strict: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    Bf16,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Quantize {
    Q8,
}

/// The settings resolved against the device: what to load, and what to tell the user.
#[derive(Debug, Clone)]
pub struct Precision {
    /// The loading options.
    pub options: LoadOptions,
    /// A short description for reports, such as `f32` or `bf16 + q8 language model`, with the
    /// GPU when there is one.
    pub description: String,
    /// A line saying which device `auto` chose, when it had a choice to make (a CUDA build).
    pub notice: Option<String>,
}

impl PrecisionArgs {
    /// Opens the device and decides the loading options. `cpu_only` commands (those that run
    /// the CPU kernels stage by stage) take `auto` as the CPU and refuse a GPU with one line.
    pub fn resolve(&self, command: &str, cpu_only: bool) -> Result<Precision, Error> {
        let choice = match self.device {
            DeviceChoice::Auto if cpu_only => DeviceChoice::Cpu,
            DeviceChoice::Cuda(n) if cpu_only => {
                return Err(Error::unsupported(format!(
                    "--device cuda:{n}: florence {command} runs on the CPU for now; use florence caption on the GPU"
                )))
            }
            other => other,
        };
        let (device, chosen) = choice.open()?;
        let on_gpu = !device.is_cpu();
        let dtype = self.dtype.unwrap_or(if on_gpu { Dtype::Bf16 } else { Dtype::F32 });
        let vision = match dtype {
            Dtype::F32 => WeightFormat::F32,
            Dtype::Bf16 => WeightFormat::Bf16,
        };
        let language = match self.quantize {
            Some(Quantize::Q8) if on_gpu => {
                return Err(Error::unsupported(format!(
                    "--quantize q8 is for the CPU kernels; on the {chosen} drop it (the GPU computes in --dtype)"
                )))
            }
            Some(Quantize::Q8) => WeightFormat::Q8,
            None => vision,
        };
        let dtype = format!("{dtype:?}").to_lowercase();
        let description = match (self.quantize, on_gpu) {
            (Some(Quantize::Q8), _) => format!("{dtype} vision, q8 language model"),
            (None, true) => format!("{dtype} on the {chosen}"),
            (None, false) => dtype,
        };
        let notice = (self.device == DeviceChoice::Auto && candle_core::utils::cuda_is_available())
            .then(|| format!("running on the {chosen}"));
        Ok(Precision {
            options: LoadOptions {
                vision_weights: vision,
                language_weights: language,
                device,
                strict: self.strict,
                ..LoadOptions::default()
            },
            description,
            notice,
        })
    }
}
