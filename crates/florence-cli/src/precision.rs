//! `--dtype` and `--quantize`: how the model's weights are held and its products computed
//! ([`florence::Precision`], which the Python binding parses too); `--strict`: whether weights
//! the model does not use are refused.

use florence::{LoadOptions, Precision};

/// Model loading options shared by the subcommands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Precision of the weights and products. f32 is exact (token for token like transformers);
    /// bf16 holds the weights in bfloat16 and computes in bf16 (f32 sums; AMX or AVX512-BF16
    /// where the CPU has them): half the memory, faster, not exact.
    #[arg(long, value_parser = ["f32", "bf16"], default_value = "f32", help_heading = "Performance")]
    dtype: String,
    /// Hold the language model's weights as int8 (weight-only, one scale per 32 values): a
    /// quarter of the f32 memory read per decoding step. Combines with --dtype for the vision
    /// encoder.
    #[arg(long, value_parser = ["q8"], help_heading = "Performance")]
    quantize: Option<String>,
    /// Refuse a model whose weights hold tensors its config.json does not use (a sign that the
    /// two do not belong together) instead of warning. Missing tensors are always refused.
    #[arg(long)]
    strict: bool,
}

impl PrecisionArgs {
    /// The precision these flags name (clap has checked their values).
    fn precision(&self) -> Precision {
        Precision::new(&self.dtype, self.quantize.as_deref()).expect("clap checks --dtype and --quantize")
    }

    /// Loading options for these settings.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            strict: self.strict,
            ..self.precision().load_options()
        }
    }

    /// A short description for reports, such as `f32` or `bf16 vision, q8 language model`.
    pub fn describe(&self) -> String {
        self.precision().describe()
    }
}
