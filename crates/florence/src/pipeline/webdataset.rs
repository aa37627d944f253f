//! WebDataset tar shards, as img2dataset writes them: each image member is one input, named
//! `SHARD.tar/KEY.EXT`, and with an output folder the captions go to a caption shard
//! `DIR/SHARD.tar` of `KEY.txt` members, the layout WebDataset joins with the image shard by key.
//!
//! A shard is the unit of work: it is read sequentially (gzipped or not), one member at a time,
//! and sharded across machines as a whole. Its caption shard is written to a temporary file and
//! renamed when its last image is done, so a killed run leaves none half-written and a rerun
//! skips the finished ones.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read as _};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dataset::{is_image_extension, temp_path, Existing, InputImage, Job, Sidecars};
use super::sink::{Captioned, Sink, SinkFailure};
use super::source::{Container, Member, Read};
use crate::error::{Error, Result};

/// Whether `path` is named like a tar shard: `.tar`, `.tar.gz` or `.tgz`, in any case.
pub fn is_tar(path: &Path) -> bool {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_ascii_lowercase();
    [".tar", ".tar.gz", ".tgz"].iter().any(|ext| name.ends_with(ext))
}

/// The caption shard of `shard` when captions are written under an output folder:
/// `DIR/NAME.tar` (a `.tar.gz` or `.tgz` shard's captions go to a plain `.tar`). Without one,
/// the shard's records go only to the manifest. A caption shard is written whole, so
/// `--existing append`/`prepend` do not apply.
pub(crate) fn caption_shard(shard: &InputImage, sidecars: Option<&Sidecars>) -> Result<Option<PathBuf>, String> {
    let Some((policy, dir)) = sidecars.and_then(|s| Some((s, s.output_dir.as_ref()?))) else {
        return Ok(None);
    };
    if matches!(policy.existing, Existing::Append | Existing::Prepend) {
        return Err("caption shards are written whole: use --existing skip or overwrite".into());
    }
    let name = shard.path.file_name().unwrap_or_default().to_string_lossy();
    let lower = name.to_ascii_lowercase();
    let stem_len = [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find(|ext| lower.ends_with(*ext))
        .map_or(name.len(), |ext| name.len() - ext.len());
    let output = dir.join(format!("{}.tar", &name[..stem_len]));
    if output.file_name() == shard.path.file_name() && folder(&output).is_some_and(|d| Some(d) == folder(&shard.path)) {
        return Err(format!(
            "its caption shard would replace it ({}); choose another --output-dir",
            output.display()
        ));
    }
    Ok(Some(output))
}

/// The folder a file is in, resolved (`None` when it does not exist).
fn folder(path: &Path) -> Option<PathBuf> {
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty());
    parent.unwrap_or(Path::new(".")).canonicalize().ok()
}

/// A tar shard to caption: its image members, in order.
#[derive(Debug)]
pub struct TarShard {
    input: InputImage,
    container: Arc<Container>,
}

impl TarShard {
    /// The shard `input`, its captions written to the caption shard `output` when given.
    pub fn new(input: InputImage, output: Option<PathBuf>) -> Self {
        let container = Arc::new(Container {
            path: input.path.clone(),
            output,
        });
        Self { input, container }
    }

    /// Reads the members one after the other, emitting the images (members whose extension is an
    /// image's) and, when the end is reached, [`Read::Done`]. With a caption shard, a sample's
    /// second image (a mask beside the photo) fails: a sample has one caption.
    pub(crate) fn read(self, emit: &mut dyn FnMut(Read) -> ControlFlow<()>) -> ControlFlow<()> {
        let broken = |reason: String| Read::Broken(self.input.path.clone(), reason);
        let mut archive = match open(&self.input.path) {
            Ok(reader) => tar::Archive::new(reader),
            Err(e) => return emit(broken(format!("cannot read: {e}"))),
        };
        let entries = match archive.entries() {
            Ok(entries) => entries,
            Err(e) => return emit(broken(format!("cannot read the tar: {e}"))),
        };
        let mut captioned: HashMap<String, String> = HashMap::new();
        for entry in entries {
            let mut entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    return emit(broken(format!(
                        "cannot read the tar: {e}; the shard is damaged, re-download it"
                    )))
                }
            };
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some((key, ext)) = split_key(&name) else {
                continue;
            };
            if !ext.rsplit('.').next().is_some_and(is_image_extension) {
                continue;
            }
            let job = self.member_job(&name, key);
            if name.starts_with('/') || name.split('/').any(|part| part == "..") {
                let reason = "its name is not a relative path inside the shard; rename the member".to_string();
                emit(Read::Image(job, Err(reason)))?;
                continue;
            }
            if self.container.output.is_some() {
                if let Some(first) = captioned.get(key) {
                    let reason = format!("sample {key} has another image, {first}, captioned before it; a caption shard holds one caption per sample");
                    emit(Read::Image(job, Err(reason)))?;
                    continue;
                }
                captioned.insert(key.to_string(), name.clone());
            }
            let size = entry.size();
            let mut bytes = Vec::with_capacity(size.min(1 << 30) as usize);
            // A member cut short by the end of the file reads without an error, only shorter.
            let read = entry.read_to_end(&mut bytes).map(|n| n as u64);
            if let Some(why) = match read {
                Ok(n) if n < size => Some(format!("{n} of its {size} bytes are there")),
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            } {
                return emit(broken(format!(
                    "cannot read member {name}: {why}; the shard is damaged, re-download it"
                )));
            }
            emit(Read::Image(job, Ok(bytes)))?;
        }
        emit(Read::Done(self.container))
    }

    fn member_job(&self, name: &str, key: &str) -> Job {
        let mut path = self.input.path.clone().into_os_string();
        path.push("/");
        path.push(name);
        let mut shard_key = self.input.key.clone().into_os_string();
        shard_key.push("/");
        shard_key.push(name);
        Job {
            image: InputImage {
                path: path.into(),
                root: self.input.root.clone(),
                key: shard_key.into(),
            },
            sidecar: None,
            member: Some(Member {
                container: self.container.clone(),
                key: key.to_string(),
                kept: None,
            }),
        }
    }
}

