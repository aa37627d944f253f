//! `florence caption`: images or whole folders in; captions printed, or written as sidecar files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use clap::ValueEnum;
use florence::dataset::{self, Existing, InputImage};
use florence::preprocess::DecodeOptions;
use florence::{Error, Florence, GenerationConfig, ImageProcessor, PreparedImage, RgbImage, Task};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The caption (or the structured result as JSON), one line per image.
    Text,
    /// One JSON object per image: path, task, text or result, raw, ids, model, generation.
    Jsonl,
    /// path,task,caption rows with a header.
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExistingArg {
    /// Keep the existing caption and do not caption the image again.
    Skip,
    /// Replace the existing caption.
    Overwrite,
    /// Add the new caption after the existing one.
    Append,
    /// Add the new caption before the existing one.
    Prepend,
}

/// What the loader thread hands over: resized too once the model's image size is known.
enum Decoded {
    Raw(RgbImage),
    Prepared(PreparedImage),
}

#[derive(clap::Args)]
pub struct CaptionArgs {
    /// Model folder (config.json, weights, tokenizer), or a Hugging Face model id such as
    /// microsoft/Florence-2-large, taken from the Hugging Face cache or downloaded into it.
    #[arg(long, value_name = "DIR|ORG/NAME", default_value = florence::hub::DEFAULT_MODEL)]
    model: String,
    /// Never download: use only local folders and the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
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

    /// Worker threads for the model (default: all cores).
    #[arg(long, value_name = "N", help_heading = "Performance")]
    pub threads: Option<usize>,
    /// Images per forward pass. The images of a batch share each decoding step's reads of the
    /// weights, so larger batches caption folders faster, the more so the longer the captions
    /// (measured on 2 cores at 32 tokens: 4 gave 12% more images/s than 1), for about 250 MB
    /// more memory per image with Florence-2-base
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Performance")]
    batch_size: usize,
    #[command(flatten)]
    precision: crate::precision::PrecisionArgs,

    /// Image files and folders (PNG, JPEG, WebP, GIF, BMP, TIFF, recognized by content).
    #[arg(
        value_name = "IMAGE_OR_DIR",
        required_unless_present = "files_from",
        help_heading = "Input"
    )]
    inputs: Vec<PathBuf>,
    /// Descend into subfolders of the folders given.
    #[arg(short, long, help_heading = "Input")]
    recursive: bool,
    /// Read more input paths from FILE, one per line ('#' starts a comment).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    files_from: Option<PathBuf>,
    /// Caption only shard I of N (0-based), e.g. --shard 3/8; shards split any input exactly.
    #[arg(long, value_name = "I/N", value_parser = parse_shard, help_heading = "Input")]
    shard: Option<(usize, usize)>,
    /// Do not rotate photos by their EXIF orientation (transformers does not rotate them).
    #[arg(long, help_heading = "Input")]
    no_exif_orientation: bool,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, value_name = "N", default_value_t = DecodeOptions::default().max_pixels, help_heading = "Input")]
    max_pixels: u64,

    /// Write each caption to a sidecar file with this extension (default .txt when captioning
    /// folders or a --files-from list; given files are printed unless --ext or --output-dir is set).
    #[arg(long, value_name = "EXT", help_heading = "Output")]
    ext: Option<String>,
    /// Write sidecars under DIR, mirroring the input folders, instead of next to the images.
    #[arg(long, value_name = "DIR", help_heading = "Output")]
    output_dir: Option<PathBuf>,
    /// What to do with a sidecar that already exists.
    #[arg(long, value_enum, default_value = "skip", help_heading = "Output")]
    existing: ExistingArg,
    /// Text between an existing caption and the new one with --existing append/prepend.
    #[arg(long, value_name = "TEXT", default_value = ", ", help_heading = "Output")]
    separator: String,
    /// Text put before every caption (a trigger word, say "ohwx, ").
    #[arg(long, value_name = "TEXT", default_value = "", help_heading = "Output")]
    prefix: String,
    /// Text put after every caption.
    #[arg(long, value_name = "TEXT", default_value = "", help_heading = "Output")]
    suffix: String,
    /// Output format of printed results, or of the manifest when writing sidecars.
    #[arg(long, value_enum, help_heading = "Output")]
    format: Option<Format>,
    /// Write the results (in --format, default jsonl) to FILE instead of standard output.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    manifest: Option<PathBuf>,
    /// Append a JSON line {path, error} for every image that failed to FILE.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    errors: Option<PathBuf>,
    /// No progress bar and no summary.
    #[arg(short, long, help_heading = "Output")]
    quiet: bool,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("shard index {i:?} is not a number"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("shard count {n:?} is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: the index must be below the count (0-based)"));
    }
    Ok((i, n))
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
        g.sampling = None;
    }
    g
}

