//! Finding and reading the weight files of a model directory, in either checkpoint layout.
//!
//! Weights are returned under Microsoft's remote-code names (spec §9), which the model modules
//! mirror with `vb.pp(..)`; native-layout names are translated on load, so one model
//! implementation serves both layouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::Layout;
use crate::error::{Error, Result};

/// The weight files of a model directory.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the weights: `model.safetensors`, a sharded safetensors index, or `pytorch_model.bin`
    /// (also sharded), preferring safetensors.
    pub fn discover(dir: &Path) -> Result<Self> {
        for index in ["model.safetensors.index.json", "pytorch_model.bin.index.json"] {
            let path = dir.join(index);
            if path.is_file() {
                return Self::from_index(dir, &path);
            }
        }
        for single in ["model.safetensors", "pytorch_model.bin"] {
            let path = dir.join(single);
            if path.is_file() {
                return Ok(Self { files: vec![path] });
            }
        }
        Err(Error::checkpoint(
            dir,
            "no model weights found (expected model.safetensors, model.safetensors.index.json or \
             pytorch_model.bin); download the complete model folder",
        ))
    }

    fn from_index(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(index, "has no \"weight_map\" object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let name = shard
                .as_str()
                .ok_or_else(|| Error::checkpoint(index, "weight_map values must be file names"))?;
            let path = dir.join(name);
            if !files.contains(&path) {
                if !path.is_file() {
                    return Err(Error::checkpoint(
                        &path,
                        format!("shard listed in {} is missing; download it", index.display()),
                    ));
                }
                files.push(path);
            }
        }
        files.sort();
        Ok(Self { files })
    }
}

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
    paths: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    /// Per file, the byte ranges handed out by [`mapped_f32`](Self::mapped_f32), in order.
    in_place: std::sync::Mutex<Vec<Vec<std::ops::Range<usize>>>>,
    /// The layout the tensors were stored in.
    pub layout: Layout,
}

impl Checkpoint {
    /// Indexes the tensors of `weights` (reading only safetensors headers, or whole pickles).
    pub fn open(weights: &WeightFiles) -> Result<Self> {
        let mut raw: Vec<(String, Entry)> = Vec::new();
        let mut files = Vec::new();
        let mut maps = Vec::new();
        for (i, path) in weights.files.iter().enumerate() {
            let is_pickle = path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
            if is_pickle {
                // candle's reader only interprets the pickle opcodes; no code is executed.
                let tensors = candle_core::pickle::read_all(path)
                    .map_err(|e| Error::checkpoint(path, format!("cannot read PyTorch checkpoint: {e}")))?;
                raw.extend(tensors.into_iter().map(|(n, t)| (n, Entry::Loaded(t))));
                files.push(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
                maps.push(None);
            } else {
                let (file, index) = index_safetensors(path, i)
                    .map_err(|m| Error::checkpoint(path, format!("cannot read safetensors: {m}")))?;
                raw.extend(index);
                // SAFETY: the mapping is only read; a file changed underneath it is documented
                // as unsupported. Where mapping fails, tensors are read with `pread` instead.
                maps.push(unsafe { memmap2::Mmap::map(&file) }.ok().map(Arc::new));
                files.push(file);
            }
        }
        let first = &weights.files[0];
        let layout = detect_layout(raw.iter().map(|(n, _)| n)).ok_or_else(|| {
            Error::checkpoint(
                first,
                "contains no Florence-2 weights (no vision_tower.* or language_model.* tensors)",
            )
        })?;
        let entries = raw
            .into_iter()
            .map(|(name, e)| match layout {
                Layout::Remote => (name, e),
                Layout::Native => (native_to_remote(&name), e),
            })
            .collect();
        Ok(Self {
            in_place: std::sync::Mutex::new(vec![Vec::new(); files.len()]),
            files,
            maps,
            paths: weights.files.clone(),
            entries,
            layout,
        })
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
            (
                MappedF32 {
                    map: map.clone(),
                    start,
                    len,
                },
                shape.as_slice(),
            )
        })
    }

    /// The native projector is a Linear (`[out, in]`); the remote one, which the model reads, a
    /// matrix (`[in, out]`).
    fn transposed_on_read(&self, name: &str) -> bool {
        self.layout == Layout::Native && name == "image_projection"
    }

    /// Reads tensor `name` (remote-layout name) as `dtype`.
    fn read(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let t = match entry {
            Entry::Loaded(t) => t.clone(),
            Entry::Stored {
                file,
                offset,
                dtype,
                shape,
            } => {
                let f = &self.files[*file];
                let read = |e: std::io::Error| {
                    candle_core::Error::Msg(format!(
                        "{}: tensor {name}: {e} (truncated download?)",
                        self.paths[*file].display()
                    ))
                };
                match dtype {
                    DType::F32 => read_vec::<f32>(f, *offset, shape).map_err(read)?,
                    DType::F16 => read_vec::<half::f16>(f, *offset, shape).map_err(read)?,
                    DType::BF16 => read_vec::<half::bf16>(f, *offset, shape).map_err(read)?,
                    _ => read_vec::<i64>(f, *offset, shape).map_err(read)?,
                }
            }
        };
        let t = if self.transposed_on_read(name) {
            t.t()?.contiguous()?
        } else {
            t
        };
        t.to_dtype(dtype)
    }
}

