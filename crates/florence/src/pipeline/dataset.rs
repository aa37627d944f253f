//! Image datasets on disk: finding the images under folders, splitting them into shards, and
//! writing caption sidecars atomically next to them (or into a mirrored output folder).
//!
//! This is dataset policy, kept apart from the model: which files are images, which shard owns
//! each, where its caption goes, and what happens to a caption that is already there.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::parquet::Columns;
use super::shard::Shard;
use super::source::{plan_inputs, Input, Member, Work};

/// File extensions taken as images without looking inside (case-insensitive).
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "jfif", "webp", "gif", "bmp", "tif", "tiff"];

/// An image to caption, with the input folder it was found under (for mirrored outputs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputImage {
    /// Where the file is, as it will be opened.
    pub path: PathBuf,
    /// The folder given on the command line that contains `path` (its parent for files given directly).
    pub root: PathBuf,
    /// The name that decides the image's shard: its path relative to the input folder it was
    /// found under, or the path as given for a file named directly (an argument or a line of a
    /// list file). It does not depend on where the dataset is mounted.
    pub key: PathBuf,
}

/// A path that could not be listed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// The file or folder.
    pub path: PathBuf,
    /// Why it could not be listed or read.
    pub reason: String,
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(is_image_extension)
}

/// Whether `ext` (without its dot) is an image file extension, in any case.
pub(super) fn is_image_extension(ext: &str) -> bool {
    IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(ext))
}

/// Whether the file's first bytes are those of an image format we decode.
fn sniffs_as_image(path: &Path) -> bool {
    let mut head = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    n > 0 && image::guess_format(&head[..n]).is_ok()
}

/// Collects the images named by `inputs`: files are taken as given; folders contribute the files
/// that have an image extension or image content (descending into subfolders when `recursive`).
/// Symlinked folders are followed once (loops are cut). Inputs keep their order, folder
/// contents are sorted, and duplicates are dropped, so every run and every shard sees the same
/// order.
pub fn collect_images(inputs: &[PathBuf], recursive: bool) -> (Vec<InputImage>, Vec<InputError>) {
    let mut images = Vec::new();
    let mut errors = Vec::new();
    for input in inputs {
        match std::fs::metadata(input) {
            Ok(m) if m.is_dir() => {
                let mut visited = HashSet::new();
                walk(input, input, recursive, &mut visited, &mut images, &mut errors);
            }
            Ok(_) => {
                let root = input.parent().map(Path::to_path_buf).unwrap_or_default();
                images.push(InputImage {
                    path: input.clone(),
                    root,
                    key: input.clone(),
                });
            }
            Err(e) => errors.push(InputError {
                path: input.clone(),
                reason: e.to_string(),
            }),
        }
    }
    let mut seen = HashSet::new();
    images.retain(|i| seen.insert(i.path.clone()));
    (images, errors)
}

fn walk(
    root: &Path,
    dir: &Path,
    recursive: bool,
    visited: &mut HashSet<PathBuf>,
    images: &mut Vec<InputImage>,
    errors: &mut Vec<InputError>,
) {
    match dir.canonicalize() {
        Ok(c) => {
            if !visited.insert(c) {
                return; // a symlink loop, or a folder seen before
            }
        }
        Err(e) => {
            errors.push(InputError {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            });
            return;
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(InputError {
                path: dir.to_path_buf(),
                reason: format!("cannot list folder: {e}"),
            });
            return;
        }
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                if recursive {
                    walk(root, &path, recursive, visited, images, errors);
                }
            }
            Ok(_) => {
                if has_image_extension(&path) || sniffs_as_image(&path) {
                    let key = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    images.push(InputImage {
                        path,
                        root: root.to_path_buf(),
                        key,
                    });
                }
            }
            // A dangling symlink named like an image is worth reporting; other entries are not.
            Err(e) if has_image_extension(&path) => errors.push(InputError {
                path,
                reason: e.to_string(),
            }),
            Err(_) => {}
        }
    }
}

/// Reads a list file: one path per line, blank lines and `#` comments ignored; relative paths
/// are relative to the current directory.
pub fn read_list(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read(path)?;
    Ok(text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
        .map(path_from_bytes)
        .collect())
}

#[cfg(unix)]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

#[cfg(not(unix))]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(b).into_owned())
}