/// Where results go and how.
struct Sink {
    /// `Some(ext)` when captions are written to sidecar files.
    sidecar_ext: Option<String>,
    format: Option<Format>,
    out: Box<dyn Write>,
    errors: Option<std::fs::File>,
    csv_header_written: bool,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Usage(format!("{}: {e}", path.display()))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Counts for the final summary.
#[derive(Default)]
struct Tally {
    captioned: usize,
    skipped: usize,
    failed: usize,
}

fn report_failure(sink: &mut Sink, tally: &mut Tally, path: &Path, reason: &str, bar: &indicatif::ProgressBar) {
    tally.failed += 1;
    bar.suspend(|| eprintln!("error: {}: {reason}", path.display()));
    if let Some(f) = &mut sink.errors {
        let _ = writeln!(f, "{}", json!({ "path": path.to_string_lossy(), "error": reason }));
    }
}

/// Runs the command; `Ok(false)` when some image failed, `Err` for errors that stop the run.
pub fn run(a: CaptionArgs, interrupted: Arc<AtomicBool>) -> Result<bool, Error> {
    if a.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    let task = Task::new(&a.task, a.text_input.as_deref())?;
    let started = Instant::now();

    let mut inputs = a.inputs.clone();
    if let Some(list) = &a.files_from {
        inputs.extend(dataset::read_list(list).map_err(|e| io_err(list, e))?);
    }
    let dataset_mode =
        a.ext.is_some() || a.output_dir.is_some() || a.files_from.is_some() || a.inputs.iter().any(|p| p.is_dir());
    let sidecar_ext = dataset_mode.then(|| {
        let e = a.ext.clone().unwrap_or_else(|| ".txt".into());
        if e.starts_with('.') {
            e
        } else {
            format!(".{e}")
        }
    });
    let format = match (dataset_mode, a.format) {
        (false, f) => Some(f.unwrap_or(Format::Text)),
        (true, None) if a.manifest.is_some() => Some(Format::Jsonl),
        (true, f) => f,
    };
    let out: Box<dyn Write> = match &a.manifest {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| io_err(p, e))?,
        )),
        None => Box::new(std::io::stdout()),
    };
    let errors = match &a.errors {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| io_err(p, e))?,
        ),
        None => None,
    };
    let mut sink = Sink {
        sidecar_ext,
        format,
        out,
        errors,
        csv_header_written: false,
    };
    let mut tally = Tally::default();
    let policy = match a.existing {
        ExistingArg::Skip => Existing::Skip,
        ExistingArg::Overwrite => Existing::Overwrite,
        ExistingArg::Append => Existing::Append,
        ExistingArg::Prepend => Existing::Prepend,
    };

    let (images, input_errors) = dataset::collect_images(&inputs, a.recursive);
    let hidden = indicatif::ProgressBar::hidden();
    for e in &input_errors {
        report_failure(&mut sink, &mut tally, &e.path, &e.reason, &hidden);
    }
    let mut work: Vec<(InputImage, Option<PathBuf>)> = Vec::new();
    let mut claimed: std::collections::HashMap<PathBuf, PathBuf> = std::collections::HashMap::new();
    for img in images {
        let mine = a.shard.is_none_or(|(i, n)| dataset::in_shard(&img.path, i, n));
        let sidecar = sink
            .sidecar_ext
            .as_ref()
            .map(|ext| dataset::sidecar_path(&img, ext, a.output_dir.as_deref()));
        if let Some(sc) = &sidecar {
            // photo.jpg and photo.png would share photo.txt: the first in sorted order keeps it.
            // Claims are made over the whole input, so every shard agrees on the owner.
            if let Some(owner) = claimed.get(sc) {
                if mine {
                    let reason = format!(
                        "its caption file {} is already the caption of {}; rename one of the two images",
                        sc.display(),
                        owner.display()
                    );
                    report_failure(&mut sink, &mut tally, &img.path, &reason, &hidden);
                }
                continue;
            }
            claimed.insert(sc.clone(), img.path.clone());
        }
        if !mine {
            continue;
        }
        if let Some(sc) = &sidecar {
            let _ = std::fs::remove_file(dataset::temp_path(sc)); // left by a killed run
            if policy == Existing::Skip && sc.exists() {
                tally.skipped += 1;
                continue;
            }
        }
        work.push((img, sidecar));
    }

    let bar = if a.quiet || work.is_empty() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(work.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
                .expect("valid template"),
        );
        b
    };
    if !work.is_empty() {
        // Decode images on a worker thread while the model runs.
        let opts = DecodeOptions {
            exif_orientation: !a.no_exif_orientation,
            max_pixels: a.max_pixels,
        };
        let (tx, rx) = sync_channel::<(InputImage, Option<PathBuf>, Result<Decoded, String>)>(2 * a.batch_size);
        let stop = interrupted.clone();
        // Set once the model (and so its image size) is known; from then on the loader resizes too.
        let processor: Arc<OnceLock<ImageProcessor>> = Arc::default();
        let loader_processor = processor.clone();
        let loader = std::thread::spawn(move || {
            for (img, sidecar) in work {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let decoded = florence::preprocess::load_image_with(&img.path, &opts)
                    .map(|rgb| match loader_processor.get() {
                        Some(p) => Decoded::Prepared(p.prepare(&rgb)),
                        None => Decoded::Raw(rgb),
                    })
                    .map_err(|e| match e {
                        Error::Image { message, .. } => format!("cannot decode image: {message}"),
                        Error::Io { source, .. } => format!("cannot read: {source}"),
                        other => other.to_string(),
                    });
                if tx.send((img, sidecar, decoded)).is_err() {
                    break;
                }
            }
        });

        // The model is loaded when the first image decodes: a run with nothing left to caption
        // (a finished rerun, or only broken files) does no model work at all.
        let mut engine: Option<(Florence, GenerationConfig, Value)> = None;
        let model_id = a.model.clone();
        let single_input = a.inputs.len() == 1 && a.files_from.is_none();
        let mut batch: Vec<(InputImage, Option<PathBuf>, PreparedImage)> = Vec::with_capacity(a.batch_size);
        let process = |batch: &mut Vec<(InputImage, Option<PathBuf>, PreparedImage)>,
                       engine: &Option<(Florence, GenerationConfig, Value)>,
                       sink: &mut Sink,
                       tally: &mut Tally|
         -> Result<(), Error> {
            let Some((model, gen, gen_json)) = engine else {
                return Ok(());
            };
            if batch.is_empty() {
                return Ok(());
            }
            let (items, imgs): (Vec<(InputImage, Option<PathBuf>)>, Vec<PreparedImage>) = batch
                .drain(..)
                .map(|(img, sidecar, prepared)| ((img, sidecar), prepared))
                .unzip();
            let results = model.run_prepared(&imgs, &task, gen)?;
            for ((img, sidecar), r) in items.into_iter().zip(results) {
                let caption = match &r.result {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let caption = format!("{}{caption}{}", a.prefix, a.suffix);
                if let Some(sc) = &sidecar {
                    let old = std::fs::read_to_string(sc).ok();
                    if let Some(text) = dataset::merge_caption(old.as_deref(), &caption, policy, &a.separator) {
                        if let Err(e) = dataset::write_atomic(sc, format!("{text}\n").as_bytes()) {
                            report_failure(
                                sink,
                                tally,
                                &img.path,
                                &format!("cannot write {}: {e}", sc.display()),
                                &bar,
                            );
                            bar.inc(1);
                            continue;
                        }
                    }
                }
                tally.captioned += 1;
                bar.inc(1);
                write_record(sink, &img, &task, &r, &caption, &model_id, gen_json, single_input)
                    .map_err(|e| Error::Usage(format!("cannot write results: {e}")))?;
            }
            Ok(())
        };
        for (img, sidecar, decoded) in rx {
            match decoded {
                Ok(decoded) => {
                    if engine.is_none() {
                        bar.set_message("loading model");
                        let offline = a.offline || florence::hub::offline_from_env();
                        let dir = bar.suspend(|| florence::hub::resolve(&a.model, offline, !a.quiet))?;
                        let model = Florence::load(&dir, &a.precision.load_options())?;
                        let gen = generation_config(&model, &a);
                        gen.validate(model.model.max_decoder_positions())?;
                        let gen_json = json!({
                            "num_beams": gen.num_beams, "max_new_tokens": gen.max_new_tokens,
                            "min_new_tokens": gen.min_new_tokens, "no_repeat_ngram_size": gen.no_repeat_ngram_size,
                            "do_sample": gen.sampling.is_some(), "weights": a.precision.describe(),
                        });
                        let _ = processor.set(model.processor.clone());
                        engine = Some((model, gen, gen_json));
                        bar.set_message("");
                    }
                    let prepared = match decoded {
                        Decoded::Prepared(p) => p,
                        // Decoded before the model was known (the first few images).
                        Decoded::Raw(rgb) => engine.as_ref().expect("loaded above").0.processor.prepare(&rgb),
                    };
                    batch.push((img, sidecar, prepared));
                }
                Err(reason) => {
                    report_failure(&mut sink, &mut tally, &img.path, &reason, &bar);
                    bar.inc(1);
                }
            }
            if batch.len() == a.batch_size {
                process(&mut batch, &engine, &mut sink, &mut tally)?;
            }
            if interrupted.load(Ordering::Relaxed) {
                break;
            }
        }
        if !interrupted.load(Ordering::Relaxed) {
            process(&mut batch, &engine, &mut sink, &mut tally)?;
        }
        let _ = loader.join();
    }
    bar.finish_and_clear();
    sink.out
        .flush()
        .map_err(|e| Error::Usage(format!("cannot write results: {e}")))?;
    let secs = started.elapsed().as_secs_f64();
    let stopped = interrupted.load(Ordering::Relaxed);
    if !a.quiet && (dataset_mode || tally.failed > 0 || stopped) {
        eprintln!(
            "{}{} captioned, {} skipped, {} failed in {secs:.1} s ({:.2} images/s)",
            if stopped { "interrupted: " } else { "" },
            tally.captioned,
            tally.skipped,
            tally.failed,
            tally.captioned as f64 / secs.max(1e-9),
        );
    }
    if stopped {
        return Err(Error::Usage("interrupted; rerun the same command to resume".into()));
    }
    Ok(tally.failed == 0)
}