/// Pages of a checkpoint's mapping that tensors used in place lie on.
#[derive(Debug, Default)]
pub struct InPlacePages {
    // Read only where pages can be populated.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    files: Vec<(Arc<memmap2::Mmap>, Vec<std::ops::Range<usize>>)>,
}

impl InPlacePages {
    /// Maps the pages on a thread of its own, in order, so that the first pass over the weights
    /// finds them mapped instead of taking a page fault per 4 KB. Measured on a 2-core VM, for
    /// 1 GB in the page cache: 155-760 ms touched page by page, 90-170 ms populated; for base's
    /// language model, the first run's mean decoder step (8 tokens) went from 23.0-24.1 ms to
    /// 15.4-18.5 ms, about the warm step's time.
    ///
    /// Where the system cannot populate (not Linux, or older than 5.14) the pages fault in as
    /// before.
    pub fn populate_in_background(self) {
        #[cfg(target_os = "linux")]
        if !self.files.is_empty() {
            std::thread::spawn(move || {
                const PAGE: usize = 4096;
                for (map, ranges) in self.files {
                    for r in ranges {
                        // Advice starts on a page; an edge page shared with a neighbour is
                        // populated twice, harmlessly.
                        let start = r.start / PAGE * PAGE;
                        // Failure only means the pages fault in when first read.
                        let _ = map.advise_range(memmap2::Advice::PopulateRead, start, r.end - start);
                    }
                }
            });
        }
    }
}

/// The f32 values of one tensor in the mapping of its checkpoint file: loading copies nothing,
/// and the page cache holds the weights once for every process that maps the same file.
#[derive(Clone)]
pub struct MappedF32 {
    map: Arc<memmap2::Mmap>,
    /// Byte offset of the first value.
    start: usize,
    len: usize,
}

impl AsRef<[f32]> for MappedF32 {
    fn as_ref(&self) -> &[f32] {
        // The extent was checked against the file and the start for alignment on creation.
        bytemuck::cast_slice(&self.map[self.start..self.start + self.len * std::mem::size_of::<f32>()])
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

/// Reads `shape`'s worth of little-endian `T`s at `offset` straight into the tensor's buffer.
fn read_vec<T: bytemuck::Pod + candle_core::WithDType>(
    f: &std::fs::File,
    offset: u64,
    shape: &[usize],
) -> std::io::Result<Tensor> {
    const _: () = assert!(cfg!(target_endian = "little"), "safetensors data is little-endian");
    use rayon::prelude::*;
    // In pieces on all threads: copying out of the page cache, and faulting in the fresh
    // buffer's pages, are most of a load's time.
    const PIECE: usize = 8 << 20;
    // The data starts on a cache line (the tensor is a view past the first `skip` elements), so
    // that the decoding-step kernels' loads of weight rows never straddle two lines.
    let n: usize = shape.iter().product();
    let pad = 64 / std::mem::size_of::<T>();
    // Zeroed by the allocator, which takes a buffer this size from memory the process has not
    // touched yet: its pages are populated just before they are read into.
    let mut v: Vec<T> = bytemuck::allocation::zeroed_vec(n + pad);
    let skip = v.as_ptr().align_offset(64).min(pad);
    bytemuck::cast_slice_mut::<T, u8>(&mut v[skip..skip + n])
        .par_chunks_mut(PIECE)
        .enumerate()
        .try_for_each(|(i, piece)| {
            prefault(piece);
            read_exact_at(f, piece, offset + (i * PIECE) as u64)
        })?;
    let t = Tensor::from_vec(v, n + pad, &Device::Cpu).and_then(|t| t.narrow(0, skip, n)?.reshape(shape));
    t.map_err(std::io::Error::other)
}

/// Maps in all pages of `buf` with one call (Linux 5.14+) rather than one fault per 4 KB page
/// as the read reaches them: about 15% of a model load (measured, 8 interleaved runs).
fn prefault(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4 << 10;
        let start = buf.as_mut_ptr() as usize;
        let (a, b) = (start.next_multiple_of(PAGE), (start + buf.len()) / PAGE * PAGE);
        if b > a {
            // SAFETY: whole pages inside `buf`, which is writable; populating them changes no
            // contents. Older kernels reject the advice, which only loses the speed-up.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_POPULATE_WRITE) };
        }
    }
}

#[cfg(unix)]
fn read_exact_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(f: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Reads a safetensors header and checks every tensor's extent against the file.
fn index_safetensors(path: &Path, file: usize) -> std::result::Result<(std::fs::File, Vec<(String, Entry)>), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| format!("no header ({e})"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(format!(
            "header length {header_len} does not fit a {file_len}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| info.get(k).ok_or_else(|| format!("tensor {name} has no {k}"));
        let dtype = field("dtype")?.as_str().unwrap_or("").to_string();
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .ok_or_else(|| format!("tensor {name}: bad shape"))?
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| format!("tensor {name}: bad shape"))
            })
            .collect::<std::result::Result<_, _>>()?;
        let offsets = field("data_offsets")?
            .as_array()
            .ok_or_else(|| format!("tensor {name}: bad offsets"))?;
        let (begin, end) = match (
            offsets.first().and_then(|v| v.as_u64()),
            offsets.get(1).and_then(|v| v.as_u64()),
        ) {
            (Some(b), Some(e)) if b <= e && data_start + e <= file_len => (b, e),
            _ => {
                return Err(format!(
                    "tensor {name}: data offsets outside the file (truncated download?)"
                ))
            }
        };
        let (width, dtype) = match dtype.as_str() {
            "F32" => (4, DType::F32),
            "F16" => (2, DType::F16),
            "BF16" => (2, DType::BF16),
            "I64" => (8, DType::I64),
            other => return Err(format!("tensor {name}: unsupported dtype {other}")),
        };
        let elems: usize = shape.iter().product();
        if (end - begin) as usize != elems * width {
            return Err(format!(
                "tensor {name}: {} bytes for {elems} {dtype:?} values",
                end - begin
            ));
        }
        out.push((
            name,
            Entry::Stored {
                file,
                offset: data_start + begin,
                dtype,
                shape,
            },
        ));
    }
    Ok((f, out))
}

