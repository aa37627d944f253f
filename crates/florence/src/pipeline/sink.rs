//! Where results go: caption files, manifests (JSON lines, CSV, plain text) and an error log.
//! A front door picks the sinks its flags or request ask for; the pipeline calls them in order.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::dataset::{Job, Sidecars};
use super::source::Container;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::tasks::Task;
use crate::Output;

/// What a run is doing, known once the model is loaded.
#[derive(Debug, Clone, Copy)]
pub struct RunInfo<'a> {
    /// The task every image is run with.
    pub task: &'a Task,
    /// The settings generation uses.
    pub generation: &'a GenerationConfig,
}

/// One image's result on its way to the sinks.
#[derive(Debug, Clone, Copy)]
pub struct Captioned<'a> {
    /// The image and its caption file.
    pub job: &'a Job,
    /// What the model produced.
    pub output: &'a Output,
    /// The caption as it is written: the text (or, for structured tasks, the JSON of the
    /// result) with the plan's prefix and suffix.
    pub caption: &'a str,
}

/// Why a sink did not take a result.
#[derive(Debug)]
pub enum SinkFailure {
    /// This image failed (its caption file could not be written, say); the run goes on.
    Image(String),
    /// The run cannot go on (the manifest cannot be written).
    Fatal(Error),
}

impl From<Error> for SinkFailure {
    fn from(e: Error) -> Self {
        SinkFailure::Fatal(e)
    }
}

/// A destination for results. Sinks are called in order for each image; when one fails the
/// image, the later ones are not called with its result but with [`failed`](Sink::failed).
pub trait Sink {
    /// The model is loaded and the first result is coming.
    fn begin(&mut self, _run: &RunInfo) -> Result<()> {
        Ok(())
    }
    /// One image's result.
    fn captioned(&mut self, item: &Captioned) -> Result<(), SinkFailure>;
    /// An image that could not be captioned, with the reason.
    fn failed(&mut self, _path: &Path, _reason: &str) -> Result<()> {
        Ok(())
    }
    /// Every image of `container` (a tar shard) has been passed to the sinks, captioned or
    /// failed, so what is written for it as a whole can be completed.
    fn container_done(&mut self, _container: &Container) -> Result<()> {
        Ok(())
    }
    /// The run is over; flush what is buffered.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Writes each caption to its image's caption file ([`Job::sidecar`]) by the [`Sidecars`]
/// policy, atomically. Put it first, so that an image whose caption could not be written is
/// not reported as done by the sinks after it.
#[derive(Debug)]
pub struct SidecarSink {
    policy: Sidecars,
}

impl SidecarSink {
    /// Writes caption files by `policy`.
    pub fn new(policy: Sidecars) -> Self {
        Self { policy }
    }
}

impl Sink for SidecarSink {
    fn captioned(&mut self, item: &Captioned) -> Result<(), SinkFailure> {
        let Some(path) = &item.job.sidecar else {
            return Ok(());
        };
        self.policy
            .write(path, item.caption)
            .map_err(|e| SinkFailure::Image(format!("cannot write {}: {e}", path.display())))
    }
}

/// The formats of a [`ManifestSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// `path<TAB>caption` per image, or the bare caption when [`ManifestSink::bare`] is set.
    Text,
    /// One JSON object per image: `path`, `task`, `text` or `result`, `raw`, `ids`, `model`,
    /// `generation`.
    Jsonl,
    /// `path,task,caption` rows under a header.
    Csv,
}

/// A record of every result, in input order, to a file or standard output.
pub struct ManifestSink {
    format: ManifestFormat,
    out: Box<dyn Write + Send>,
    /// Where `out` goes, for messages.
    name: String,
    /// For a manifest file: the temporary file `out` writes, and the file it becomes at the end.
    rename: Option<(std::path::PathBuf, std::path::PathBuf)>,
    model: String,
    weights: String,
    /// The task's name and the generation settings, from [`Sink::begin`].
    task: String,
    generation: Value,
    /// Text format: only the caption, for a single image given on the command line.
    bare: bool,
    rows: usize,
}

impl ManifestSink {
    /// Writes `format` records to `out` (named `name` in error messages), crediting the model
    /// `model` and describing its weights as `weights` (`f32`, `bf16 vision, q8 language model`).
    pub fn new(
        format: ManifestFormat,
        out: Box<dyn Write + Send>,
        name: impl Into<String>,
        model: impl Into<String>,
        weights: impl Into<String>,
    ) -> Self {
        Self {
            format,
            out,
            name: name.into(),
            rename: None,
            model: model.into(),
            weights: weights.into(),
            task: String::new(),
            generation: Value::Null,
            bare: false,
            rows: 0,
        }
    }

    /// Writes `format` records to the file `path`: to a temporary file beside it, renamed over
    /// `path` when the run finishes, so that a killed run leaves the previous manifest whole.
    pub fn to_file(
        format: ManifestFormat,
        path: &Path,
        model: impl Into<String>,
        weights: impl Into<String>,
    ) -> Result<Self> {
        let tmp = super::dataset::temp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        let out = Box::new(std::io::BufWriter::new(file));
        let mut sink = Self::new(format, out, path.display().to_string(), model, weights);
        sink.rename = Some((tmp, path.to_path_buf()));
        Ok(sink)
    }

    /// Text format: print only the caption, without the path (one image, printed).
    pub fn bare(mut self, bare: bool) -> Self {
        self.bare = bare;
        self
    }

