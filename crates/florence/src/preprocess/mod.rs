//! Image loading and preprocessing: decode, convert to RGB as PIL's `.convert("RGB")` does,
//! resize with Pillow's bicubic filter, rescale and normalize (spec §1).

mod resize;
mod truncation;

use std::path::Path;

use image::{DynamicImage, ImageError, ImageReader};

use crate::config::PreprocessorConfig;
use crate::error::{Error, Result};
use resize::resize_bicubic_rgb8;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved: never empty, and its buffer always
/// holds exactly `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl RgbImage {
    /// Wraps interleaved RGB bytes, refusing a zero side or a buffer of another length than
    /// `width * height * 3`.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::usage(format!(
                "an RGB image needs a nonzero width and height, not {width}x{height}"
            )));
        }
        let expected = width as u64 * height as u64 * 3;
        if data.len() as u64 != expected {
            return Err(Error::usage(format!(
                "an RGB image of {width}x{height} needs {expected} bytes (3 per pixel), not {}",
                data.len()
            )));
        }
        Ok(Self { width, height, data })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The interleaved RGB bytes, rows top to bottom.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The interleaved RGB bytes, rows top to bottom.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// How images are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Rotate/flip by the EXIF orientation tag (JPEG, TIFF, WebP, PNG), as photo viewers do.
    /// transformers does not, so turn this off for bit-exact parity on rotated photos.
    pub exif_orientation: bool,
    /// Refuse images with more pixels than this (a guard against decompression bombs).
    pub max_pixels: u64,
    /// Decode a file that was cut short (a JPEG's missing rows come out grey) instead of refusing
    /// it as PIL does; only where the decoder can, which the PNG, BMP and TIFF ones cannot.
    pub allow_truncated: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        // Twice PIL's warning threshold, which is where PIL itself refuses to open an image.
        Self {
            exif_orientation: true,
            max_pixels: 2 * 89_478_485,
            allow_truncated: false,
        }
    }
}

/// Decodes an image file (PNG, JPEG, WebP, GIF, BMP, TIFF; the format is read from the content)
/// into RGB with the default [`DecodeOptions`]; animations give their first frame.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    load_image_with(path, &DecodeOptions::default())
}

/// [`load_image`] with explicit options.
pub fn load_image_with(path: &Path, opts: &DecodeOptions) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, opts).map_err(|message| Error::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// Decodes image bytes into RGB. A file cut short is refused unless `opts.allow_truncated`.
pub fn decode_image(bytes: &[u8], opts: &DecodeOptions) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let Some(format) = reader.format() else {
        return Err("not a recognized image format (PNG, JPEG, WebP, GIF, BMP or TIFF)".into());
    };
    let cut_short = truncation::is_cut_short(format, bytes);
    let truncated = format!("the file is truncated ({} bytes)", bytes.len());
    // A cut file is decoded even when it will be refused, to suggest the flag only where it helps.
    match decode(reader, opts) {
        Ok(_) if cut_short && !opts.allow_truncated => Err(format!(
            "{truncated}; re-download or re-export it, or pass --allow-truncated to caption what is there"
        )),
        Ok(img) => Ok(img),
        Err(Failure::Decoder(e)) if cut_short || truncation::is_eof(&e) => Err(if opts.allow_truncated {
            format!("{truncated}, and what there is cannot be decoded: {e}")
        } else {
            format!("{truncated}; re-download or re-export it")
        }),
        Err(Failure::Decoder(e)) => Err(e.to_string()),
        Err(Failure::Refused(reason)) => Err(reason),
    }
}

/// Why [`decode`] gave no image.
enum Failure {
    /// The decoder's error.
    Decoder(ImageError),
    /// Ours: the image is empty or too large.
    Refused(String),
}

impl From<ImageError> for Failure {
    fn from(e: ImageError) -> Self {
        Failure::Decoder(e)
    }
}

