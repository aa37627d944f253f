//! `--device`: where the model runs; `--dtype` and `--quantize`: how its weights are held and
//! its products computed ([`florence::Precision`], which the Python binding parses too);
//! `--strict`: whether weights the model does not use are refused.

use florence::device::DeviceChoice;
use florence::{Error, LoadOptions, Precision};

/// Model loading options shared by the subcommands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Where the model runs: cpu, cuda (the first GPU), cuda:N, or auto (a CUDA GPU when this
    /// build has CUDA support and one is present, else the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "auto", help_heading = "Performance")]
    device: DeviceChoice,
    /// Precision of the weights and products (default: f32 on the CPU, bf16 on a GPU). f32 is
    /// exact (token for token like transformers); bf16 holds the weights in bfloat16 and
    /// computes in bf16 with f32 sums (on the CPU with AMX or AVX512-BF16 where it has them; on
    /// a GPU with f32 normalizations and softmax): half the memory, faster, not exact.
    #[arg(long, value_parser = ["f32", "bf16"], help_heading = "Performance")]
    dtype: Option<String>,
    /// Hold the language model's weights as int8 (weight-only, one scale per 32 values): a
    /// quarter of the f32 memory read per decoding step. Combines with --dtype for the vision
    /// encoder. CPU only.
    #[arg(long, value_parser = ["q8"], help_heading = "Performance")]
    quantize: Option<String>,
    /// Refuse a model whose weights hold tensors its config.json does not use (a sign that the
    /// two do not belong together) instead of warning. Missing tensors are always refused.
    #[arg(long)]
    strict: bool,
}

/// The settings resolved against the device: what to load, and what to tell the user.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The loading options.
    pub options: LoadOptions,
    /// A short description for reports, such as `f32` or `bf16 vision, q8 language model`,
    /// with the GPU when there is one.
    pub description: String,
    /// A line saying which device `auto` chose, when it had a choice to make (a CUDA build).
    pub notice: Option<String>,
}

impl PrecisionArgs {
    /// Opens the device and decides the loading options. `cpu_only` commands take `auto` as
    /// the CPU and refuse a GPU with one line.
    pub fn resolve(&self, command: &str, cpu_only: bool) -> Result<Resolved, Error> {
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
        let dtype = self.dtype.as_deref().unwrap_or(if on_gpu { "bf16" } else { "f32" });
        let precision = Precision::new(dtype, self.quantize.as_deref())?;
        if on_gpu && precision.quantize.is_some() {
            return Err(Error::unsupported(format!(
                "--quantize q8 is for the CPU kernels; on the {chosen} drop it (the GPU computes in --dtype)"
            )));
        }
        let description = match on_gpu {
            true => format!("{} on the {chosen}", precision.describe()),
            false => precision.describe(),
        };
        let notice = (self.device == DeviceChoice::Auto && candle_core::utils::cuda_is_available())
            .then(|| format!("running on the {chosen}"));
        Ok(Resolved {
            options: LoadOptions {
                device,
                strict: self.strict,
                ..precision.load_options()
            },
            description,
            notice,
        })
    }
}
