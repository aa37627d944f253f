//! Finding and reading the weight files of a model directory, in either checkpoint layout, and
//! checking them against the config before the model is built.
//!
//! Weights are returned under Microsoft's remote-code names (spec §9), which the model modules
//! mirror with `vb.pp(..)`; native-layout names are translated on load ([`names`]), so one model
//! implementation serves both layouts.
//!
//! - [`files`]: which files hold the weights (one file, or the shards an index lists).
//! - `safetensors`, `pickle`: reading each file format.
//! - [`pages`]: f32 tensors used in place from the file's mapping, and the pages behind them.
//! - [`names`]: the two layouts' names, both ways, and the tensors a config needs.

pub mod files;
pub mod names;
pub mod pages;
mod pickle;
mod safetensors;
pub mod save;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use files::WeightFiles;
use names::Need;
pub use pages::{InPlacePages, MappedF32};

use crate::config::{Florence2Config, Layout};
use crate::error::{Error, Result};

/// Where one tensor's data lies.
#[derive(Debug)]
enum Entry {
    /// In a safetensors file, read when asked for.
    Stored {
        file: usize,
        offset: u64,
        dtype: DType,
        shape: Vec<usize>,
    },
    /// Already in memory (PyTorch pickles are read whole).
    Loaded(Tensor),
}

/// The tensors of a checkpoint under remote-layout names (spec §9), read one at a time when the
/// model asks for them: peak memory while loading is the model as it will be held (in whatever
/// [`WeightFormat`](crate::nn::WeightFormat) was chosen) plus one tensor in f32.
///
/// Safetensors files are also memory-mapped, so that f32 weight matrices wanted in f32 are used
/// in place ([`mapped_f32`](Self::mapped_f32)) rather than copied. As with every memory-mapped
/// loader, the files must not be modified while the model is loaded.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<std::fs::File>,
    /// Per file, its mapping (safetensors files, where the system allows mapping them).
    maps: Vec<Option<Arc<memmap2::Mmap>>>,
    paths: Vec<std::path::PathBuf>,
    /// The file that lists the tensors, for messages.
    source: std::path::PathBuf,
    entries: HashMap<String, Entry>,
    /// Names in the files that are no tensor of either layout's model: native names the table
    /// does not know, and the non-tensor entries of PyTorch files (marked as such).
    unknown: Vec<String>,
    /// Per file, the byte ranges handed out by [`mapped_f32`](Self::mapped_f32), in order.
    in_place: std::sync::Mutex<Vec<Vec<std::ops::Range<usize>>>>,
    /// The tensors the model has read, to check that it reads all it is given.
    #[cfg(test)]
    read: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The layout the tensors were stored in.
    pub layout: Layout,
}

