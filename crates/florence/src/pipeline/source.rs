//! What a run reads: image files, WebDataset tar shards and Parquet files, behind one interface.
//!
//! Inputs are sorted by what they hold ([`collect_inputs`]), planned into [`Source`]s (the shard's
//! part, less what is done: [`plan_inputs`]), and each source is read in order on the loader's
//! thread, one image at a time, so a container of any size is never held in memory.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dataset::{collect_images, temp_path, Existing, InputError, InputImage, Job, Sidecars};
use super::parquet::{self, Columns, KeptColumns, KeptSchema, RowGroups};
use super::shard::Shard;
use super::webdataset::{self, TarShard};

/// An input path by what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An image file.
    Image(InputImage),
    /// A WebDataset tar shard (`.tar`, `.tar.gz`, `.tgz`), named directly.
    Tar(InputImage),
    /// A Parquet file (`.parquet`), named directly.
    Parquet(InputImage),
}

impl Input {
    /// The file, with its root and shard key.
    pub fn file(&self) -> &InputImage {
        match self {
            Input::Image(i) | Input::Tar(i) | Input::Parquet(i) => i,
        }
    }
}

/// [`collect_images`] over `inputs`, except that files named directly with a tar or Parquet
/// extension are taken as containers of images. Folders are searched for images only: a
/// folder's tars and Parquet files are not read (name them, or list them with `--files-from`).
pub fn collect_inputs(inputs: &[PathBuf], recursive: bool) -> (Vec<Input>, Vec<InputError>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for path in inputs {
        let file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        let named = || InputImage {
            path: path.clone(),
            root: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            key: path.clone(),
        };
        if file && webdataset::is_tar(path) {
            found.push(Input::Tar(named()));
        } else if file && parquet::is_parquet(path) {
            found.push(Input::Parquet(named()));
        } else {
            let (images, unreadable) = collect_images(std::slice::from_ref(path), recursive);
            found.extend(images.into_iter().map(Input::Image));
            errors.extend(unreadable);
        }
    }
    let mut seen = HashSet::new();
    found.retain(|i| seen.insert(i.file().path.clone()));
    (found, errors)
}

/// A container of images as a whole: a tar shard, or a Parquet file.
#[derive(Debug, PartialEq, Eq)]
pub struct Container {
    /// The file, as it is opened.
    pub path: PathBuf,
    /// The caption shard its captions are written to (tar shards with `--output-dir`).
    pub output: Option<PathBuf>,
}

/// Where an image inside a container comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The container.
    pub container: Arc<Container>,
    /// The sample it belongs to: a tar member's WebDataset key (its name up to the first dot of
    /// the file name), or a Parquet row's index in its file.
    pub key: String,
    /// A Parquet row's values of the columns kept (`--keep-columns`).
    pub kept: Option<KeptColumns>,
}

/// One unit of planned work, read in order by the loader.
#[derive(Debug)]
pub enum Source {
    /// An image file.
    Image(Job),
    /// The image members of a tar shard, read in order.
    Tar(TarShard),
    /// Some row groups of a Parquet file, read one after the other.
    Parquet(RowGroups),
}

impl Source {
    /// How many images it holds, when that is known without reading it (not for tar shards).
    pub fn images(&self) -> Option<usize> {
        match self {
            Source::Image(_) => Some(1),
            Source::Tar(_) => None,
            Source::Parquet(part) => Some(part.rows()),
        }
    }

    /// Reads the source's images in order into `emit`, which breaks to stop reading.
    pub(crate) fn read(self, emit: &mut dyn FnMut(Read) -> ControlFlow<()>) -> ControlFlow<()> {
        match self {
            Source::Image(job) => {
                let bytes = std::fs::read(&job.image.path).map_err(|e| format!("cannot read: {e}"));
                emit(Read::Image(job, bytes))
            }
            Source::Tar(shard) => shard.read(emit),
            Source::Parquet(part) => part.read(emit),
        }
    }
}

