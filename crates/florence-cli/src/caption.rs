//! `florence caption`: images or whole folders in; captions printed, or written as sidecar files.
//!
//! The flags become a validated [`CaptionPlan`]; the plan builds the sinks and hands the work
//! to the library's pipeline, which `eval` and `serve` share.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::ValueEnum;
use florence::pipeline::{
    self, CaptionShardSink, Captioned, Columns, ErrorLog, Existing, Input, ManifestFormat, ManifestSink, ModelSource,
    ParquetSink, Plan, Shard, ShardSpec, SidecarSink, Sidecars, Sink, SinkFailure, Work,
};
use florence::preprocess::DecodeOptions;
use florence::{Error, Florence, Task};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The caption (or the structured result as JSON), one line per image.
    Text,
    /// One JSON object per image: path, task, text or result, raw, ids, model, generation.
    Jsonl,
    /// path,task,caption rows with a header.
    Csv,
    /// A Parquet file (needs --manifest): the jsonl fields as columns, then --keep-columns.
    Parquet,
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

    #[command(flatten)]
    generation: crate::generation::GenerationArgs,

    /// Worker threads for the model (default: all cores).
    #[arg(long, value_name = "N", help_heading = "Performance")]
    pub threads: Option<usize>,
    /// Images per forward pass. The images of a batch share each decoding step's reads of the
    /// weights, so larger batches caption folders faster, the more so the longer the captions and
    /// the more cores, at the cost of memory for each image's activations.
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Performance")]
    batch_size: usize,
    #[command(flatten)]
    precision: crate::precision::PrecisionArgs,

    /// Image files and folders (PNG, JPEG, WebP, GIF, BMP, TIFF, recognized by content),
    /// WebDataset tar shards (.tar, .tar.gz, .tgz: each image member is one input, named
    /// SHARD.tar/KEY.EXT) and Parquet files (.parquet: one image per row, named FILE/ROW).
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
    /// Membership hashes each image's path relative to the folder it was found under (for files
    /// named directly or listed in --files-from, the path as written), so machines that mount the
    /// dataset at different places split it the same way. A tar shard goes whole to one machine
    /// (its path is hashed); a Parquet file is split by row group (FILE/row-group-G is hashed). `auto` takes I and N from the scheduler
    /// that started the process: a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT),
    /// torchrun or accelerate (RANK, WORLD_SIZE), or a Kubernetes Indexed Job
    /// (JOB_COMPLETION_INDEX, with the count given as auto/N).
    #[arg(long, value_name = "I/N|auto[/N]", help_heading = "Input")]
    shard: Option<ShardSpec>,
    /// Do not rotate photos by their EXIF orientation (transformers does not rotate them).
    #[arg(long, help_heading = "Input")]
    no_exif_orientation: bool,
    /// Caption images whose file is cut short (a JPEG without its end, a GIF missing bytes) from
    /// what is there, instead of reporting them as unreadable; missing JPEG rows come out grey.
    #[arg(long, help_heading = "Input")]
    allow_truncated: bool,
    /// The column of Parquet inputs that holds the images: binary, or Hugging Face's
    /// {bytes, path} image struct (default: the only such column).
    #[arg(long, value_name = "NAME", help_heading = "Input")]
    image_column: Option<String>,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, value_name = "N", default_value_t = DecodeOptions::default().max_pixels, help_heading = "Input")]
    max_pixels: u64,

    /// Write each caption to a sidecar file with this extension (default .txt when captioning
    /// folders or a --files-from list; given files are printed unless --ext or --output-dir is set).
    #[arg(long, value_name = "EXT", help_heading = "Output")]
    ext: Option<String>,
    /// Write sidecars under DIR, mirroring the input folders, instead of next to the images; a
    /// tar shard's captions go to the caption shard DIR/SHARD.tar as KEY.txt members (--ext).
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
    /// Copy these columns of Parquet inputs into the --format parquet manifest, e.g. url,key.
    #[arg(long, value_name = "A,B", value_delimiter = ',', help_heading = "Output")]
    keep_columns: Vec<String>,
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

impl Format {
    /// The format of a text manifest; `None` for Parquet.
    fn text(self) -> Option<ManifestFormat> {
        match self {
            Format::Text => Some(ManifestFormat::Text),
            Format::Jsonl => Some(ManifestFormat::Jsonl),
            Format::Csv => Some(ManifestFormat::Csv),
            Format::Parquet => None,
        }
    }
}

impl From<ExistingArg> for Existing {
    fn from(e: ExistingArg) -> Self {
        match e {
            ExistingArg::Skip => Existing::Skip,
            ExistingArg::Overwrite => Existing::Overwrite,
            ExistingArg::Append => Existing::Append,
            ExistingArg::Prepend => Existing::Prepend,
        }
    }
}

