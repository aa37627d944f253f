//! `florence_rs`: the Rust Florence-2 library from Python. A model loads once; `caption` takes
//! numpy arrays, encoded bytes, paths or PIL images and returns, per image, the record
//! `florence caption --format jsonl` prints, computed with the GIL released on the model's own
//! thread pool.

mod inputs;

use std::path::PathBuf;
use std::sync::Arc;

use florence::pipeline::{generation_json, jsonl_record};
use florence::{ErrorKind, GenerationRequest, SamplingRequest, Task};
use pyo3::exceptions::{
    PyFileNotFoundError, PyNotImplementedError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use inputs::Input;

/// A library error as the Python exception that says the same: `ValueError` for the caller's
/// mistakes, `FileNotFoundError`/`OSError` for files, `RuntimeError` for bugs.
fn to_py(e: florence::Error) -> PyErr {
    let message = e.to_string();
    if let florence::Error::Io { source, .. } = &e {
        return match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            _ => PyOSError::new_err(message),
        };
    }
    match e.kind() {
        ErrorKind::Input => PyValueError::new_err(message),
        ErrorKind::Unsupported => PyNotImplementedError::new_err(message),
        ErrorKind::Environment => PyOSError::new_err(message),
        ErrorKind::Internal => PyRuntimeError::new_err(message),
    }
}

/// A Florence-2 model, loaded once.
///
/// model: a model folder (config.json, weights, tokenizer) or a Hugging Face id such as
///     "microsoft/Florence-2-large", taken from the Hugging Face cache or downloaded into it,
///     exactly as `florence caption --model`.
/// dtype: "f32" (exact: token for token like transformers) or "bf16" (bf16 weights and
///     compute: half the memory, faster, not exact).
/// quantize: None, or "q8" for int8 language-model weights.
/// threads: threads of the model's own pool (default: all cores).
/// device: "cpu", "cuda" (the first GPU), "cuda:N", or "auto" (a GPU when this build has CUDA
///     support and one is present); on a GPU the model runs on candle's CUDA backend, in dtype.
/// offline: never download (also HF_HUB_OFFLINE=1).
#[pyclass(frozen, module = "florence_rs")]
struct Florence {
    model: Arc<florence::Florence>,
    pool: rayon::ThreadPool,
    name: String,
    weights: String,
}

/// The generation keywords of `caption`, the CLI's flags by their Python names.
const GENERATION_KEYS: [&str; 9] = [
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
];

#[pymethods]
impl Florence {
    #[new]
    #[pyo3(signature = (model, *, dtype = "f32", quantize = None, threads = None, device = "cpu", offline = false))]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        dtype: &str,
        quantize: Option<&str>,
        threads: Option<usize>,
        device: &str,
        offline: bool,
    ) -> PyResult<Self> {
        let precision = florence::Precision::new(dtype, quantize).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let (device, _) = device
            .parse::<florence::device::DeviceChoice>()
            .and_then(|d| d.open())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .thread_name(|i| format!("florence-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the model's threads: {e}")))?;
        let name = model.to_string_lossy().into_owned();
        let options = florence::LoadOptions {
            device,
            ..precision.load_options()
        };
        let loaded = py
            .detach(|| {
                let offline = offline || florence::hub::offline_from_env();
                let dir = florence::hub::resolve(&name, offline, false)?;
                pool.install(|| florence::Florence::load(&dir, &options))
            })
            .map_err(|e| match e {
                // A folder that is not there: the file is missing, not the caller's syntax.
                florence::Error::Checkpoint { .. } if !model.exists() => PyFileNotFoundError::new_err(e.to_string()),
                e => to_py(e),
            })?;
        let weights = precision.describe();
        Ok(Self {
            model: Arc::new(loaded),
            pool,
            name,
            weights,
        })
    }

    /// Runs `task` on every image and returns one dict per image, the record `florence caption
    /// --format jsonl` prints: task, raw, ids, model, generation, and text (text tasks) or result
    /// (boxes, polygons...); path for images given by path.
    ///
    /// images: a list of numpy uint8 arrays (H, W, 3) RGB, (H, W) gray, (H, W, 4) RGBA or
    ///     (H, W, 2) gray+alpha (alpha is dropped, as PIL's convert("RGB") and the CLI do),
    ///     encoded image bytes (PNG, JPEG, WebP, GIF, BMP, TIFF; EXIF orientation applied),
    ///     str or os.PathLike paths, or PIL images.
    /// task: a task token (<CAPTION>, <MORE_DETAILED_CAPTION>, <OD>, ...) or a free prompt.
    /// text_input: the input of tasks that take one (a phrase, or a region <loc_..>x4).
    /// batch_size: images per forward pass (default 1).
    /// generation: num_beams, max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
    ///     top_p, min_p, seed: the CLI's flags.
    ///
    /// An image that cannot be read does not stop the others: its dict has "error" (the CLI's
    /// one-line reason) and no text. Bad settings raise ValueError.
    #[pyo3(signature = (images, *, task = "<CAPTION>", text_input = None, batch_size = None, **generation))]
    fn caption<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        task: &str,
        text_input: Option<&str>,
        batch_size: Option<usize>,
        generation: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let task = Task::new(task, text_input).map_err(to_py)?;
        let request = generation_request(generation)?;
        let settings = request.resolve(self.model.generation_config());
        settings.validate(self.model.max_decoder_positions()).map_err(to_py)?;
        let batch_size = match batch_size {
            Some(0) => return Err(PyValueError::new_err("batch_size must be at least 1")),
            n => n.unwrap_or(1),
        };
        let inputs: Vec<Input> = images
            .try_iter()
            .map_err(|_| PyTypeError::new_err("images must be a list of arrays, bytes, paths or PIL images"))?
            .map(|item| Input::from_python(&item?))
            .collect::<PyResult<_>>()?;
        let generation_value = generation_json(&settings, &self.weights);
        let records: Vec<String> = py
            .detach(|| {
                self.pool.install(|| {
                    let mut records = Vec::with_capacity(inputs.len());
                    for chunk in inputs.chunks(batch_size) {
                        let decoded: Vec<_> = chunk.iter().map(Input::decode).collect();
                        let ok: Vec<_> = decoded.iter().filter_map(|d| d.as_ref().ok()).cloned().collect();
                        let mut outputs = self.model.run(&ok, &task, &settings)?.into_iter();
                        for (input, image) in chunk.iter().zip(decoded) {
                            let record = match image {
                                Ok(_) => {
                                    let output = outputs.next().expect("one output per decoded image");
                                    let text = output.result.text().unwrap_or_default().to_string();
                                    jsonl_record(
                                        input.path(),
                                        &task.name,
                                        &output,
                                        &text,
                                        &self.name,
                                        &generation_value,
                                    )
                                }
                                Err(reason) => failed_record(input.path(), &task.name, &reason),
                            };
                            records.push(record.to_string());
                        }
                    }
                    Ok::<_, florence::Error>(records)
                })
            })
            .map_err(to_py)?;
        let loads = py.import("json")?.getattr("loads")?;
        let dicts = records
            .iter()
            .map(|r| loads.call1((r.as_str(),)))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, dicts)
    }

    /// The model as given: a folder or a hub id.
    #[getter]
    fn model(&self) -> &str {
        &self.name
    }

    fn __repr__(&self) -> String {
        format!("Florence({:?}, weights={:?})", self.name, self.weights)
    }
}