/// What reading a [`Source`] gives, in order.
#[derive(Debug)]
pub(crate) enum Read {
    /// An image's bytes, or why they could not be read.
    Image(Job, Result<Vec<u8>, String>),
    /// The container at `path` cannot be read further: the reason; its images after this are lost.
    Broken(PathBuf, String),
    /// Every image of the container has been read and emitted.
    Done(Arc<Container>),
}

/// What is left to do for an input, decided before the model is loaded.
#[derive(Debug, Default)]
pub struct Work {
    /// What to read, in order: image files and containers.
    pub jobs: Vec<Source>,
    /// Images of this shard whose caption exists and is kept (`Existing::Skip`), and tar shards
    /// of this shard whose caption shard exists.
    pub skipped: usize,
    /// Inputs of this shard that cannot be captioned (unlisted paths, clashing caption files,
    /// unreadable Parquet files).
    pub failures: Vec<InputError>,
    /// The names and types of the columns kept from Parquet inputs, for a Parquet manifest.
    pub kept: KeptSchema,
}

impl Work {
    /// How many images there are to caption, when known before reading (no tar shards).
    pub fn images(&self) -> Option<usize> {
        self.jobs.iter().map(Source::images).sum()
    }
}

/// Decides the work for `inputs`: the images and tar shards whose [key](InputImage::key) is in
/// `shard` and the Parquet row groups whose key (`FILE/row-group-G`) is, less those whose
/// caption file or caption shard exists and is kept. An input whose caption file is already
/// another's (`photo.jpg`, `photo.png`; two tar shards of one name) fails, and the first in order
/// keeps the file. Claims are made over the whole input, so every shard agrees on the owner.
/// Leftover temporary files of a killed run are removed.
pub fn plan_inputs(inputs: Vec<Input>, shard: Option<Shard>, sidecars: Option<&Sidecars>, columns: &Columns) -> Work {
    let mut work = Work::default();
    let mut claimed: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut kept = parquet::KeptResolver::new(columns);
    for input in inputs {
        let mine = shard.is_none_or(|s| s.contains(input.file()));
        let (file, tar) = match input {
            Input::Image(image) => (image, false),
            Input::Tar(shard_file) => (shard_file, true),
            Input::Parquet(file) => {
                match parquet::plan(&file, shard, columns, &mut kept) {
                    Ok(Some(part)) => work.jobs.push(Source::Parquet(part)),
                    Ok(None) => {}
                    Err(reason) if mine => work.failures.push(InputError {
                        path: file.path,
                        reason,
                    }),
                    Err(_) => {}
                }
                continue;
            }
        };
        let output = match tar {
            false => sidecars.map(|s| s.path_for(&file)),
            true => match webdataset::caption_shard(&file, sidecars) {
                Ok(output) => output,
                Err(reason) => {
                    if mine {
                        work.failures.push(InputError {
                            path: file.path,
                            reason,
                        });
                    }
                    continue;
                }
            },
        };
        if let Some(out) = &output {
            if let Some(owner) = claimed.get(out) {
                if mine {
                    work.failures.push(InputError {
                        reason: format!(
                            "its caption file {} is already the caption of {}; rename one of the two",
                            out.display(),
                            owner.display()
                        ),
                        path: file.path,
                    });
                }
                continue;
            }
            claimed.insert(out.clone(), file.path.clone());
        }
        if !mine {
            continue;
        }
        if let (Some(out), Some(policy)) = (&output, sidecars) {
            let _ = std::fs::remove_file(temp_path(out));
            if policy.existing == Existing::Skip && out.exists() {
                work.skipped += 1;
                continue;
            }
        }
        work.jobs.push(match tar {
            false => Source::Image(Job {
                image: file,
                sidecar: output,
                member: None,
            }),
            true => Source::Tar(TarShard::new(file, output)),
        });
    }
    work.kept = kept.finish();
    work
}