#[allow(clippy::too_many_arguments)]
fn write_record(
    sink: &mut Sink,
    img: &InputImage,
    task: &Task,
    r: &florence::Output,
    caption: &str,
    model_id: &str,
    gen: &Value,
    single_input: bool,
) -> std::io::Result<()> {
    let path = img.path.to_string_lossy();
    match sink.format {
        None => Ok(()),
        Some(Format::Jsonl) => {
            let mut obj = json!({
                "path": path, "task": task.name, "raw": r.raw, "ids": r.ids, "model": model_id, "generation": gen,
            });
            if r.result.is_string() {
                obj["text"] = Value::String(caption.to_string());
            } else {
                obj["result"] = r.result.clone();
            }
            writeln!(sink.out, "{obj}")
        }
        Some(Format::Csv) => {
            if !sink.csv_header_written {
                writeln!(sink.out, "path,task,caption")?;
                sink.csv_header_written = true;
            }
            writeln!(
                sink.out,
                "{},{},{}",
                csv_field(&path),
                csv_field(&task.name),
                csv_field(caption)
            )
        }
        Some(Format::Text) => {
            if single_input && sink.sidecar_ext.is_none() {
                writeln!(sink.out, "{caption}")
            } else {
                writeln!(sink.out, "{path}\t{caption}")
            }
        }
    }
}
