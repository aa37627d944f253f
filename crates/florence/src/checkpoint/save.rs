//! Writing weights back: in the layout and under the names the model came in, atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::names;
use crate::config::Layout;
use crate::error::{Error, Result};
use crate::pipeline::write_atomic;

/// `tensors` (remote-layout names, as the model reads them) named and shaped as a file of
/// `layout` has them: native names, and the projector as a Linear's `[out, in]`.
pub fn in_layout(layout: Layout, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    match layout {
        Layout::Remote => Ok(tensors),
        Layout::Native => tensors
            .into_iter()
            .map(|(name, t)| {
                let native = names::remote_to_native(&name)
                    .ok_or_else(|| Error::internal(format!("{name} has no name in the native layout")))?;
                let t = if names::transposed(&name) {
                    t.t()?.contiguous()?
                } else {
                    t
                };
                Ok((native, t))
            })
            .collect(),
    }
}

/// Writes `tensors` to the safetensors file `path`, through a temporary file renamed into place,
/// with the `{"format": "pt"}` metadata transformers looks for.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = ::safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::output(format!("{}: cannot serialize the weights: {e}", path.display())))?;
    write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::checkpoint::{Checkpoint, WeightFiles};

    /// A native file written from remote names reads back under the remote names, values and
    /// the projector's orientation intact.
    #[test]
    fn native_layout_round_trips() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tempdir"), e))?;
        let path = dir.path().join("model.safetensors");
        let projection = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?;
        let norm = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let tensors = vec![
            ("image_projection".to_string(), projection.clone()),
            ("vision_tower.convs.0.norm.weight".to_string(), norm.clone()),
        ];
        let native = in_layout(Layout::Native, tensors)?;
        assert_eq!(native[0].0, "model.multi_modal_projector.image_projection.weight");
        assert_eq!(native[0].1.dims(), &[3, 2]);
        write_safetensors(&path, &native)?;
        let checkpoint = Checkpoint::open(&WeightFiles::single(path))?;
        assert_eq!(checkpoint.layout, Layout::Native);
        let back = checkpoint.read("image_projection", DType::F32)?;
        assert_eq!(back.to_vec2::<f32>()?, projection.to_vec2::<f32>()?);
        let back = checkpoint.read("vision_tower.convs.0.norm.weight", DType::F32)?;
        assert_eq!(back.to_vec1::<f32>()?, norm.to_vec1::<f32>()?);
        Ok(())
    }
}
