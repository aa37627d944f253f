//! The data: samples discovered from the config's sources (SEMANTICS.md, Data), their order
//! (SplitMix64 shuffle, split, epochs, windows) and the images decoded ahead on worker threads.
//!
//! Discovery reads every caption, drops captions too long for the decoder and images that cannot
//! be decoded (both reported), all before the split, so that an epoch never meets a bad file it
//! could have known about. `tools/reference/train_data.py` is the reference.

mod order;
mod prefetch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use florence::preprocess::{load_image_with, DecodeOptions};
use florence::tasks::TASKS;
use florence::FlorenceTokenizer;
use florence::{Error, Result};
use serde_json::Value;

use crate::config::{DataSource, TrainConfig};

pub use order::{epoch_order, shuffled, split, steps_per_epoch, windows, Split, SplitMix64};
pub use prefetch::{Batch, Prefetcher};

/// Image files tried for `<stem>.txt`, in this order.
const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// How training images are decoded: as PIL opens them (no EXIF rotation), for parity.
pub const DECODE: DecodeOptions = DecodeOptions {
    exif_orientation: false,
    max_pixels: 2 * 89_478_485,
    allow_truncated: false,
};

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The task prompt as written (`<CAPTION>`), before expansion.
    pub prompt: String,
    /// The image file.
    pub image: PathBuf,
    /// The caption file, or `file.jsonl#index` for a ShareGPT record.
    pub caption_file: String,
    /// The cleaned caption.
    pub caption: String,
    /// `<s> expanded prompt </s>`.
    pub prompt_ids: Vec<u32>,
    /// `<s> caption </s>`.
    pub label_ids: Vec<u32>,
}

/// What [`discover`] found.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// The usable samples, in source order.
    pub samples: Vec<Sample>,
    /// Captions dropped as longer than the decoder's positions: caption file and label length.
    pub dropped_long: Vec<(String, usize)>,
    /// Caption files without an image beside them (skipped, as Florence-2ner does).
    pub no_image: Vec<PathBuf>,
    /// Images (or captions) that could not be read, with why; their samples are dropped.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// A sample before tokenization: prompt, image, caption file, raw caption.
struct Raw {
    prompt: String,
    image: PathBuf,
    caption_file: String,
    text: String,
}

/// Finds every sample of `cfg`'s sources, in source order; tokenizes prompts and captions
/// (a label longer than `max_label_len` is dropped) and checks every image decodes.
pub fn discover(cfg: &TrainConfig, tokenizer: &FlorenceTokenizer, max_label_len: usize) -> Result<Discovery> {
    let mut found = Discovery::default();
    let mut raws = Vec::new();
    for source in &cfg.data {
        match source {
            DataSource::Captioned { prompt, dir } => beside(prompt, dir, &mut raws, &mut found)?,
            DataSource::PromptFolders { dir } => by_prompt_folders(dir, &mut raws, &mut found)?,
            DataSource::ShareGpt { file } => raws.extend(sharegpt(file)?),
        }
    }
    let mut prompts: Vec<(String, Vec<u32>)> = Vec::new();
    let mut kept = Vec::new();
    for raw in raws {
        let caption = clean_caption(&raw.text);
        let label_ids = tokenizer.encode(&caption)?;
        if label_ids.len() > max_label_len {
            found.dropped_long.push((raw.caption_file, label_ids.len()));
            continue;
        }
        let prompt_ids = match prompts.iter().find(|(p, _)| *p == raw.prompt) {
            Some((_, ids)) => ids.clone(),
            None => {
                let expanded =
                    construct_prompt(&raw.prompt).map_err(|e| Error::config(format!("{}: {e}", raw.caption_file)))?;
                let ids = tokenizer.encode(&expanded)?;
                prompts.push((raw.prompt.clone(), ids.clone()));
                ids
            }
        };
        kept.push(Sample {
            prompt: raw.prompt,
            image: raw.image,
            caption_file: raw.caption_file,
            caption,
            prompt_ids,
            label_ids,
        });
    }
    let failures = check_images(&kept);
    for (sample, failure) in kept.into_iter().zip(failures) {
        match failure {
            None => found.samples.push(sample),
            Some(why) => found.unreadable.push((sample.image, why)),
        }
    }
    Ok(found)
}

/// Decodes every image on worker threads; `Some(why)` for those that fail.
fn check_images(samples: &[Sample]) -> Vec<Option<String>> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(samples.len().max(1));
    let mut out = vec![None; samples.len()];
    let results: Vec<Vec<(usize, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut bad = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(sample) = samples.get(i) else { break bad };
                        if let Err(e) = load_image_with(&sample.image, &DECODE) {
                            bad.push((i, e.to_string()));
                        }
                    }
                })
            })
            .collect();
        // A worker only panics on a bug in the decoder; report it as that image's failure.
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    for (i, why) in results.into_iter().flatten() {
        out[i] = Some(why);
    }
    out
}

/// Florence-2ner's clean-up: one left-to-right pass of `replace("  ", " ")`, then Python's `strip`.
pub fn clean_caption(text: &str) -> String {
    py_strip(&text.replace("  ", " ")).to_string()
}