/// The record of an image that could not be read.
fn failed_record(path: Option<&str>, task: &str, reason: &str) -> serde_json::Value {
    let mut record = serde_json::json!({"task": task, "error": reason});
    if let Some(path) = path {
        record["path"] = path.into();
    }
    record
}

/// The generation keywords as a request over the model's settings; unknown ones are refused.
fn generation_request(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<GenerationRequest> {
    let mut request = GenerationRequest::default();
    let Some(kwargs) = kwargs else { return Ok(request) };
    for key in kwargs.keys() {
        let key: String = key.extract()?;
        if !GENERATION_KEYS.contains(&key.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "caption() got an unexpected keyword '{key}'; the generation keywords are {}",
                GENERATION_KEYS.join(", ")
            )));
        }
    }
    let get = |name: &str| kwargs.get_item(name).ok().flatten().filter(|v| !v.is_none());
    fn value<'py, T: for<'a> FromPyObject<'a, 'py>>(v: Option<Bound<'py, PyAny>>, name: &str) -> PyResult<Option<T>> {
        v.map(|v| {
            v.extract::<T>()
                .map_err(|_| PyValueError::new_err(format!("{name} has the wrong type: {v}")))
        })
        .transpose()
    }
    request.num_beams = value(get("num_beams"), "num_beams")?;
    request.max_new_tokens = value(get("max_new_tokens"), "max_new_tokens")?;
    request.min_new_tokens = value(get("min_new_tokens"), "min_new_tokens")?;
    let sampling = SamplingRequest {
        temperature: value(get("temperature"), "temperature")?,
        top_k: value(get("top_k"), "top_k")?,
        top_p: value(get("top_p"), "top_p")?,
        min_p: value(get("min_p"), "min_p")?,
        seed: value(get("seed"), "seed")?.unwrap_or(0),
    };
    let do_sample: bool = value(get("do_sample"), "do_sample")?.unwrap_or(false);
    if !do_sample {
        for (name, set) in [
            ("temperature", sampling.temperature.is_some()),
            ("top_k", sampling.top_k.is_some()),
            ("top_p", sampling.top_p.is_some()),
            ("min_p", sampling.min_p.is_some()),
        ] {
            if set {
                return Err(PyValueError::new_err(format!("{name} needs do_sample=True")));
            }
        }
    }
    request.sampling = do_sample.then_some(sampling);
    Ok(request)
}

/// Florence-2 captioning from Rust.
#[pymodule]
fn _florence_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Florence>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