    fn write_record(&mut self, item: &Captioned) -> std::io::Result<()> {
        let path = item.job.image.path.to_string_lossy();
        let task = &self.task;
        match self.format {
            ManifestFormat::Jsonl => {
                let obj = jsonl_record(
                    Some(&path),
                    task,
                    item.output,
                    item.caption,
                    &self.model,
                    &self.generation,
                );
                writeln!(self.out, "{obj}")
            }
            ManifestFormat::Csv => {
                if self.rows == 0 {
                    writeln!(self.out, "path,task,caption")?;
                }
                writeln!(
                    self.out,
                    "{},{},{}",
                    csv_field(&path),
                    csv_field(task),
                    csv_field(item.caption)
                )
            }
            ManifestFormat::Text if self.bare => writeln!(self.out, "{}", item.caption),
            ManifestFormat::Text => writeln!(self.out, "{path}\t{}", item.caption),
        }
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::output(format!("cannot write results to {}: {e}", self.name))
    }
}

impl Sink for ManifestSink {
    fn begin(&mut self, run: &RunInfo) -> Result<()> {
        let g = run.generation;
        self.task = run.task.name.clone();
        self.generation = generation_json(g, &self.weights);
        Ok(())
    }

    fn captioned(&mut self, item: &Captioned) -> Result<(), SinkFailure> {
        self.write_record(item).map_err(|e| SinkFailure::Fatal(self.error(e)))?;
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.error(e))?;
        if let Some((tmp, path)) = self.rename.take() {
            std::fs::rename(&tmp, &path).map_err(|e| self.error(e))?;
        }
        Ok(())
    }
}

/// The `generation` object of a JSONL record: the settings that decide the tokens, and how the
/// weights were held (`weights`: `f32`, `bf16 vision, q8 language model`).
pub fn generation_json(g: &GenerationConfig, weights: &str) -> Value {
    json!({
        "num_beams": g.num_beams, "max_new_tokens": g.max_new_tokens,
        "min_new_tokens": g.min_new_tokens, "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "do_sample": g.sampling.is_some(), "weights": weights,
    })
}

/// One image's JSONL record, as `florence caption --format jsonl` prints it: `path` (when there
/// is one), `task`, `raw`, `ids`, `model`, `generation`, and `text` (the caption as written,
/// prefix and suffix included) for text tasks or `result` for structured ones.
pub fn jsonl_record(
    path: Option<&str>,
    task: &str,
    output: &Output,
    caption: &str,
    model: &str,
    generation: &Value,
) -> Value {
    let mut obj = json!({
        "task": task, "raw": output.raw, "ids": output.ids, "model": model, "generation": generation,
    });
    if let Some(path) = path {
        obj["path"] = Value::String(path.to_string());
    }
    match output.result.text() {
        Some(_) => obj["text"] = Value::String(caption.to_string()),
        None => obj["result"] = json!(output.result),
    }
    obj
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Appends a JSON line `{"path", "error"}` for every image that failed.
#[derive(Debug)]
pub struct ErrorLog {
    file: std::fs::File,
}

impl ErrorLog {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self { file })
    }
}

impl Sink for ErrorLog {
    fn captioned(&mut self, _: &Captioned) -> Result<(), SinkFailure> {
        Ok(())
    }

    fn failed(&mut self, path: &Path, reason: &str) -> Result<()> {
        // A log line that cannot be written must not stop the captioning it reports on.
        let _ = writeln!(
            self.file,
            "{}",
            json!({ "path": path.to_string_lossy(), "error": reason })
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::InputImage;
    use crate::tasks::TaskResult;

    /// A writer whose bytes the test can read after the sink is dropped.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(sink: &mut ManifestSink, path: &str, result: TaskResult, caption: &str) {
        let job = Job {
            image: InputImage {
                path: path.into(),
                root: "".into(),
                key: path.into(),
            },
            sidecar: None,
            member: None,
        };
        let output = Output {
            ids: vec![2, 0, 2],
            raw: "</s><s></s>".into(),
            result,
        };
        let item = Captioned {
            job: &job,
            output: &output,
            caption,
        };
        sink.captioned(&item).unwrap();
    }

    #[test]
    fn csv_quotes_fields_and_writes_one_header() {
        let out = Shared::default();
        let mut sink = ManifestSink::new(ManifestFormat::Csv, Box::new(out.clone()), "x", "m", "f32");
        let task = Task::new("<OD>", None).unwrap();
        let g = GenerationConfig::default();
        sink.begin(&RunInfo {
            task: &task,
            generation: &g,
        })
        .unwrap();
        record(
            &mut sink,
            "a,b.png",
            TaskResult::Text("say \"hi\"".into()),
            "say \"hi\"",
        );
        record(&mut sink, "c.png", TaskResult::Text("x".into()), "x");
        sink.finish().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "path,task,caption\n\"a,b.png\",<OD>,\"say \"\"hi\"\"\"\nc.png,<OD>,x\n"
        );
    }

    #[test]
    fn jsonl_has_text_or_result() {
        let out = Shared::default();
        let mut sink = ManifestSink::new(ManifestFormat::Jsonl, Box::new(out.clone()), "x", "m", "f32");
        let g = GenerationConfig::default();
        let task = Task::new("<OD>", None).unwrap();
        sink.begin(&RunInfo {
            task: &task,
            generation: &g,
        })
        .unwrap();
        let boxes = TaskResult::Boxes {
            bboxes: vec![crate::tasks::Coords(vec![0.5, 1.0, 2.0, 3.0])],
            labels: vec!["car".into()],
        };
        record(&mut sink, "a.png", boxes, "");
        record(&mut sink, "b.png", TaskResult::Text("a cat".into()), "ohwx, a cat");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0]["result"],
            json!({"bboxes": [[0.5, 1.0, 2.0, 3.0]], "labels": ["car"]})
        );
        assert!(lines[0].get("text").is_none());
        assert_eq!(lines[1]["text"], "ohwx, a cat");
        assert_eq!(lines[1]["generation"]["num_beams"], 3);
        assert_eq!(lines[1]["model"], "m");
    }
}