/// Python's `str.strip()`: `str.isspace` is Unicode White_Space plus the separators 0x1C..0x1F.
fn py_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The prompt text as transformers' `Florence2Processor._construct_prompts` builds it: a task
/// token without input must be the whole prompt; one with input takes the rest, stripped.
pub fn construct_prompt(prompt: &str) -> Result<String> {
    let mut text = prompt.to_string();
    if let Some(spec) = TASKS.iter().find(|t| !t.needs_input() && text.contains(t.token)) {
        if text != spec.token {
            return Err(Error::config(format!(
                "task token {} should be the only content in the prompt {prompt:?}",
                spec.token
            )));
        }
        text = spec.template.to_string();
    }
    if let Some(spec) = TASKS.iter().find(|t| t.needs_input() && text.contains(t.token)) {
        text = spec
            .template
            .replace("{input}", py_strip(&text.replace(spec.token, "")));
    }
    Ok(text)
}

/// A caption file's text as Python's text mode reads it: UTF-8, `\r\n` and `\r` as `\n`.
fn read_caption(path: &Path) -> std::result::Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    Ok(text.replace("\r\n", "\n").replace('\r', "\n"))
}

/// The image of `<stem>.txt` in `dir`: the first of [`IMAGE_EXTS`] that is a file.
fn find_image(dir: &Path, stem: &str) -> Option<PathBuf> {
    IMAGE_EXTS
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
}

/// The names of the `*.txt` files in `dir`, in byte order.
fn caption_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".txt") && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Pairs a caption file with its image in `image_dir`, or notes it has none / cannot be read.
fn pair(prompt: &str, image_dir: &Path, caption: PathBuf, raws: &mut Vec<Raw>, found: &mut Discovery) {
    let stem = caption
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(image) = find_image(image_dir, &stem) else {
        found.no_image.push(caption);
        return;
    };
    match read_caption(&caption) {
        Ok(text) => raws.push(Raw {
            prompt: prompt.to_string(),
            image,
            caption_file: caption.to_string_lossy().into_owned(),
            text,
        }),
        Err(why) => found.unreadable.push((caption, why)),
    }
}

/// Forms (a) and (b): `<stem>.txt` beside the images.
fn beside(prompt: &str, dir: &Path, raws: &mut Vec<Raw>, found: &mut Discovery) -> Result<()> {
    for name in caption_names(dir)? {
        pair(prompt, dir, dir.join(name), raws, found);
    }
    Ok(())
}

/// Form (c): subfolders named after task prompts hold `<stem>.txt`, the images are in `dir`;
/// in byte order of `<PROMPT>/<stem>.txt`.
fn by_prompt_folders(dir: &Path, raws: &mut Vec<Raw>, found: &mut Discovery) -> Result<()> {
    let mut rels = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.path().is_dir() {
            let sub = entry.file_name().to_string_lossy().into_owned();
            rels.extend(caption_names(&entry.path())?.into_iter().map(|n| format!("{sub}/{n}")));
        }
    }
    rels.sort();
    for rel in rels {
        let prompt = rel.split('/').next().unwrap_or_default().to_string();
        pair(&prompt, dir, dir.join(&rel), raws, found);
    }
    Ok(())
}

/// ShareGPT records of a `.json` (array) or `.jsonl` file: image relative to the file, prompt =
/// the human turn without `<image>`, stripped; caption = the gpt turn.
fn sharegpt(file: &Path) -> Result<Vec<Raw>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let bad = |what: String| Error::config(what).in_file(file);
    let records: Vec<Value> = if file.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl")) {
        let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        lines
            .map(|(n, l)| serde_json::from_str(l).map_err(|e| bad(format!("line {}: {e}", n + 1))))
            .collect::<Result<_>>()?
    } else {
        serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON list of records: {e}")))?
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    records
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            let record = |what: &str| bad(format!("record {i}: {what}"));
            let image = rec["images"][0].as_str().or(rec["image"].as_str());
            let image = image.ok_or_else(|| record("no \"image\" or \"images\" path"))?;
            let turn = |from: &str| {
                let turns = rec["conversations"].as_array().into_iter().flatten();
                let turn = turns.filter(|t| t["from"] == from).find_map(|t| t["value"].as_str());
                turn.ok_or_else(|| record(&format!("no \"{from}\" turn in \"conversations\"")))
            };
            Ok(Raw {
                prompt: py_strip(&turn("human")?.replace("<image>", "")).to_string(),
                image: dir.join(image),
                caption_file: format!("{}#{i}", file.display()),
                text: turn("gpt")?.to_string(),
            })
        })
        .collect()
}

/// Writes the eval samples' image paths, one a line, as Florence-2ner's `eval_image_paths.txt`,
/// and beside it (`.jsonl`) the references `florence eval` reads: one
/// `{"image", "prompt", "references": [caption]}` line per sample. Both atomically.
pub fn write_eval_list(path: &Path, samples: &[Sample], eval: &[usize]) -> Result<()> {
    let list: String = eval
        .iter()
        .map(|&i| format!("{}\n", samples[i].image.display()))
        .collect();
    let manifest: String = eval
        .iter()
        .map(|&i| {
            let s = &samples[i];
            let line =
                serde_json::json!({"image": s.image.to_string_lossy(), "prompt": s.prompt, "references": [s.caption]});
            format!("{line}\n")
        })
        .collect();
    write_atomic(path, &list)?;
    write_atomic(&path.with_extension("jsonl"), &manifest)
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    florence::pipeline::write_atomic(path, text.as_bytes()).map_err(|e| Error::io(path, e))
}
