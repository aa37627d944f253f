//! Ground-truth captions: a folder of images with sidecars, a list of images, or a JSONL manifest.

use std::path::{Path, PathBuf};

use florence::{pipeline, Error};
use serde::Deserialize;

/// An image and its ground-truth captions (at least one).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// The image, as it will be opened.
    pub image: PathBuf,
    pub captions: Vec<String>,
}

/// The references found, and the images left out with the reason.
#[derive(Debug, Default)]
pub struct References {
    pub items: Vec<Reference>,
    pub left_out: Vec<pipeline::InputError>,
}

/// Where the references come from and how sidecars are named.
#[derive(Debug, Clone)]
pub struct Source {
    /// A folder of images with sidecars, a `.jsonl` manifest, or a list of image paths (such as
    /// the `eval_image_paths.txt` that `florence train` writes).
    pub path: PathBuf,
    /// Descend into subfolders of a folder.
    pub recursive: bool,
    /// The sidecar extension, with its dot (`.txt`).
    pub ext: String,
}

/// One line of a manifest: `{"image": "a.jpg", "references": ["...", ...]}` (or `"caption"`);
/// other keys (`florence train` writes `prompt`) are ignored.
#[derive(Deserialize)]
struct ManifestLine {
    image: PathBuf,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    caption: Option<String>,
}

/// Reads the references of `source`, in a stable order (the folder walk's, or the file's).
pub fn load(source: &Source) -> Result<References, Error> {
    let path = &source.path;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let (images, left_out) = pipeline::collect_images(std::slice::from_ref(path), source.recursive);
        let mut refs = References {
            items: Vec::new(),
            left_out,
        };
        for image in images {
            let sidecar = sidecar_of(&image.path, &source.ext);
            add_sidecar(&mut refs, image.path, &sidecar);
        }
        return Ok(refs);
    }
    if path.extension().is_some_and(|e| e == "jsonl") {
        return read_manifest(path);
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let mut refs = References::default();
    for image in pipeline::read_list(path).map_err(|e| Error::io(path, e))? {
        let image = resolve(base, image);
        let sidecar = sidecar_of(&image, &source.ext);
        add_sidecar(&mut refs, image, &sidecar);
    }
    Ok(refs)
}

/// `photo.jpg` -> `photo.txt`.
fn sidecar_of(image: &Path, ext: &str) -> PathBuf {
    image.with_extension(ext.trim_start_matches('.'))
}

/// A relative path in a list or manifest is taken from the current folder when it exists there,
/// else from the list's folder.
fn resolve(base: &Path, image: PathBuf) -> PathBuf {
    if image.is_relative() && !image.exists() && base.join(&image).exists() {
        base.join(image)
    } else {
        image
    }
}

fn add_sidecar(refs: &mut References, image: PathBuf, sidecar: &Path) {
    let leave_out =
        |refs: &mut References, image, reason: String| refs.left_out.push(pipeline::InputError { path: image, reason });
    match std::fs::read(sidecar) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => leave_out(refs, image, format!("{} is empty", sidecar.display())),
            Ok(text) => refs.items.push(Reference {
                image,
                captions: vec![text.trim().to_string()],
            }),
            Err(_) => leave_out(refs, image, format!("{} is not UTF-8 text", sidecar.display())),
        },
        Err(e) => leave_out(refs, image, format!("no caption: {}: {e}", sidecar.display())),
    }
}

fn read_manifest(path: &Path) -> Result<References, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut refs = References::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |m: String| Error::usage(format!("{}:{}: {m}", path.display(), n + 1));
        let line: ManifestLine = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "{e}; expected {{\"image\": PATH, \"references\": [CAPTION, ...]}}"
            ))
        })?;
        let mut captions = line.references;
        captions.extend(line.caption);
        captions.retain(|c| !c.trim().is_empty());
        let image = resolve(base, line.image);
        if captions.is_empty() {
            refs.left_out.push(pipeline::InputError {
                path: image,
                reason: "no reference caption".into(),
            });
        } else {
            refs.items.push(Reference { image, captions });
        }
    }
    Ok(refs)
}