/// Decodes, orients and converts an image whose format is known.
fn decode(reader: ImageReader<std::io::Cursor<&[u8]>>, opts: &DecodeOptions) -> std::result::Result<RgbImage, Failure> {
    use image::ImageDecoder;
    let mut decoder = reader.into_decoder()?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels == 0 {
        return Err(Failure::Refused(format!("the image has no pixels ({w}x{h})")));
    }
    if pixels > opts.max_pixels {
        return Err(Failure::Refused(format!(
            "{w}x{h} is {pixels} pixels, above the limit of {} (raise it with --max-pixels if the image is trusted)",
            opts.max_pixels
        )));
    }
    let orientation = if opts.exif_orientation {
        decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms)
    } else {
        image::metadata::Orientation::NoTransforms
    };
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    to_rgb_like_pil(img).map_err(|e| Failure::Refused(e.to_string()))
}

/// An RGB image from interleaved 8-bit pixels with `channels` values each: 1 (gray), 2 (gray
/// and alpha), 3 (RGB) or 4 (RGBA), converted as decoded files are (PIL's `.convert("RGB")`:
/// gray is repeated, alpha dropped).
pub fn rgb_from_pixels(width: u32, height: u32, channels: usize, data: Vec<u8>) -> Result<RgbImage> {
    let wrong = || {
        Error::usage(format!(
            "{width}x{height} pixels with {channels} channels need {} bytes",
            width as u64 * height as u64 * channels as u64
        ))
    };
    let img = match channels {
        1 => DynamicImage::ImageLuma8(image::GrayImage::from_raw(width, height, data).ok_or_else(wrong)?),
        2 => DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_raw(width, height, data).ok_or_else(wrong)?),
        3 => return RgbImage::new(width, height, data),
        4 => DynamicImage::ImageRgba8(image::RgbaImage::from_raw(width, height, data).ok_or_else(wrong)?),
        n => {
            return Err(Error::usage(format!(
                "images have 1 (gray), 2 (gray and alpha), 3 (RGB) or 4 (RGBA) channels, not {n}"
            )))
        }
    };
    to_rgb_like_pil(img)
}

/// PIL's `.convert("RGB")`: alpha is dropped (not composited), 16-bit colour keeps the high
/// byte, and 16-bit grayscale (PIL mode `I;16`) is clipped to 255 rather than scaled.
fn to_rgb_like_pil(img: DynamicImage) -> Result<RgbImage> {
    let (width, height) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(i) => i.into_raw(),
        DynamicImage::ImageLuma16(i) => i.into_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(i) => i
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        DynamicImage::ImageRgb16(i) => i.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(i) => i
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        DynamicImage::ImageRgba8(i) => i.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage::new(width, height, data)
}

/// An image ready for the model: its pixel values and the size it had before resizing (which
/// post-processing maps boxes and polygons back to).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// Normalized `[3, H, W]` values at the processor's size.
    pub pixel_values: Vec<f32>,
    /// Width of the original image, in pixels.
    pub width: u32,
    /// Height of the original image, in pixels.
    pub height: u32,
}

/// Turns RGB images into normalized `[3, H, W]` pixel values.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    /// Size, normalization and filter.
    pub config: PreprocessorConfig,
}

impl ImageProcessor {
    /// A processor for `config`.
    pub fn new(config: PreprocessorConfig) -> Self {
        Self { config }
    }

    /// Resizes and normalizes `img`, keeping its original size (safe to call on any thread).
    pub fn prepare(&self, img: &RgbImage) -> PreparedImage {
        PreparedImage {
            pixel_values: self.pixel_values(img),
            width: img.width(),
            height: img.height(),
        }
    }

    /// Resizes and normalizes one image into channel-first f32 values, bit-exact with
    /// transformers' PIL backend: `f32(f64(p) * rescale)`, then `(x - mean) / std` in f32.
    pub fn pixel_values(&self, img: &RgbImage) -> Vec<f32> {
        let c = &self.config;
        let resized = resize_bicubic_rgb8(img, c.width, c.height);
        let plane = c.width * c.height;
        let mut out = vec![0f32; 3 * plane];
        let rescale = c.rescale_factor;
        // A lookup per channel and level keeps the exact arithmetic off the per-pixel path.
        let table: Vec<[f32; 256]> = (0..3)
            .map(|ch| {
                let mut t = [0f32; 256];
                for (v, slot) in t.iter_mut().enumerate() {
                    let x = (v as f64 * rescale) as f32;
                    *slot = (x - c.image_mean[ch]) / c.image_std[ch];
                }
                t
            })
            .collect();
        for (i, px) in resized.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                out[ch * plane + i] = table[ch][px[ch] as usize];
            }
        }
        out
    }
}
