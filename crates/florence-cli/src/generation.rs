//! The generation flags `caption` and `eval` share.

use florence::{GenerationRequest, SamplingRequest};

#[derive(clap::Args, Clone)]
pub struct GenerationArgs {
    /// Beams of beam search; 1 is greedy search. Default: the checkpoint's (3 for Florence-2).
    #[arg(long, value_name = "N", help_heading = "Generation")]
    num_beams: Option<usize>,
    /// Most new tokens, including the forced <s> and </s>. Default: 1024, or the model's decoder length.
    #[arg(long, value_name = "N", help_heading = "Generation")]
    max_new_tokens: Option<usize>,
    /// Fewest new tokens before </s> is allowed.
    #[arg(long, value_name = "N", help_heading = "Generation")]
    min_new_tokens: Option<usize>,
    /// Sample instead of searching deterministically.
    #[arg(long, help_heading = "Generation")]
    do_sample: bool,
    /// Sampling temperature.
    #[arg(long, value_name = "T", requires = "do_sample", help_heading = "Generation")]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens when sampling (0 disables).
    #[arg(long, value_name = "K", requires = "do_sample", help_heading = "Generation")]
    top_k: Option<usize>,
    /// Keep the most likely tokens up to this cumulative probability when sampling.
    #[arg(long, value_name = "P", requires = "do_sample", help_heading = "Generation")]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one when sampling.
    #[arg(long, value_name = "P", requires = "do_sample", help_heading = "Generation")]
    min_p: Option<f32>,
    /// Random seed for sampling; the same seed gives the same captions.
    #[arg(long, value_name = "S", default_value_t = 0, help_heading = "Generation")]
    seed: u64,
}

impl GenerationArgs {
    /// The request over the checkpoint's generation settings.
    pub fn request(&self) -> GenerationRequest {
        GenerationRequest {
            num_beams: self.num_beams,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            sampling: self.do_sample.then_some(SamplingRequest {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
            }),
        }
    }
}
