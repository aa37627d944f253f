//! `florence eval`: caption held-out images with one or more models, score the captions against
//! the ground truth, and write the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use florence::pipeline::{self, InputImage, ManifestFormat, ManifestSink, ModelSource, Plan, Sink};
use florence::preprocess::DecodeOptions;
use florence::{Error, Task};
use florence_eval::evaluation::{self, Evaluation};
use florence_eval::predictions::Predictions;
use florence_eval::references::{self, References};
use florence_eval::report::{self, Curves};

use crate::caption::Progress;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The ground truth: a folder of images with caption sidecars (photo.jpg + photo.txt), a list
    /// of image paths with sidecars (the eval_image_paths.txt `florence train` writes), or a JSONL
    /// manifest of {"image": PATH, "references": [CAPTION, ...]} lines (its eval_image_paths.jsonl).
    #[arg(long, value_name = "DIR|LIST|JSONL")]
    references: PathBuf,
    /// Descend into subfolders of the references folder.
    #[arg(short, long)]
    recursive: bool,
    /// Extension of the caption sidecars.
    #[arg(long, value_name = "EXT", default_value = ".txt")]
    ext: String,
    /// A model to caption the images with: a folder or a hub id, optionally named (NAME=MODEL).
    /// Without a name, the folder's name (with its run's for final/ and checkpoint-N/). Repeat
    /// to compare models.
    #[arg(long = "model", value_name = "[NAME=]MODEL")]
    models: Vec<String>,
    /// Captions made earlier (`florence caption --format jsonl`, or OUT/predictions/NAME.jsonl of
    /// an earlier eval), scored without a model.
    #[arg(long = "predictions", value_name = "NAME=FILE")]
    predictions: Vec<String>,
    /// A `florence train` output folder whose training and validation losses are plotted.
    #[arg(long = "metrics-from", value_name = "RUN_DIR")]
    metrics_from: Vec<PathBuf>,
    /// The report folder: metrics.json, report.md, report.html, loss.png/.svg, predictions/.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Replace the report in --output if there is one.
    #[arg(long)]
    overwrite: bool,
    /// Task token the models caption with.
    #[arg(long, default_value = "<CAPTION>", value_name = "TASK")]
    task: String,
    #[command(flatten)]
    generation: crate::generation::GenerationArgs,
    /// Images per forward pass.
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Performance")]
    batch_size: usize,
    /// Worker threads for the model (default: all cores).
    #[arg(long, value_name = "N", help_heading = "Performance")]
    pub threads: Option<usize>,
    #[command(flatten)]
    precision: crate::precision::PrecisionArgs,
    /// Never download: use only local folders and the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

/// What to caption with, or read: a name and where from.
enum Source {
    Model(String),
    Predictions(PathBuf),
}

/// `NAME=VALUE` when the part before `=` is a plain name (no path separator), else `None`.
fn split_name(arg: &str) -> Option<(&str, &str)> {
    arg.split_once('=')
        .filter(|(n, _)| !n.is_empty() && !n.contains(['/', '\\']))
}

/// A model's default name: its folder's, with the run's before `final` and `checkpoint-N`.
fn default_name(model: &str) -> String {
    let path = Path::new(model.trim_end_matches('/'));
    let last = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string());
    let parent = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    match parent {
        Some(run) if last == "final" || last.starts_with("checkpoint-") => format!("{run}/{last}"),
        _ => last,
    }
}

impl EvalArgs {
    /// The named sources, in order: models first, then prediction files.
    fn sources(&self) -> Result<Vec<(String, Source)>, Error> {
        let mut out = Vec::new();
        for m in &self.models {
            out.push(match split_name(m) {
                Some((name, model)) => (name.to_string(), Source::Model(model.to_string())),
                None => (default_name(m), Source::Model(m.clone())),
            });
        }
        for p in &self.predictions {
            let (name, file) =
                split_name(p).ok_or_else(|| Error::usage(format!("--predictions {p}: expected NAME=FILE")))?;
            out.push((name.to_string(), Source::Predictions(PathBuf::from(file))));
        }
        if out.is_empty() {
            return Err(Error::usage(
                "nothing to score: give --model MODEL or --predictions NAME=FILE",
            ));
        }
        for (k, (name, _)) in out.iter().enumerate() {
            if out[..k].iter().any(|(n, _)| n == name) {
                return Err(Error::usage(format!(
                    "two models are named {name}; name them with NAME=MODEL"
                )));
            }
        }
        Ok(out)
    }
}

