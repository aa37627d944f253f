//! Safetensors files: the header's index of tensors, checked against the file, and reading one
//! tensor's data with positioned reads.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pages::prefault;
use super::Entry;

/// Reads the header of the safetensors file `path` (number `file` of its checkpoint) and checks
/// every tensor's extent against the file. Errors are messages about the file.
pub(super) fn index(path: &Path, file: usize) -> Result<(std::fs::File, Vec<(String, Entry)>), String> {
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
            .collect::<Result<_, _>>()?;
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

/// Reads the tensor of `dtype` and `shape` stored at `offset` of `f`.
pub(super) fn read(f: &std::fs::File, offset: u64, dtype: DType, shape: &[usize]) -> std::io::Result<Tensor> {
    match dtype {
        DType::F32 => read_vec::<f32>(f, offset, shape),
        DType::F16 => read_vec::<half::f16>(f, offset, shape),
        DType::BF16 => read_vec::<half::bf16>(f, offset, shape),
        _ => read_vec::<i64>(f, offset, shape),
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
