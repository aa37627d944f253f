//! `--dtype` and `--quantize`: how the model's weights are held in memory; `--strict`: whether
//! weights the model does not use are refused.

use florence::{LoadOptions, WeightFormat};

/// Model loading options shared by the subcommands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Precision of the weights in memory. f32 is exact (token for token like transformers);
    /// bf16 halves the memory and the time of each decoding step. Products are computed in f32
    /// either way.
    #[arg(long, value_enum, default_value = "f32", help_heading = "Performance")]
    dtype: Dtype,
    /// Hold the language model's weights as int8 (weight-only, one scale per 32 values): a
    /// quarter of the f32 memory read per decoding step. Combines with --dtype for the vision
    /// encoder.
    #[arg(long, value_enum, help_heading = "Performance")]
    quantize: Option<Quantize>,
    /// Refuse a model whose weights hold tensors its config.json does not use (a sign that the
    /// two do not belong together) instead of warning. Missing tensors are always refused.
    #[arg(long)]
    strict: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Quantize {
    Q8,
}

impl PrecisionArgs {
    /// Loading options for these settings.
    pub fn load_options(&self) -> LoadOptions {
        let vision = match self.dtype {
            Dtype::F32 => WeightFormat::F32,
            Dtype::Bf16 => WeightFormat::Bf16,
        };
        let language = match self.quantize {
            Some(Quantize::Q8) => WeightFormat::Q8,
            None => vision,
        };
        LoadOptions {
            vision_weights: vision,
            language_weights: language,
            strict: self.strict,
            ..LoadOptions::default()
        }
    }

    /// A short description for reports, such as `f32` or `bf16 + q8 language model`.
    pub fn describe(&self) -> String {
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        match self.quantize {
            Some(Quantize::Q8) => format!("{dtype} vision, q8 language model"),
            None => dtype,
        }
    }
}