/// The command's flags, checked and resolved into what to read, what to run and where results go.
struct CaptionPlan {
    pipeline: Plan,
    inputs: Vec<PathBuf>,
    recursive: bool,
    shard: Option<Shard>,
    /// `Some` when captions are written to files (folders, a list, --ext or --output-dir given).
    sidecars: Option<Sidecars>,
    /// The record of results: its format and file (standard output when `None`).
    manifest: Option<(Format, Option<PathBuf>)>,
    /// The columns Parquet inputs are read by.
    columns: Columns,
    /// Text records carry only the caption: one image given, printed.
    bare: bool,
    errors: Option<PathBuf>,
    model: String,
    offline: bool,
    precision: crate::precision::Resolved,
    quiet: bool,
}

impl CaptionArgs {
    /// Validates the flags and decides the run.
    fn plan(self) -> Result<CaptionPlan, Error> {
        if self.batch_size == 0 {
            return Err(Error::Usage("--batch-size must be at least 1".into()));
        }
        let mut inputs = self.inputs.clone();
        if let Some(list) = &self.files_from {
            inputs.extend(pipeline::read_list(list).map_err(|e| Error::Io {
                path: list.clone(),
                source: e,
            })?);
        }
        let dataset_mode = self.ext.is_some()
            || self.output_dir.is_some()
            || self.files_from.is_some()
            || self.inputs.iter().any(|p| p.is_dir());
        let sidecars = dataset_mode.then(|| Sidecars {
            ext: match self.ext.as_deref().unwrap_or(".txt") {
                e if e.starts_with('.') => e.to_string(),
                e => format!(".{e}"),
            },
            output_dir: self.output_dir.clone(),
            existing: self.existing.into(),
            separator: self.separator.clone(),
        });
        let format = match (dataset_mode, self.format) {
            (false, f) => Some(f.unwrap_or(Format::Text)),
            (true, None) if self.manifest.is_some() => Some(Format::Jsonl),
            (true, f) => f,
        };
        if format == Some(Format::Parquet) && self.manifest.is_none() {
            return Err(Error::Usage(
                "--format parquet writes a file: give it with --manifest FILE.parquet".into(),
            ));
        }
        if !self.keep_columns.is_empty() && format != Some(Format::Parquet) {
            return Err(Error::Usage(
                "--keep-columns copies columns into a Parquet manifest: add --format parquet --manifest FILE.parquet"
                    .into(),
            ));
        }
        let pipeline = Plan {
            task: Task::new(&self.task, self.text_input.as_deref())?,
            generation: self.generation.request(),
            decode: DecodeOptions {
                exif_orientation: !self.no_exif_orientation,
                max_pixels: self.max_pixels,
                allow_truncated: self.allow_truncated,
            },
            batch_size: self.batch_size,
            prefix: self.prefix,
            suffix: self.suffix,
        };
        Ok(CaptionPlan {
            pipeline,
            // Only the caption, for a single image: a container's records need their names.
            bare: self.inputs.len() == 1
                && self.files_from.is_none()
                && !dataset_mode
                && !self
                    .inputs
                    .iter()
                    .any(|p| pipeline::is_tar(p) || pipeline::is_parquet(p)),
            inputs,
            recursive: self.recursive,
            shard: self
                .shard
                .map(|s| s.resolve(|k| std::env::var(k).ok()))
                .transpose()
                .map_err(Error::Usage)?,
            sidecars,
            manifest: format.map(|f| (f, self.manifest)),
            columns: Columns {
                image: self.image_column,
                keep: self.keep_columns,
            },
            errors: self.errors,
            model: self.model,
            offline: self.offline,
            precision: self.precision.resolve("caption", false)?,
            quiet: self.quiet,
        })
    }
}

impl CaptionPlan {
    /// Refuses tar shards and Parquet files whose captions would go nowhere: no caption shards
    /// (--output-dir) and no manifest (a run writing sidecars prints none by default).
    fn check_destinations(&self, inputs: &[Input]) -> Result<(), Error> {
        if self.manifest.is_some() {
            return Ok(());
        }
        let caption_shards = self.sidecars.as_ref().is_some_and(|s| s.output_dir.is_some());
        for input in inputs {
            let wanted = match input {
                Input::Tar(_) if !caption_shards => "a caption shard under --output-dir DIR, or --format/--manifest",
                Input::Parquet(_) => "--format/--manifest, e.g. --format parquet --manifest captions.parquet",
                _ => continue,
            };
            return Err(Error::Usage(format!(
                "{}: its captions need a destination: give {wanted}",
                input.file().path.display()
            )));
        }
        Ok(())
    }