/// The layout a set of tensor names comes from.
pub fn detect_layout(names: impl IntoIterator<Item = impl AsRef<str>>) -> Option<Layout> {
    for n in names {
        let n = n.as_ref();
        if n.starts_with("model.vision_tower.") || n.starts_with("model.language_model.") {
            return Some(Layout::Native);
        }
        if n.starts_with("vision_tower.") || n.starts_with("language_model.") {
            return Some(Layout::Remote);
        }
    }
    None
}

/// Translates a native-layout tensor name to its remote-layout name (spec §9).
fn native_to_remote(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return format!("language_model.model.{rest}");
    }
    if name == "lm_head.weight" {
        return "language_model.lm_head.weight".into();
    }
    if let Some(rest) = name.strip_prefix("model.multi_modal_projector.") {
        return match rest {
            "image_projection.weight" => "image_projection".into(),
            _ => rest.replacen("image_position_embed.", "image_pos_embed.", 1),
        };
    }
    let Some(rest) = name.strip_prefix("model.vision_tower.") else {
        return name.to_string();
    };
    // convs.{s}.conv.* -> convs.{s}.proj.*
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.first() == Some(&"convs") && parts.get(2) == Some(&"conv") {
        return format!("vision_tower.convs.{}.proj.{}", parts[1], parts[3..].join("."));
    }
    // blocks.{s}.{b}.{spatial_block|channel_block}.{sub}...
    if parts.first() == Some(&"blocks") && parts.len() >= 6 {
        let block = parts[3];
        let attn = if block == "spatial_block" {
            "window_attn"
        } else {
            "channel_attn"
        };
        let tail = parts[5..].join(".");
        let sub = match parts[4] {
            "conv1" | "conv2" => format!("{}.fn.dw.{tail}", parts[4]),
            "norm1" => format!("{attn}.norm.{tail}"),
            "norm2" => format!("ffn.norm.{tail}"),
            "window_attn" | "channel_attn" => format!("{attn}.fn.{tail}"),
            "ffn" => format!("ffn.fn.net.{tail}"),
            other => format!("{other}.{tail}"),
        };
        return format!("vision_tower.blocks.{}.{}.{block}.{sub}", parts[1], parts[2]);
    }
    format!("vision_tower.{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every native key of a real Florence-2-base file maps onto a key of the remote layout.
    #[test]
    fn native_keys_map_onto_remote_keys() {
        let dir = crate::testdata_dir();
        let read = |f: &str| -> Vec<String> {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
                .lines()
                .map(|l| l.split('\t').next().unwrap().to_string())
                .collect()
        };
        let remote = read("keys_remote_layout.txt");
        let native = read("keys_native_layout.txt");
        assert_eq!(detect_layout(&remote), Some(Layout::Remote));
        assert_eq!(detect_layout(&native), Some(Layout::Native));
        let mapped: std::collections::HashSet<String> = native.iter().map(|n| native_to_remote(n)).collect();
        for m in &mapped {
            assert!(remote.contains(m), "{m} is not a remote key");
        }
        // The remote file has exactly the tied and the dropped tensors on top.
        let mut extra: Vec<&String> = remote.iter().filter(|r| !mapped.contains(*r)).collect();
        extra.sort();
        assert_eq!(
            extra,
            [
                "language_model.final_logits_bias",
                "language_model.lm_head.weight",
                "language_model.model.decoder.embed_tokens.weight",
                "language_model.model.encoder.embed_tokens.weight",
            ]
        );
    }

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
        let checkpoint = Checkpoint::open(&WeightFiles { files: vec![path] })?;
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
}