impl Checkpoint {
    /// Indexes the tensors of `weights` (reading only safetensors headers, or whole pickles).
    pub fn open(weights: &WeightFiles) -> Result<Self> {
        let mut raw: Vec<(String, Entry)> = Vec::new();
        let mut unknown = Vec::new();
        let mut files = Vec::new();
        let mut maps = Vec::new();
        for (i, path) in weights.files.iter().enumerate() {
            let is_pickle = path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
            if is_pickle {
                let dict = pickle::read(path)
                    .map_err(|m| Error::checkpoint(path, format!("cannot read PyTorch checkpoint: {m}")))?;
                raw.extend(dict.tensors.into_iter().map(|(n, t)| (n, Entry::Loaded(t))));
                unknown.extend(dict.others.into_iter().map(|n| format!("{n} (not a tensor)")));
                files.push(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
                maps.push(None);
            } else {
                let (file, index) = safetensors::index(path, i)
                    .map_err(|m| Error::checkpoint(path, format!("cannot read safetensors: {m}")))?;
                raw.extend(index);
                // SAFETY: the mapping is only read; a file changed underneath it is documented
                // as unsupported. Where mapping fails, tensors are read with `pread` instead.
                maps.push(unsafe { memmap2::Mmap::map(&file) }.ok().map(Arc::new));
                files.push(file);
            }
        }
        let layout = names::detect_layout(raw.iter().map(|(n, _)| n)).ok_or_else(|| {
            Error::checkpoint(
                &weights.source,
                "contains no Florence-2 weights (no vision_tower.* or language_model.* tensors)",
            )
        })?;
        let mut entries = HashMap::with_capacity(raw.len());
        for (name, e) in raw {
            match layout {
                Layout::Remote => {
                    entries.insert(name, e);
                }
                Layout::Native => match names::native_to_remote(&name) {
                    Some(remote) => {
                        entries.insert(remote, e);
                    }
                    None => unknown.push(name),
                },
            }
        }
        Ok(Self {
            in_place: std::sync::Mutex::new(vec![Vec::new(); files.len()]),
            files,
            maps,
            paths: weights.files.clone(),
            source: weights.source.clone(),
            entries,
            unknown,
            #[cfg(test)]
            read: Default::default(),
            layout,
        })
    }

    /// Checks the tensors against the model `config` describes ([`names::expected`]) before
    /// any is read: a tensor the model needs and cannot derive is an error; tensors it does
    /// not use are a warning (returned, one line) or, when `strict`, an error. From then on the
    /// checkpoint offers the model only the tensors it uses.
    pub fn check(&mut self, config: &Florence2Config, strict: bool) -> Result<Option<String>> {
        let expected = names::expected(config);
        let mut missing = expected
            .iter()
            .filter(|(name, need)| *need == Need::Required && !self.entries.contains_key(name));
        if let Some((name, _)) = missing.next() {
            let more = match missing.count() {
                0 => String::new(),
                n => format!(" (and {n} more)"),
            };
            return Err(Error::checkpoint(
                &self.source,
                format!(
                    "tensor {} is missing{more}{}",
                    self.name_in_file(name),
                    self.missing_cause(name)
                ),
            ));
        }
        let needs: HashMap<&str, Need> = expected.iter().map(|(n, need)| (n.as_str(), *need)).collect();
        let layout = self.layout;
        let mut unused = std::mem::take(&mut self.unknown);
        // Tied copies go too: the model uses `shared` for them.
        self.entries.retain(|name, _| match needs.get(name.as_str()) {
            Some(Need::Required | Need::Derived) => true,
            Some(Need::Tied) => false,
            None => {
                unused.push(name_in(layout, name));
                false
            }
        });
        if unused.is_empty() {
            return Ok(None);
        }
        unused.sort();
        let detail = format!(
            "{} not used by the model config.json describes ({}): check that config.json belongs \
             to these weights",
            match unused.len() {
                1 => "1 tensor is".to_string(),
                n => format!("{n} tensors are"),
            },
            match unused.len() {
                n @ 4.. => format!("{} and {} more", unused[..3].join(", "), n - 3),
                _ => unused.join(", "),
            }
        );
        if strict {
            return Err(Error::checkpoint(
                &self.source,
                format!("{detail}; strict loading refuses them"),
            ));
        }
        Ok(Some(format!("{}: {detail}", self.source.display())))
    }

    /// Why the required tensor `name` (remote name) is likely missing, and what to do.
    fn missing_cause(&self, name: &str) -> &'static str {
        if let Some(stem) = name.strip_suffix(".bias") {
            if self.entries.contains_key(&format!("{stem}.weight")) {
                return ", though its weight is there: a conversion that dropped biases, or a config.json \
                        from another model; convert or download the model again";
            }
        }
        // The innermost numbered part (stage, block, layer) the name is in: when the file has
        // nothing of it, the config describes more of them than the weights hold.
        let parts: Vec<&str> = name.split('.').collect();
        if let Some(i) = parts.iter().rposition(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            let module = format!("{}.", parts[..=i].join("."));
            if !self.entries.keys().any(|k| k.starts_with(&module)) {
                return ": the file does not match config.json, which describes more layers than it holds; \
                        use the config.json that came with the weights";
            }
        }
        ": an incomplete download or conversion, or a config.json from another model; download the \
         model folder again"
    }

    /// Remote-layout `name` as the file names it.
    fn name_in_file(&self, name: &str) -> String {
        name_in(self.layout, name)
    }

    /// The pages of the tensors handed out in place since the last call, in the order they
    /// were asked for (the order the model runs them).
    pub fn take_in_place(&self) -> InPlacePages {
        let ranges = std::mem::replace(
            &mut *self.in_place.lock().unwrap_or_else(|e| e.into_inner()),
            vec![Vec::new(); self.maps.len()],
        );
        let files = self
            .maps
            .iter()
            .zip(ranges)
            .filter_map(|(map, ranges)| Some((map.clone()?, ranges)))
            .filter(|(_, ranges)| !ranges.is_empty())
            .collect();
        InPlacePages { files }
    }

    /// The file the tensors come from (the first shard), for messages.
    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// Tensor `name` (remote-layout name) and its shape, in place in the file's mapping, when the
    /// file stores it in f32 as it is used (not the native projector, which is transposed).
    pub fn mapped_f32(&self, name: &str) -> Option<(MappedF32, &[usize])> {
        let Some(Entry::Stored {
            file,
            offset,
            dtype: DType::F32,
            shape,
        }) = self.entries.get(name)
        else {
            return None;
        };
        if self.transposed_on_read(name) {
            return None;
        }
        let map = self.maps[*file].as_ref()?;
        let start = *offset as usize;
        let len: usize = shape.iter().product();
        // Mappings start on a page; tensor data in a safetensors file is only packed, not aligned.
        start.is_multiple_of(std::mem::align_of::<f32>()).then(|| {
            let bytes = start..start + len * std::mem::size_of::<f32>();
            self.in_place.lock().unwrap_or_else(|e| e.into_inner())[*file].push(bytes);
            #[cfg(test)]
            self.read.lock().unwrap().insert(name.to_string());
            (MappedF32::new(map.clone(), start, len), shape.as_slice())
        })
    }

