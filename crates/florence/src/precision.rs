//! The precision a model runs in, as the command line's `--dtype` and `--quantize` and the
//! Python binding's `dtype` and `quantize` name it: one parser and one description for both.

use std::str::FromStr;

use crate::{Error, LoadOptions, Result, WeightFormat};

/// How the weights are held and the products computed (see [`WeightFormat`]).
///
/// `--dtype bf16` computes in bf16: bf16 weights times activations rounded to bf16, summed in
/// f32 (on AMX or AVX512-BF16 where the CPU has them); `--quantize q8` holds the language
/// model's weights in int8, widened to f32 as they are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Precision {
    /// The vision tower's format, and the language model's unless quantized.
    pub dtype: Dtype,
    /// The language model's quantization, if any.
    pub quantize: Option<Quantize>,
}

/// `--dtype`: f32 (exact, the default) or bf16 (bf16 weights and compute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// f32 weights and products: token for token like transformers.
    #[default]
    F32,
    /// bf16 weights, activations rounded to bf16 where a product reads them, f32 sums.
    Bf16,
}

/// `--quantize`: int8 language-model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// Weight-only int8, one scale per 32 weights.
    Q8,
}

impl FromStr for Dtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::usage(format!(
                "dtype must be \"f32\" or \"bf16\", not {other:?}"
            ))),
        }
    }
}

impl FromStr for Quantize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8" => Ok(Self::Q8),
            other => Err(Error::usage(format!("quantize must be \"q8\" or none, not {other:?}"))),
        }
    }
}

impl Precision {
    /// The precision of a `dtype` (`"f32"`, `"bf16"`) and an optional `quantize` (`"q8"`).
    pub fn new(dtype: &str, quantize: Option<&str>) -> Result<Self> {
        Ok(Self {
            dtype: dtype.parse()?,
            quantize: quantize.map(str::parse).transpose()?,
        })
    }

    /// How the vision tower's matrices are held.
    pub fn vision_weights(&self) -> WeightFormat {
        match self.dtype {
            Dtype::F32 => WeightFormat::F32,
            Dtype::Bf16 => WeightFormat::Bf16,
        }
    }

    /// How the language model's matrices are held.
    pub fn language_weights(&self) -> WeightFormat {
        match self.quantize {
            Some(Quantize::Q8) => WeightFormat::Q8,
            None => self.vision_weights(),
        }
    }

    /// Loading options for this precision, the others at their defaults.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            vision_weights: self.vision_weights(),
            language_weights: self.language_weights(),
            ..LoadOptions::default()
        }
    }

    /// A short description for reports and manifests: `f32`, `bf16`, or `bf16 vision, q8
    /// language model`.
    pub fn describe(&self) -> String {
        let dtype = match self.dtype {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        };
        match self.quantize {
            Some(Quantize::Q8) => format!("{dtype} vision, q8 language model"),
            None => dtype.to_string(),
        }
    }
}

/// `f32`, `bf16`, `f32+q8` or `bf16+q8`.
impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('+') {
            Some((dtype, quantize)) => Self::new(dtype, Some(quantize)),
            None => Self::new(s, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_describes() {
        let p: Precision = "bf16+q8".parse().unwrap();
        assert_eq!(
            (p.vision_weights(), p.language_weights()),
            (WeightFormat::Bf16, WeightFormat::Q8)
        );
        assert_eq!(p.describe(), "bf16 vision, q8 language model");
        assert_eq!(Precision::new("f32", None).unwrap(), Precision::default());
        assert_eq!(
            Precision::new("bf16", None).unwrap().load_options().language_weights,
            WeightFormat::Bf16
        );
        assert!(Precision::new("f16", None).is_err());
        assert!(Precision::new("f32", Some("q4")).is_err());
    }
}
