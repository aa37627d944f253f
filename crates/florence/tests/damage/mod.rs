//! Damaging a copy of a fixture model in one place, as a user's folder may be damaged: a tensor
//! deleted from or added to its weights, an edited `config.json`, a `.bin` with a non-tensor entry.
//! Shared by the library's and the CLI's checkpoint tests.

#![allow(dead_code)]

use std::path::Path;

use serde_json::{Map, Value};

/// The header and the data of a safetensors file.
struct Safetensors {
    header: Map<String, Value>,
    data: Vec<u8>,
}

impl Safetensors {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        Self {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    }

    /// Writes the tensors packed in header order, the header padded to 8 bytes as the
    /// safetensors writer does.
    fn write(&self, path: &Path) {
        let mut header = Map::new();
        let mut data = Vec::new();
        for (name, info) in &self.header {
            if name == "__metadata__" {
                header.insert(name.clone(), info.clone());
                continue;
            }
            let o = &info["data_offsets"];
            let (b, e) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            let mut info = info.clone();
            info["data_offsets"] = serde_json::json!([data.len(), data.len() + e - b]);
            data.extend_from_slice(&self.data[b..e]);
            header.insert(name.clone(), info);
        }
        let mut text = serde_json::to_vec(&header).unwrap();
        text.resize(text.len().next_multiple_of(8), b' ');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }
}

/// The safetensors files of a model folder.
fn safetensors_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The names of the tensors in the model folder's safetensors files.
pub fn tensor_names(dir: &Path) -> Vec<String> {
    safetensors_files(dir)
        .iter()
        .flat_map(|f| Safetensors::read(f).header.into_iter().map(|(n, _)| n))
        .filter(|n| n != "__metadata__")
        .collect()
}

/// Deletes tensor `name` from the safetensors file that holds it (and from the shard index).
pub fn remove_tensor(dir: &Path, name: &str) {
    let file = safetensors_files(dir)
        .into_iter()
        .find(|f| Safetensors::read(f).header.contains_key(name))
        .unwrap_or_else(|| panic!("no tensor {name} in {}", dir.display()));
    let mut st = Safetensors::read(&file);
    st.header.remove(name);
    st.write(&file);
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        edit_json(&index, |j| {
            j["weight_map"].as_object_mut().unwrap().remove(name);
        });
    }
}

/// Adds an f32 tensor `name` of shape `[n]` (values 0, 1, ...) to the folder's first
/// safetensors file.
pub fn add_tensor(dir: &Path, name: &str, n: usize) {
    let file = &safetensors_files(dir)[0];
    let mut st = Safetensors::read(file);
    let begin = st.data.len();
    st.data.extend((0..n).flat_map(|i| (i as f32).to_le_bytes()));
    st.header.insert(
        name.to_string(),
        serde_json::json!({"dtype": "F32", "shape": [n], "data_offsets": [begin, st.data.len()]}),
    );
    st.write(file);
}

/// Adds a copy of tensor `from` under the name `to`.
pub fn copy_tensor(dir: &Path, from: &str, to: &str) {
    let file = safetensors_files(dir)
        .into_iter()
        .find(|f| Safetensors::read(f).header.contains_key(from))
        .unwrap();
    let mut st = Safetensors::read(&file);
    let info = st.header[from].clone();
    st.header.insert(to.to_string(), info);
    st.write(&file);
}

/// Rewrites the JSON file `path` with `f`.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut j);
    std::fs::write(path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
}

/// Sets `text_config.{key}` of the folder's `config.json`.
pub fn set_text_config(dir: &Path, key: &str, value: Value) {
    edit_json(&dir.join("config.json"), |j| j["text_config"][key] = value);
}

/// Adds the entry `key: 7` (an int, not a tensor) to the state dict pickled in the folder's
/// `pytorch_model.bin`. The pickle ends with the dict on the stack and STOP; the entry is set
/// just before STOP (BINUNICODE key, BININT1 7, SETITEM).
pub fn add_bin_entry(dir: &Path, key: &str) {
    use std::io::{Read, Write};
    let path = dir.join("pytorch_model.bin");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    let mut entries = Vec::new();
    for name in names {
        let mut bytes = Vec::new();
        zip.by_name(&name).unwrap().read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            assert_eq!(bytes.pop(), Some(b'.'), "a pickle ends with STOP");
            bytes.push(b'X');
            bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
            bytes.extend_from_slice(key.as_bytes());
            bytes.extend_from_slice(&[b'K', 7, b's', b'.']);
        }
        entries.push((name, bytes));
    }
    let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        out.start_file(name, options).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap();
}