/// Where the caption of `image` goes: next to it with extension `ext` (".txt"), or at the same
/// relative place under `output_dir`.
pub fn sidecar_path(image: &InputImage, ext: &str, output_dir: Option<&Path>) -> PathBuf {
    let with_ext = |p: &Path| {
        let mut s = p.with_extension("").into_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    match output_dir {
        None => with_ext(&image.path),
        Some(out) => {
            let rel = image
                .path
                .strip_prefix(&image.root)
                .unwrap_or(image.path.file_name().map(Path::new).unwrap_or(&image.path));
            with_ext(&out.join(rel))
        }
    }
}

/// The temporary file [`write_atomic`] writes before renaming; a run that was killed mid-write
/// can leave one, and the next run removes it.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".florence-tmp");
    path.with_file_name(name)
}

/// Writes `contents` to `path` atomically: into a temporary file in the same folder, flushed to
/// disk, then renamed over `path`. Readers see the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What to do with a caption file that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Leave it alone and do not caption the image (the default: reruns resume).
    Skip,
    /// Replace it.
    Overwrite,
    /// Keep it and add the new caption after it.
    Append,
    /// Keep it and add the new caption before it.
    Prepend,
}

/// The text to write for `caption` given the current file content and the policy; `None` means
/// leave the file as it is.
pub fn merge_caption(existing: Option<&str>, caption: &str, policy: Existing, separator: &str) -> Option<String> {
    match (existing.map(str::trim_end), policy) {
        (Some(_), Existing::Skip) => None,
        (None, _) | (Some(""), _) | (Some(_), Existing::Overwrite) => Some(caption.to_string()),
        (Some(old), Existing::Append) => Some(format!("{old}{separator}{caption}")),
        (Some(old), Existing::Prepend) => Some(format!("{caption}{separator}{old}")),
    }
}

/// Where and how captions are written as sidecar files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecars {
    /// The caption file's extension, with its dot (`.txt`).
    pub ext: String,
    /// Write under this folder, mirroring the input folders, instead of next to each image.
    pub output_dir: Option<PathBuf>,
    /// What to do with a caption file that already exists.
    pub existing: Existing,
    /// Text between an existing caption and the new one (`Append`, `Prepend`).
    pub separator: String,
}

impl Sidecars {
    /// The caption file of `image`.
    pub fn path_for(&self, image: &InputImage) -> PathBuf {
        sidecar_path(image, &self.ext, self.output_dir.as_deref())
    }

    /// Writes `caption` to `path` by the policy, atomically (a trailing newline is added).
    pub fn write(&self, path: &Path, caption: &str) -> std::io::Result<()> {
        let old = std::fs::read_to_string(path).ok();
        match merge_caption(old.as_deref(), caption, self.existing, &self.separator) {
            Some(text) => write_atomic(path, format!("{text}\n").as_bytes()),
            None => Ok(()),
        }
    }
}

/// An image to caption and, when captions go to files, its caption file.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The image; for one inside a container, its name is `CONTAINER/NAME` (`shard.tar/0001.jpg`,
    /// `data.parquet/17`).
    pub image: InputImage,
    /// Its caption file, when captions are written as sidecars.
    pub sidecar: Option<PathBuf>,
    /// Where it is inside a container (a tar shard, a Parquet file), for one that is.
    pub member: Option<Member>,
}

/// Decides the work for image files: [`plan_inputs`] over images only.
pub fn plan_work(images: Vec<InputImage>, shard: Option<Shard>, sidecars: Option<&Sidecars>) -> Work {
    let inputs = images.into_iter().map(Input::Image).collect();
    plan_inputs(inputs, shard, sidecars, &Columns::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_next_to_images_or_mirrored() {
        let img = InputImage {
            path: PathBuf::from("data/a/b.photo.JPG"),
            root: PathBuf::from("data"),
            key: PathBuf::from("a/b.photo.JPG"),
        };
        assert_eq!(sidecar_path(&img, ".txt", None), PathBuf::from("data/a/b.photo.txt"));
        assert_eq!(
            sidecar_path(&img, ".caption", Some(Path::new("out"))),
            PathBuf::from("out/a/b.photo.caption")
        );
    }

    #[test]
    fn merge_policies() {
        assert_eq!(merge_caption(None, "new", Existing::Skip, ", ").as_deref(), Some("new"));
        assert_eq!(merge_caption(Some("old\n"), "new", Existing::Skip, ", "), None);
        assert_eq!(
            merge_caption(Some("old\n"), "new", Existing::Overwrite, ", ").as_deref(),
            Some("new")
        );
        assert_eq!(
            merge_caption(Some("old\n"), "new", Existing::Append, ", ").as_deref(),
            Some("old, new")
        );
        assert_eq!(
            merge_caption(Some("old"), "new", Existing::Prepend, ", ").as_deref(),
            Some("new, old")
        );
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.txt");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"again").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "again");
        assert!(!temp_path(&p).exists());
    }
}