    /// The native projector is a Linear (`[out, in]`); the remote one, which the model reads, a
    /// matrix (`[in, out]`).
    fn transposed_on_read(&self, name: &str) -> bool {
        self.layout == Layout::Native && names::transposed(name)
    }

    /// The remote-layout names of the tensors the files hold (after [`check`](Self::check):
    /// those the model uses), sorted: the names a checkpoint written back must have.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether the file has tensor `name` (remote-layout name).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Reads tensor `name` (remote-layout name) as `dtype`.
    pub(crate) fn read(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        #[cfg(test)]
        self.read.lock().unwrap().insert(name.to_string());
        let t = match entry {
            Entry::Loaded(t) => t.clone(),
            Entry::Stored {
                file,
                offset,
                dtype,
                shape,
            } => safetensors::read(&self.files[*file], *offset, *dtype, shape).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: tensor {name}: {e} (truncated download?)",
                    self.paths[*file].display()
                ))
            })?,
        };
        let t = if self.transposed_on_read(name) {
            t.t()?.contiguous()?
        } else {
            t
        };
        t.to_dtype(dtype)
    }
}

/// Remote-layout `name` as a file of `layout` names it.
fn name_in(layout: Layout, name: &str) -> String {
    match layout {
        Layout::Remote => name.to_string(),
        Layout::Native => names::remote_to_native(name).unwrap_or_else(|| name.to_string()),
    }
}

impl candle_nn::var_builder::SimpleBackend for &Checkpoint {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.read(name, dtype)?;
        if t.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("tensor {name} has the wrong shape"),
                expected: shape,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages to populate are the byte ranges of the tensors handed out in place, in the
    /// order they were asked for, once each.
    #[test]
    fn in_place_pages_are_the_tensors_handed_out() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tempdir"), e))?;
        let path = dir.path().join("model.safetensors");
        let dev = Device::Cpu;
        let tensors: HashMap<String, Tensor> = [
            ("vision_tower.a.weight", Tensor::ones((3, 5), DType::F32, &dev)?),
            ("vision_tower.b.weight", Tensor::ones((7, 2), DType::F32, &dev)?),
            ("vision_tower.c.weight", Tensor::ones(4, DType::F32, &dev)?),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        candle_core::safetensors::save(&tensors, &path)?;
        // Where each tensor's bytes lie in the file, from its header.
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let extent = |name: &str| {
            let o = &header[name]["data_offsets"];
            let at = |i: usize| 8 + header_len + o[i].as_u64().unwrap() as usize;
            at(0)..at(1)
        };
        let checkpoint = Checkpoint::open(&WeightFiles::single(path))?;
        for name in ["vision_tower.b.weight", "vision_tower.a.weight"] {
            assert!(checkpoint.mapped_f32(name).is_some(), "{name} is not mapped");
        }
        let pages = checkpoint.take_in_place();
        assert_eq!(pages.files.len(), 1);
        assert_eq!(
            pages.files[0].1,
            [extent("vision_tower.b.weight"), extent("vision_tower.a.weight")]
        );
        assert!(checkpoint.take_in_place().files.is_empty());
        Ok(())
    }

    /// The name table and the model agree: after the check, the model reads every tensor the
    /// checkpoint still offers (and reading one it does not offer would fail the load).
    #[test]
    fn the_model_reads_every_tensor_the_check_keeps() -> Result<()> {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        for fixture in [
            "native_f32",
            "native_bf16_sharded",
            "native_variant_f16",
            "remote_f32",
            "remote_f16_bin",
        ] {
            let dir = models.join(fixture);
            let config = Florence2Config::from_file(&dir.join("config.json"))?;
            let mut checkpoint = Checkpoint::open(&WeightFiles::discover(&dir)?)?;
            assert_eq!(checkpoint.check(&config, true)?, None, "{fixture}");
            let mut kept: Vec<&String> = checkpoint.entries.keys().collect();
            crate::model::Florence2::build(config.clone(), &checkpoint, &crate::LoadOptions::default())?;
            let read = checkpoint.read.lock().unwrap().clone();
            kept.retain(|n| !read.contains(*n));
            assert!(kept.is_empty(), "{fixture}: never read: {kept:?}");
        }
        Ok(())
    }
}
