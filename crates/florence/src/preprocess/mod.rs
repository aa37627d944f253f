//! Image loading and preprocessing: decode, convert to RGB as PIL's `.convert("RGB")` does,
//! resize with Pillow's bicubic filter, rescale and normalize (spec §1).

mod resize;

use std::path::Path;

use image::{DynamicImage, ImageReader};

pub use resize::resize_bicubic_rgb8;

use crate::config::PreprocessorConfig;
use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// How images are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Rotate/flip by the EXIF orientation tag (JPEG, TIFF, WebP, PNG), as photo viewers do.
    /// transformers does not, so turn this off for bit-exact parity on rotated photos.
    pub exif_orientation: bool,
    /// Refuse images with more pixels than this (a guard against decompression bombs).
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        // Twice PIL's warning threshold, which is where PIL itself refuses to open an image.
        Self {
            exif_orientation: true,
            max_pixels: 2 * 89_478_485,
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

/// Decodes image bytes into RGB.
pub fn decode_image(bytes: &[u8], opts: &DecodeOptions) -> std::result::Result<RgbImage, String> {
    use image::ImageDecoder;
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a recognized image format (PNG, JPEG, WebP, GIF, BMP or TIFF)".into());
    }
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > opts.max_pixels {
        return Err(format!(
            "{w}x{h} is {pixels} pixels, above the limit of {} (raise it with --max-pixels if the image is trusted)",
            opts.max_pixels
        ));
    }
    let orientation = if opts.exif_orientation {
        decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms)
    } else {
        image::metadata::Orientation::NoTransforms
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    img.apply_orientation(orientation);
    Ok(to_rgb_like_pil(img))
}

/// PIL's `.convert("RGB")`: alpha is dropped (not composited), 16-bit colour keeps the high
/// byte, and 16-bit grayscale (PIL mode `I;16`) is clipped to 255 rather than scaled.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
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
    RgbImage { width, height, data }
}

/// An image ready for the model: its pixel values and the size it had before resizing (which
/// post-processing maps boxes and polygons back to).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// Normalized `[3, H, W]` values at the processor's size.
    pub pixel_values: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

/// Turns RGB images into normalized `[3, H, W]` pixel values.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: PreprocessorConfig,
}

impl ImageProcessor {
    pub fn new(config: PreprocessorConfig) -> Self {
        Self { config }
    }

    /// Resizes and normalizes `img`, keeping its original size (safe to call on any thread).
    pub fn prepare(&self, img: &RgbImage) -> PreparedImage {
        PreparedImage {
            pixel_values: self.pixel_values(img),
            width: img.width,
            height: img.height,
        }
    }

    /// Resizes and normalizes one image into channel-first f32 values, bit-exact with
    /// transformers' PIL backend: `f32(f64(p) * rescale)`, then `(x - mean) / std` in f32.
    pub fn pixel_values(&self, img: &RgbImage) -> Vec<f32> {
        let c = &self.config;
        let resized = resize_bicubic_rgb8(&img.data, img.width as usize, img.height as usize, c.width, c.height);
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