/// Opens a tar shard for sequential reading, gunzipping it when it is gzipped (by content, not
/// by name).
fn open(path: &Path) -> std::io::Result<Box<dyn std::io::Read + Send>> {
    let mut file = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    Ok(if file.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// A member name's WebDataset key and extension: `dir/0001.seg.png` is sample `dir/0001`,
/// extension `seg.png` (the file name is cut at its first dot). Names without a dot, and
/// hidden files, belong to no sample.
fn split_key(name: &str) -> Option<(&str, &str)> {
    let start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = start + name[start..].find('.')?;
    (dot > start).then(|| (&name[..dot], &name[dot + 1..]))
}

/// Writes the captions of tar members to their caption shards, as members `KEY.EXT` (`--ext`,
/// `.txt` by default) holding the caption without a trailing newline, as WebDataset's text
/// members do. Each caption shard is a temporary file until [`Sink::container_done`] renames it
/// into place; the ones still open when the run ends (it was stopped) are removed, to be
/// captioned again by the next run.
pub struct CaptionShardSink {
    ext: String,
    open: HashMap<PathBuf, OpenShard>,
}

struct OpenShard {
    tmp: PathBuf,
    tar: tar::Builder<BufWriter<std::fs::File>>,
}

impl CaptionShardSink {
    /// Writes members with the extension `ext` (with its dot: `.txt`).
    pub fn new(ext: impl Into<String>) -> Self {
        Self {
            ext: ext.into(),
            open: HashMap::new(),
        }
    }

    fn create(output: &Path) -> std::io::Result<OpenShard> {
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = temp_path(output);
        let mut tar = tar::Builder::new(BufWriter::new(std::fs::File::create(&tmp)?));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(OpenShard { tmp, tar })
    }

    fn close(shard: OpenShard, output: &Path) -> std::io::Result<()> {
        let file = shard.tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&shard.tmp, output)
    }
}

fn write_error(output: &Path, e: std::io::Error) -> Error {
    Error::output(format!("cannot write the caption shard {}: {e}", output.display()))
}

impl Sink for CaptionShardSink {
    fn captioned(&mut self, item: &Captioned) -> Result<(), SinkFailure> {
        let Some(member) = &item.job.member else {
            return Ok(());
        };
        let Some(output) = &member.container.output else {
            return Ok(());
        };
        let shard = match self.open.entry(output.clone()) {
            Entry::Occupied(open) => open.into_mut(),
            Entry::Vacant(new) => new.insert(Self::create(output).map_err(|e| write_error(output, e))?),
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(item.caption.len() as u64);
        header.set_mode(0o644);
        shard
            .tar
            .append_data(
                &mut header,
                format!("{}{}", member.key, self.ext),
                item.caption.as_bytes(),
            )
            .map_err(|e| SinkFailure::Fatal(write_error(output, e)))
    }

    fn container_done(&mut self, container: &Container) -> Result<()> {
        let Some(output) = &container.output else {
            return Ok(());
        };
        // A shard with no image captioned still gets its (empty) caption shard: it is done.
        let shard = match self.open.remove(output) {
            Some(shard) => shard,
            None => Self::create(output).map_err(|e| write_error(output, e))?,
        };
        Self::close(shard, output).map_err(|e| write_error(output, e))
    }

    fn finish(&mut self) -> Result<()> {
        for (_, shard) in self.open.drain() {
            let tmp = shard.tmp.clone();
            drop(shard);
            let _ = std::fs::remove_file(tmp);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_cut_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("0001.jpg"), Some(("0001", "jpg")));
        assert_eq!(split_key("a.b/0001.seg.png"), Some(("a.b/0001", "seg.png")));
        assert_eq!(split_key("README"), None);
        assert_eq!(split_key("dir/.hidden"), None);
    }

    #[test]
    fn tar_names() {
        assert!(is_tar(Path::new("s/00000.tar")));
        assert!(is_tar(Path::new("00000.TAR.GZ")));
        assert!(is_tar(Path::new("00000.tgz")));
        assert!(!is_tar(Path::new("00000.tar.zst")));
    }

    #[test]
    fn caption_shards_go_under_the_output_folder() {
        let shard = |p: &str| InputImage {
            path: p.into(),
            root: "shards".into(),
            key: p.into(),
        };
        let mut policy = Sidecars {
            ext: ".txt".into(),
            output_dir: Some("captions".into()),
            existing: Existing::Skip,
            separator: ", ".into(),
        };
        let out = |s: &InputImage, p: &Sidecars| caption_shard(s, Some(p));
        assert_eq!(
            out(&shard("shards/00001.tar.gz"), &policy),
            Ok(Some("captions/00001.tar".into()))
        );
        assert_eq!(caption_shard(&shard("shards/00001.tar"), None), Ok(None));
        policy.existing = Existing::Append;
        assert!(out(&shard("shards/00001.tar"), &policy)
            .unwrap_err()
            .contains("--existing skip"));
        policy.output_dir = None;
        assert_eq!(out(&shard("shards/00001.tar"), &policy), Ok(None));
    }
}