    /// The sinks the flags ask for, in order: caption files and shards, the manifest, the error log.
    fn sinks(&self, work: &Work) -> Result<Vec<Box<dyn Sink>>, Error> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(policy) = &self.sidecars {
            sinks.push(Box::new(SidecarSink::new(policy.clone())));
            sinks.push(Box::new(CaptionShardSink::new(&policy.ext)));
        }
        let weights = self.precision.description.clone();
        match &self.manifest {
            Some((Format::Parquet, Some(path))) => {
                sinks.push(Box::new(ParquetSink::to_file(path, &self.model, weights, &work.kept)?));
            }
            Some((format, file)) => {
                let format = format.text().unwrap_or(ManifestFormat::Jsonl);
                let manifest = match file {
                    Some(path) => ManifestSink::to_file(format, path, &self.model, weights)?,
                    None => ManifestSink::new(
                        format,
                        Box::new(std::io::stdout()),
                        "standard output",
                        &self.model,
                        weights,
                    ),
                };
                sinks.push(Box::new(manifest.bare(self.bare)));
            }
            None => {}
        }
        if let Some(path) = &self.errors {
            sinks.push(Box::new(ErrorLog::open(path)?));
        }
        Ok(sinks)
    }
}

/// The progress bar, and the failures on standard error.
pub struct Progress {
    pub bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar over `images` (hidden when `quiet` or there is nothing to do).
    pub fn new(images: usize, quiet: bool) -> Self {
        Self::of(Some(images), quiet)
    }

    /// A bar over `images`, or a count when the total is unknown (tar shards are not counted
    /// ahead); hidden when `quiet` or there is nothing to do.
    pub fn of(images: Option<usize>, quiet: bool) -> Self {
        let (bar, template) = match images {
            _ if quiet => {
                return Self {
                    bar: indicatif::ProgressBar::hidden(),
                }
            }
            Some(0) => {
                return Self {
                    bar: indicatif::ProgressBar::hidden(),
                }
            }
            Some(n) => (
                indicatif::ProgressBar::new(n as u64),
                "{bar:30} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
            ),
            None => (indicatif::ProgressBar::no_length(), "{pos} images  {per_sec}  {msg}"),
        };
        bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
        Self { bar }
    }

    /// Loads `model` (a folder or a hub id), saying so on the bar, and prints its warnings.
    pub fn load_model(
        &self,
        model: &str,
        offline: bool,
        quiet: bool,
        precision: &crate::precision::Resolved,
    ) -> Result<Florence, Error> {
        let bar = &self.bar;
        bar.set_message(format!("loading {model}"));
        let offline = offline || florence::hub::offline_from_env();
        let dir = bar.suspend(|| florence::hub::resolve(model, offline, !quiet))?;
        if let Some(notice) = precision.notice.as_ref().filter(|_| !quiet) {
            bar.suspend(|| eprintln!("{notice}"));
        }
        let loaded = Florence::load(&dir, &precision.options)?;
        for warning in loaded.warnings() {
            bar.suspend(|| eprintln!("warning: {warning}"));
        }
        bar.set_message("");
        Ok(loaded)
    }
}

impl Sink for Progress {
    fn captioned(&mut self, _: &Captioned) -> Result<(), SinkFailure> {
        self.bar.inc(1);
        Ok(())
    }

    fn failed(&mut self, path: &Path, reason: &str) -> Result<(), Error> {
        self.bar.suspend(|| eprintln!("error: {}: {reason}", path.display()));
        self.bar.inc(1);
        Ok(())
    }
}

/// Runs the command; `Ok(false)` when some image failed, `Err` for errors that stop the run.
pub fn run(args: CaptionArgs, interrupted: &AtomicBool) -> Result<bool, Error> {
    let started = Instant::now();
    let plan = args.plan()?;
    let (inputs, unreadable) = pipeline::collect_inputs(&plan.inputs, plan.recursive);
    plan.check_destinations(&inputs)?;
    let mut work = pipeline::plan_inputs(inputs, plan.shard, plan.sidecars.as_ref(), &plan.columns);
    work.failures.splice(0..0, unreadable);

    let mut sinks = plan.sinks(&work)?;
    let total = match work.images() {
        _ if work.jobs.is_empty() => Some(0),
        known => known.map(|n| n + work.failures.len()),
    };
    let progress = Progress::of(total, plan.quiet);
    let bar = progress.bar.clone();
    let load = || progress.load_model(&plan.model, plan.offline, plan.quiet, &plan.precision);
    sinks.push(Box::new(Progress { bar: bar.clone() }));
    let mut sink_refs: Vec<&mut dyn Sink> = sinks.iter_mut().map(|s| &mut **s as &mut dyn Sink).collect();
    let summary = pipeline::run(
        &plan.pipeline,
        work,
        ModelSource::Lazy(Box::new(load)),
        &mut sink_refs,
        interrupted,
    )?;
    bar.finish_and_clear();

    let secs = started.elapsed().as_secs_f64();
    if !plan.quiet && (plan.sidecars.is_some() || summary.failed > 0 || summary.stopped) {
        eprintln!(
            "{}{} captioned, {} skipped, {} failed in {secs:.1} s ({:.2} images/s)",
            if summary.stopped { "interrupted: " } else { "" },
            summary.captioned,
            summary.skipped,
            summary.failed,
            summary.captioned as f64 / secs.max(1e-9),
        );
    }
    if summary.stopped {
        return Err(Error::Usage("interrupted; rerun the same command to resume".into()));
    }
    Ok(summary.failed == 0)
}
