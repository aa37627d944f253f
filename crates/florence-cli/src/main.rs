//! `florence`: run Florence-2 models from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use florence::{Florence, GenerationConfig, LoadOptions, SamplingConfig, Task};
use serde_json::json;

mod bench;

#[derive(Parser)]
#[command(name = "florence", version, about = "Caption, detect and ground with Florence-2 models, token for token like transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Florence-2 task (captioning by default) on images.
    #[command(after_help = "Examples:
  florence caption --model ./Florence-2-base photo.jpg
  florence caption --model ./Florence-2-large --task '<MORE_DETAILED_CAPTION>' --format jsonl *.png
  florence caption --model ./Florence-2-base --task '<CAPTION_TO_PHRASE_GROUNDING>' --text-input 'a green car' car.jpg
  florence caption --model ./Florence-2-base --do-sample --temperature 0.7 --top-p 0.9 --seed 42 photo.jpg")]
    Caption(CaptionArgs),
    /// Time each stage of a generation (image decode, preprocessing, vision tower, projector,
    /// text encoder, decoder steps, search) and report peak memory.
    #[command(after_help = "Example:\n  florence bench --model ./Florence-2-base --threads 2 --num-beams 3 --new-tokens 64 photo.jpg")]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct BenchCommand {
    #[command(flatten)]
    args: bench::BenchArgs,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The caption (or the structured result as JSON), one line per image.
    Text,
    /// One JSON object per image: path, task, raw, ids, and text or result.
    Jsonl,
}

#[derive(clap::Args)]
struct CaptionArgs {
    /// Model directory (config.json, weights, tokenizer) as downloaded from the hub.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Task token, e.g. <CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, <OD>, <OCR>,
    /// <OCR_WITH_REGION>, <DENSE_REGION_CAPTION>, <REGION_PROPOSAL>,
    /// <CAPTION_TO_PHRASE_GROUNDING>, <REFERRING_EXPRESSION_SEGMENTATION>,
    /// <REGION_TO_SEGMENTATION>, <OPEN_VOCABULARY_DETECTION>, <REGION_TO_CATEGORY>,
    /// <REGION_TO_DESCRIPTION>, <REGION_TO_OCR>; any other text is used as a free prompt.
    #[arg(long, default_value = "<CAPTION>", value_name = "TASK")]
    task: String,
    /// Input of tasks that take one: a phrase, an expression, or a region <loc_x1><loc_y1><loc_x2><loc_y2>.
    #[arg(long, value_name = "TEXT")]
    text_input: Option<String>,
    /// Beams of beam search; 1 is greedy search. Default: the checkpoint's (3 for Florence-2).
    #[arg(long, value_name = "N")]
    num_beams: Option<usize>,
    /// Most new tokens, including the forced <s> and </s>. Default: 1024, or the model's decoder length.
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Fewest new tokens before </s> is allowed.
    #[arg(long, value_name = "N")]
    min_new_tokens: Option<usize>,
    /// Sample instead of searching deterministically.
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature.
    #[arg(long, value_name = "T", requires = "do_sample")]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens when sampling (0 disables).
    #[arg(long, value_name = "K", requires = "do_sample")]
    top_k: Option<usize>,
    /// Keep the most likely tokens up to this cumulative probability when sampling.
    #[arg(long, value_name = "P", requires = "do_sample")]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one when sampling.
    #[arg(long, value_name = "P", requires = "do_sample")]
    min_p: Option<f32>,
    /// Random seed for sampling; the same seed gives the same captions.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Worker threads for the model (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Images per forward pass.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch_size: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Image files (PNG, JPEG, WebP, GIF, BMP, TIFF).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
}

fn generation_config(model: &Florence, a: &CaptionArgs) -> GenerationConfig {
    let mut g = model.generation_config().clone();
    if let Some(n) = a.num_beams {
        g.num_beams = n;
    }
    if let Some(n) = a.max_new_tokens {
        g.max_new_tokens = n;
    }
    if let Some(n) = a.min_new_tokens {
        g.min_new_tokens = n;
    }
    if a.do_sample {
        let mut s = g.sampling.clone().unwrap_or_default();
        s.temperature = a.temperature.unwrap_or(s.temperature);
        s.top_k = a.top_k.unwrap_or(s.top_k);
        s.top_p = a.top_p.unwrap_or(s.top_p);
        s.min_p = a.min_p.unwrap_or(s.min_p);
        s.seed = a.seed;
        g.sampling = Some(s);
    } else {
        g.sampling = None::<SamplingConfig>;
    }
    g
}

fn caption(a: CaptionArgs) -> Result<bool, florence::Error> {
    if a.batch_size == 0 {
        return Err(florence::Error::Usage("--batch-size must be at least 1".into()));
    }
    let task = Task::new(&a.task, a.text_input.as_deref())?;
    let model = Florence::load(&a.model, &LoadOptions::default())?;
    let gen = generation_config(&model, &a);
    gen.validate(model.model.max_decoder_positions())?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut all_ok = true;
    let mut pending: Vec<(PathBuf, florence::RgbImage)> = Vec::new();
    let flush = |pending: &mut Vec<(PathBuf, florence::RgbImage)>, out: &mut std::io::StdoutLock| -> Result<(), florence::Error> {
        if pending.is_empty() {
            return Ok(());
        }
        let images: Vec<_> = pending.iter().map(|(_, i)| i.clone()).collect();
        let results = model.run(&images, &task, &gen)?;
        for ((path, _), r) in pending.iter().zip(results) {
            let line = match a.format {
                Format::Jsonl => {
                    let mut obj = json!({
                        "path": path.to_string_lossy(),
                        "task": task.name,
                        "raw": r.raw,
                        "ids": r.ids,
                    });
                    let key = if r.result.is_string() { "text" } else { "result" };
                    obj[key] = r.result;
                    obj.to_string()
                }
                Format::Text => {
                    let text = match &r.result {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    if a.images.len() == 1 { text } else { format!("{}\t{text}", path.display()) }
                }
            };
            writeln!(out, "{line}").map_err(|e| florence::Error::Usage(format!("cannot write output: {e}")))?;
        }
        pending.clear();
        Ok(())
    };
    for path in &a.images {
        match florence::preprocess::load_image(path) {
            Ok(img) => pending.push((path.clone(), img)),
            Err(e) => {
                all_ok = false;
                eprintln!("error: {e}");
            }
        }
        if pending.len() == a.batch_size {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    Ok(all_ok)
}

/// Sets the worker-thread count before any thread pool starts.
fn set_threads(n: Option<usize>) -> Result<(), florence::Error> {
    if let Some(n) = n {
        if n == 0 {
            return Err(florence::Error::Usage("--threads must be at least 1".into()));
        }
        // Read by rayon and candle when their thread pools start, i.e. after this.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}

/// Keeps freed memory in the process: by default glibc hands every block over 32 MB back to the
/// OS, so each large activation tensor paid for fresh, zeroed pages again (a quarter of the
/// first run's time went to the kernel clearing pages).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Caption(a) => set_threads(a.threads).and_then(|_| caption(a)),
        Command::Bench(b) => set_threads(b.threads).and_then(|_| bench::bench(b.args)).map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
