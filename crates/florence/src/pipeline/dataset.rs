//! Image datasets on disk: finding the images under folders, splitting them into shards, and
//! writing caption sidecars atomically next to them (or into a mirrored output folder).
//!
//! This is dataset policy, kept apart from the model: which files are images, which shard owns
//! each, where its caption goes, and what happens to a caption that is already there.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

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
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
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

/// Shard `index` of `count` (0-based): the images whose [`shard_hash`] is `index` modulo
/// `count`. Shards partition any input exactly, and membership depends only on each image's
/// [`key`](InputImage::key), so machines that mount one dataset at different places agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, `0..count`.
    pub index: usize,
    /// How many shards the input is split into.
    pub count: usize,
}

impl Shard {
    /// Shard `index` of `count`; the index must be below the count.
    pub fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: the index must be below the count (0-based)"
            ));
        }
        Ok(Self { index, count })
    }

    /// Whether `image` belongs to this shard.
    pub fn contains(&self, image: &InputImage) -> bool {
        (shard_hash(&image.key) % self.count as u64) as usize == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// Parses `I/N`, e.g. `3/8`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
        let i: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index {i:?} is not a number"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count {n:?} is not a number"))?;
        Self::new(i, n)
    }
}

/// The hash that assigns an image to a shard: 64-bit FNV-1a over the key's components joined
/// with `/` (on every platform), then MurmurHash3's 64-bit finalizer. FNV-1a alone leaves its low
/// bits poorly mixed (its lowest bit is the parity of the bytes' lowest bits, so with two shards
/// keys that differ in one byte land in opposite shards); the finalizer spreads every input bit
/// over every output bit.
pub fn shard_hash(key: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in key.components().enumerate() {
        let bytes = match part {
            std::path::Component::RootDir => &b""[..],
            other => other.as_os_str().as_encoded_bytes(),
        };
        let separator = if i > 0 { &b"/"[..] } else { &b""[..] };
        for b in separator.iter().chain(bytes) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let mut x = h;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The image.
    pub image: InputImage,
    /// Its caption file, when captions are written as sidecars.
    pub sidecar: Option<PathBuf>,
}

/// What is left to do for an input, decided before the model is loaded.
#[derive(Debug, Default)]
pub struct Work {
    /// The images to caption, in order.
    pub jobs: Vec<Job>,
    /// Images of this shard whose caption exists and is kept (`Existing::Skip`).
    pub skipped: usize,
    /// Images of this shard that cannot be captioned (unlisted paths, clashing caption files).
    pub failures: Vec<InputError>,
}

/// Decides the work for `images`: the ones in `shard`, less those whose caption is kept; an
/// image whose caption file is already another image's (`photo.jpg`, `photo.png`) fails, and
/// the first in order keeps the file. Claims are made over the whole input, so every shard
/// agrees on the owner. Leftover temporary files of a killed run are removed.
pub fn plan_work(images: Vec<InputImage>, shard: Option<Shard>, sidecars: Option<&Sidecars>) -> Work {
    let mut work = Work::default();
    let mut claimed: std::collections::HashMap<PathBuf, PathBuf> = std::collections::HashMap::new();
    for image in images {
        let mine = shard.is_none_or(|s| s.contains(&image));
        let sidecar = sidecars.map(|s| s.path_for(&image));
        if let Some(sc) = &sidecar {
            if let Some(owner) = claimed.get(sc) {
                if mine {
                    work.failures.push(InputError {
                        reason: format!(
                            "its caption file {} is already the caption of {}; rename one of the two images",
                            sc.display(),
                            owner.display()
                        ),
                        path: image.path,
                    });
                }
                continue;
            }
            claimed.insert(sc.clone(), image.path.clone());
        }
        if !mine {
            continue;
        }
        if let (Some(sc), Some(policy)) = (&sidecar, sidecars) {
            let _ = std::fs::remove_file(temp_path(sc));
            if policy.existing == Existing::Skip && sc.exists() {
                work.skipped += 1;
                continue;
            }
        }
        work.jobs.push(Job { image, sidecar });
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(key: &str) -> InputImage {
        InputImage {
            path: PathBuf::from(key),
            root: PathBuf::new(),
            key: PathBuf::from(key),
        }
    }

    #[test]
    fn shards_partition_exactly() {
        let images: Vec<InputImage> = (0..500).map(|i| image(&format!("d/img_{i}.jpg"))).collect();
        for n in [1, 2, 3, 7] {
            for img in &images {
                let owners = (0..n).filter(|&i| Shard::new(i, n).unwrap().contains(img)).count();
                assert_eq!(owners, 1);
            }
        }
    }

    /// With two shards, keys that differ in one byte must not land in opposite shards every time
    /// (plain FNV-1a does exactly that: its lowest bit is the parity of the bytes' lowest bits),
    /// and every shard gets about its share.
    #[test]
    fn shard_hash_mixes_its_low_bits() {
        let n = 1000;
        let same = (0..n)
            .filter(|i| {
                shard_hash(Path::new(&format!("a/img_{i}.jpg"))) % 2
                    == shard_hash(Path::new(&format!("b/img_{i}.jpg"))) % 2
            })
            .count();
        assert!((400..=600).contains(&same), "{same} of {n} keys kept their shard");
        for count in [2u64, 3, 8] {
            let mut sizes = vec![0usize; count as usize];
            for i in 0..n {
                sizes[(shard_hash(Path::new(&format!("img_{i:05}.png"))) % count) as usize] += 1;
            }
            let share = n / count as usize;
            assert!(
                sizes.iter().all(|&s| s.abs_diff(share) * 5 < share),
                "{count} shards: {sizes:?}"
            );
        }
    }

    /// The hash is of the key's components joined with `/`, so it is the same on every platform
    /// and for every spelling of the separators.
    #[test]
    fn shard_hash_is_of_the_slash_joined_components() {
        assert_eq!(
            shard_hash(Path::new("a/b/c.jpg")),
            shard_hash(Path::new("a//b/./c.jpg"))
        );
        assert_ne!(shard_hash(Path::new("a/b/c.jpg")), shard_hash(Path::new("ab/c.jpg")));
        assert_eq!(shard_hash(Path::new("/x/y.png")), shard_hash(Path::new("//x/y.png")));
        // FNV-1a of "a/b" then the finalizer, computed by hand.
        assert_eq!(shard_hash(Path::new("a/b")), finalized_fnv(b"a/b"));
    }

    fn finalized_fnv(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325;
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h = (h ^ (h >> 33)).wrapping_mul(0xff51afd7ed558ccd);
        h = (h ^ (h >> 33)).wrapping_mul(0xc4ceb9fe1a85ec53);
        h ^ (h >> 33)
    }

    #[test]
    fn shard_specs_parse() {
        assert_eq!("3/8".parse::<Shard>(), Ok(Shard { index: 3, count: 8 }));
        assert!("8/8".parse::<Shard>().unwrap_err().contains("below the count"));
        assert!("x/8".parse::<Shard>().unwrap_err().contains("not a number"));
        assert!("3".parse::<Shard>().unwrap_err().contains("expected I/N"));
    }

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
