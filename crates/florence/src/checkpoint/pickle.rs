//! PyTorch zip checkpoints (`pytorch_model.bin`): their tensors, and the names of the entries
//! that are not tensors. Only the pickle opcodes are interpreted; no code is executed.

use std::collections::HashSet;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::Tensor;

/// The contents of a PyTorch checkpoint's state dict.
pub(super) struct StateDict {
    pub tensors: Vec<(String, Tensor)>,
    /// Entries that are not tensors (candle's reader passes over them), which no model uses.
    pub others: Vec<String>,
}

/// Reads the state dict of `path`. Errors are messages about the file.
pub(super) fn read(path: &Path) -> Result<StateDict, String> {
    let tensors = candle_core::pickle::read_all(path).map_err(|e| e.to_string())?;
    let names: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    // `_metadata` is PyTorch's own record of module versions, which `load_state_dict` takes out.
    let others = keys(path)?
        .into_iter()
        .filter(|k| !names.contains(k.as_str()) && k != "_metadata")
        .collect();
    Ok(StateDict { tensors, others })
}

/// The string keys of the state dict in `path`, found as candle's reader finds its tensors: the
/// dict in each `data.pkl`, or the state of a pickled TorchScript module.
fn keys(path: &Path) -> Result<Vec<String>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.map(|n| n.ends_with("data.pkl").then(|| n.into_owned())).transpose())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for name in pickles {
        let entry = zip.by_name(&name).map_err(|e| e.to_string())?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::BufReader::new(entry))
            .map_err(|e| e.to_string())?;
        let obj = match stack.finalize().map_err(|e| e.to_string())? {
            Object::Build { callable, args } => match *callable {
                Object::Reduce { callable, .. } if is_torch_module(&callable) => *args,
                _ => continue,
            },
            obj => obj,
        };
        if let Object::Dict(entries) = obj {
            keys.extend(entries.into_iter().filter_map(|(k, _)| k.unicode().ok()));
        }
    }
    Ok(keys)
}

fn is_torch_module(obj: &Object) -> bool {
    matches!(obj, Object::Class { module_name, class_name } if module_name == "__torch__" && class_name == "Module")
}