/// `predictions/NAME.jsonl`, with path separators in the name made file-safe.
fn predictions_file(out: &Path, name: &str) -> PathBuf {
    out.join("predictions")
        .join(format!("{}.jsonl", name.replace(['/', '\\'], "_")))
}

/// Captions every reference image with `model` through the caption pipeline, writing
/// `predictions/NAME.jsonl`; returns the images that failed.
fn caption(
    args: &EvalArgs,
    plan: &Plan,
    refs: &References,
    model: &str,
    file: &Path,
    interrupted: &AtomicBool,
) -> Result<usize, Error> {
    let images = refs
        .items
        .iter()
        .map(|r| InputImage {
            path: r.image.clone(),
            root: r.image.parent().unwrap_or(Path::new("")).to_path_buf(),
            key: r.image.clone(),
        })
        .collect();
    let work = pipeline::plan_work(images, None, None);
    let progress = Progress::new(work.jobs.len(), args.quiet);
    let precision = args.precision.resolve("eval", false)?;
    let mut manifest = ManifestSink::to_file(ManifestFormat::Jsonl, file, model, precision.description.clone())?;
    let mut bar = Progress {
        bar: progress.bar.clone(),
    };
    let load = || progress.load_model(model, args.offline, args.quiet, &precision);
    let mut sinks: [&mut dyn Sink; 2] = [&mut manifest, &mut bar];
    let summary = pipeline::run(plan, work, ModelSource::Lazy(Box::new(load)), &mut sinks, interrupted)?;
    progress.bar.finish_and_clear();
    if summary.stopped {
        return Err(Error::usage("interrupted; the report was not written"));
    }
    Ok(summary.failed)
}

/// Runs the command.
pub fn run(args: EvalArgs, interrupted: &AtomicBool) -> Result<bool, Error> {
    if args.batch_size == 0 {
        return Err(Error::usage("--batch-size must be at least 1"));
    }
    let sources = args.sources()?;
    let metrics_file = args.output.join("metrics.json");
    if metrics_file.exists() && !args.overwrite {
        return Err(Error::usage(format!(
            "{} holds a report already; pass --overwrite to replace it, or choose another --output",
            args.output.display()
        )));
    }
    let curves = args
        .metrics_from
        .iter()
        .map(|run| Curves::read(run))
        .collect::<Result<Vec<_>, _>>()?;
    let refs = references::load(&references::Source {
        path: args.references.clone(),
        recursive: args.recursive,
        ext: args.ext.clone(),
    })?;
    if refs.items.is_empty() {
        return Err(Error::usage(format!(
            "{}: no images with reference captions found{}",
            args.references.display(),
            if args.recursive {
                ""
            } else {
                " (use -r to search subfolders)"
            }
        )));
    }
    let plan = Plan {
        task: Task::new(&args.task, None)?,
        generation: args.generation.request(),
        decode: DecodeOptions::default(),
        batch_size: args.batch_size,
        prefix: String::new(),
        suffix: String::new(),
    };
    let mut models = Vec::new();
    for (name, source) in &sources {
        let file = match source {
            Source::Predictions(file) => file.clone(),
            Source::Model(model) => {
                let file = predictions_file(&args.output, name);
                std::fs::create_dir_all(file.parent().expect("in predictions/")).map_err(|e| Error::io(&file, e))?;
                let failed = caption(&args, &plan, &refs, model, &file, interrupted)?;
                if failed > 0 && !args.quiet {
                    eprintln!("{name}: {failed} images could not be captioned; they are left out of every score");
                }
                file
            }
        };
        models.push((name.clone(), Predictions::read(&file)?));
    }
    let eval = evaluation::evaluate(&refs, &models);
    if eval.images.is_empty() {
        return Err(Error::usage(
            "no image has a caption from every model; nothing to score",
        ));
    }
    let written = report::write(&args.output, &eval, &curves)?;
    if !args.quiet {
        summarize(&eval, &written);
    }
    Ok(true)
}

/// The scores and the files written, on standard error.
fn summarize(eval: &Evaluation, written: &[PathBuf]) {
    eprintln!("{} images scored, {} left out", eval.images.len(), eval.left_out.len());
    for m in &eval.models {
        let s = &m.scores;
        eprintln!(
            "{}: sacreBLEU {:.2}  chrF {:.2}  ROUGE-L {:.4}  BLEU-4 {:.4}  CIDEr-D {:.4}",
            m.name, s.sacrebleu, s.chrf, s.rouge_l, s.bleu4_coco, s.cider_d
        );
    }
    for path in written
        .iter()
        .filter(|p| p.parent().and_then(Path::file_name) != Some("thumbnails".as_ref()))
    {
        eprintln!("wrote {}", path.display());
    }
}
