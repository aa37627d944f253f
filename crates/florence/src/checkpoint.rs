//! Finding and reading the weight files of a model directory, in either checkpoint layout.
//!
//! Weights are returned under Microsoft's remote-code names (spec §9), which the model modules
//! mirror with `vb.pp(..)`; native-layout names are translated on load, so one model
//! implementation serves both layouts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(index, format!("not valid JSON: {e}")))?;
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

    /// Reads every tensor, converted to `dtype`, keyed by its name in the file.
    pub fn read_all(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for path in &self.files {
            let is_pickle = path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
            let tensors: Vec<(String, Tensor)> = if is_pickle {
                // candle's reader only interprets the pickle opcodes; no code is executed.
                candle_core::pickle::read_all(path).map_err(|e| {
                    Error::checkpoint(path, format!("cannot read PyTorch checkpoint: {e}"))
                })?
            } else {
                read_safetensors(path).map_err(|m| Error::checkpoint(path, format!("cannot read safetensors: {m}")))?
            };
            for (name, t) in tensors {
                let t = if t.dtype() == dtype { t } else { t.to_dtype(dtype)? };
                out.insert(name, t);
            }
        }
        Ok(out)
    }
}

/// Reads a safetensors file tensor by tensor, straight into each tensor's own buffer: neither
/// the whole file nor a memory map is held, so peak memory is the weights and no more.
fn read_safetensors(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| format!("no header ({e})"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(format!("header length {header_len} does not fit a {file_len}-byte file"));
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
            .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(|| format!("tensor {name}: bad shape")))
            .collect::<std::result::Result<_, _>>()?;
        let offsets = field("data_offsets")?.as_array().ok_or_else(|| format!("tensor {name}: bad offsets"))?;
        let (begin, end) = match (offsets.first().and_then(|v| v.as_u64()), offsets.get(1).and_then(|v| v.as_u64())) {
            (Some(b), Some(e)) if b <= e && data_start + e <= file_len => (b, e),
            _ => return Err(format!("tensor {name}: data offsets outside the file (truncated download?)")),
        };
        let (width, candle_dtype) = match dtype.as_str() {
            "F32" => (4, DType::F32),
            "F16" => (2, DType::F16),
            "BF16" => (2, DType::BF16),
            "I64" => (8, DType::I64),
            other => return Err(format!("tensor {name}: unsupported dtype {other}")),
        };
        let elems: usize = shape.iter().product();
        if (end - begin) as usize != elems * width {
            return Err(format!("tensor {name}: {} bytes for {elems} {dtype} values", end - begin));
        }
        let mut bytes = vec![0u8; elems * width];
        f.seek(SeekFrom::Start(data_start + begin)).map_err(|e| e.to_string())?;
        f.read_exact(&mut bytes).map_err(|e| format!("tensor {name}: {e} (truncated file?)"))?;
        let t = Tensor::from_raw_buffer(&bytes, candle_dtype, &shape, &Device::Cpu).map_err(|e| e.to_string())?;
        out.push((name, t));
    }
    Ok(out)
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
        let attn = if block == "spatial_block" { "window_attn" } else { "channel_attn" };
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

/// Reads a checkpoint and returns its tensors under remote-layout names, with the tied
/// embeddings filled in, plus the layout it was stored in.
pub fn load_remote_named(
    files: &WeightFiles,
    dtype: DType,
) -> Result<(HashMap<String, Tensor>, Layout)> {
    let raw = files.read_all(dtype)?;
    let first = &files.files[0];
    let layout = detect_layout(raw.keys()).ok_or_else(|| {
        Error::checkpoint(
            first,
            "contains no Florence-2 weights (no vision_tower.* or language_model.* tensors)",
        )
    })?;
    let mut out: HashMap<String, Tensor> = HashMap::with_capacity(raw.len() + 3);
    for (name, t) in raw {
        match layout {
            Layout::Remote => {
                out.insert(name, t);
            }
            Layout::Native => {
                let remote = native_to_remote(&name);
                // The native projector is a Linear ([out, in]); the remote one a matrix ([in, out]).
                let t = if remote == "image_projection" { t.t()?.contiguous()? } else { t };
                out.insert(remote, t);
            }
        }
    }
    let shared_name = "language_model.model.shared.weight";
    let shared = out.get(shared_name).cloned().ok_or_else(|| {
        Error::checkpoint(first, format!("missing tensor {shared_name} (the token embeddings)"))
    })?;
    for tied in [
        "language_model.model.encoder.embed_tokens.weight",
        "language_model.model.decoder.embed_tokens.weight",
        "language_model.lm_head.weight",
    ] {
        out.entry(tied.to_string()).or_insert_with(|| shared.clone());
    }
    Ok((out, layout))
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
        let mapped: std::collections::HashSet<String> =
            native.iter().map(|n| native_to_remote(n)).collect();
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
}
