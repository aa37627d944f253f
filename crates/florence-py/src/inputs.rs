//! What `caption` accepts as an image, taken from Python while holding the GIL and decoded
//! without it.

use std::path::PathBuf;

use florence::preprocess::{decode_image, load_image_with, rgb_from_pixels, DecodeOptions};
use florence::RgbImage;
use numpy::{PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

/// One image as given.
pub enum Input {
    /// Interleaved 8-bit pixels.
    Pixels {
        width: u32,
        height: u32,
        channels: usize,
        data: Vec<u8>,
    },
    /// An encoded file's bytes.
    Bytes(Vec<u8>),
    /// A file, by the path as given.
    Path(String),
    /// Something that is no image, and why.
    Invalid(String),
}

/// PIL modes whose pixels numpy gives as uint8 without conversion.
const PIL_MODES: [&str; 4] = ["RGB", "L", "RGBA", "LA"];

impl Input {
    /// Takes `obj` apart: an array, bytes, a path (`str` or `os.PathLike`) or a PIL image.
    pub fn from_python(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(Self::Bytes(b.as_bytes().to_vec()));
        }
        if let Ok(b) = obj.cast::<PyByteArray>() {
            return Ok(Self::Bytes(b.to_vec()));
        }
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(Self::Path(s.extract::<String>()?));
        }
        if obj.hasattr("__fspath__")? {
            let path: PathBuf = obj.extract()?;
            return Ok(Self::Path(path.to_string_lossy().into_owned()));
        }
        if let Ok(array) = obj.cast::<PyUntypedArray>() {
            return Ok(Self::from_array(array));
        }
        if obj.hasattr("mode")? && obj.hasattr("convert")? {
            // A PIL image: its pixels through numpy, other modes (palette, 16-bit, CMYK...)
            // converted to RGB by PIL first, as transformers' processor does.
            let mode: String = obj.getattr("mode")?.extract()?;
            let image = if PIL_MODES.contains(&mode.as_str()) {
                obj.clone()
            } else {
                obj.call_method1("convert", ("RGB",))?
            };
            let array = obj.py().import("numpy")?.call_method1("asarray", (image,))?;
            return Self::from_python(&array);
        }
        let kind = obj.get_type().name()?.to_string();
        Ok(Self::Invalid(format!(
            "{kind} object is not an image; pass a uint8 numpy array, encoded bytes, a path or a PIL image"
        )))
    }

    fn from_array(array: &Bound<'_, PyUntypedArray>) -> Self {
        let shape = array.shape().to_vec();
        let dtype = array.dtype().to_string();
        let Ok(pixels) = array.extract::<PyReadonlyArrayDyn<'_, u8>>() else {
            return Self::Invalid(format!("an array of {dtype}; pass uint8 pixels"));
        };
        let (height, width, channels) = match shape[..] {
            [h, w] => (h, w, 1),
            [h, w, c] => (h, w, c),
            _ => {
                return Self::Invalid(format!(
                    "an array of shape {shape:?}; pass (H, W), (H, W, 3) or (H, W, 4)"
                ))
            }
        };
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Self::Invalid(format!("an array of shape {shape:?} is too large"));
        };
        // Copied in C order whatever the array's strides.
        let data: Vec<u8> = pixels.as_array().iter().copied().collect();
        Self::Pixels {
            width,
            height,
            channels,
            data,
        }
    }

    /// The RGB image, or the one-line reason it cannot be had (the CLI's wording for files).
    pub fn decode(&self) -> Result<RgbImage, String> {
        match self {
            Self::Pixels {
                width,
                height,
                channels,
                data,
            } => rgb_from_pixels(*width, *height, *channels, data.clone()).map_err(|e| e.to_string()),
            Self::Bytes(bytes) => decode_image(bytes, &DecodeOptions::default()),
            Self::Path(path) => load_image_with(path.as_ref(), &DecodeOptions::default()).map_err(|e| e.to_string()),
            Self::Invalid(reason) => Err(reason.clone()),
        }
    }

    /// The path, for images given by one.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::Path(p) => Some(p),
            _ => None,
        }
    }
}
