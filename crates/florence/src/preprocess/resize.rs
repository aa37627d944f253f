//! Pillow's bicubic resampler, ported bit for bit.
//!
//! The reference processor resizes the uint8 image with `PIL.Image.resize(size, BICUBIC)`:
//! a separable two-pass filter (horizontal, then vertical) with coefficients computed in
//! double precision, rounded to 22-bit fixed point, accumulated in 32-bit integers, and
//! rounded back to uint8 after each pass. Other resizers (the `image` crate,
//! `fast_image_resize`) differ by up to 20 levels, which changes the model's input; this port
//! reproduces `Resample.c` exactly, including the intermediate uint8 rounding.

use super::RgbImage;

/// Fixed-point precision of the coefficients (`PRECISION_BITS` in Pillow).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel, a = -0.5, support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel filter taps: the first input index, and fixed-point weights.
struct Taps {
    /// Taps per output pixel (the row stride of `weights`).
    ksize: usize,
    /// `(first input index, number of taps)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow truncates toward zero after adding 0.5 (C `(int)` cast).
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Taps { ksize, bounds, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image exactly as `PIL.Image.resize((out_w, out_h), BICUBIC)`, returning
/// interleaved bytes; an empty output size gives an empty buffer. Takes an [`RgbImage`], whose
/// buffer always matches its nonzero size, so no input can index past the source.
pub(crate) fn resize_bicubic_rgb8(img: &RgbImage, out_w: usize, out_h: usize) -> Vec<u8> {
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    let (src, in_w, in_h) = (img.data(), img.width() as usize, img.height() as usize);
    let horiz = taps(in_w, out_w);
    let vert = taps(in_h, out_h);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;

    // The horizontal pass only computes the rows the vertical pass will read.
    let (first_row, last_row) = if need_v {
        let first = vert.bounds[0].0;
        let (lmin, lcount) = vert.bounds[out_h - 1];
        (first, lmin + lcount)
    } else {
        (0, in_h)
    };

    let half = 1i32 << (PRECISION_BITS - 1);
    let tmp: Vec<u8>;
    let (plane, plane_w, row_offset) = if need_h {
        let rows = last_row - first_row;
        let mut out = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let in_row = &src[(y + first_row) * in_w * 3..(y + first_row + 1) * in_w * 3];
            let out_row = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
            for (xx, &(xmin, count)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + count];
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (x, &w) in k.iter().enumerate() {
                    let p = &in_row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    s0 += p[0] as i32 * w;
                    s1 += p[1] as i32 * w;
                    s2 += p[2] as i32 * w;
                }
                out_row[xx * 3] = clip8(s0);
                out_row[xx * 3 + 1] = clip8(s1);
                out_row[xx * 3 + 2] = clip8(s2);
            }
        }
        tmp = out;
        (&tmp[..], out_w, first_row)
    } else {
        (src, in_w, 0)
    };
    if !need_v {
        return plane.to_vec();
    }

    let stride = plane_w * 3;
    let mut out = vec![0u8; out_h * stride];
    for (yy, &(ymin, count)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + count];
        let ymin = ymin - row_offset;
        let out_row = &mut out[yy * stride..(yy + 1) * stride];
        for (xi, o) in out_row.iter_mut().enumerate() {
            let mut s = half;
            for (y, &w) in k.iter().enumerate() {
                s += plane[(ymin + y) * stride + xi] as i32 * w;
            }
            *o = clip8(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, data: Vec<u8>) -> RgbImage {
        RgbImage::new(w, h, data).unwrap()
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_bicubic_rgb8(&image(5, 4, src.clone()), 5, 4), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let out = resize_bicubic_rgb8(&image(13, 7, vec![200u8; 13 * 7 * 3]), 768, 768);
        assert!(out.iter().all(|&v| v == 200));
        let down = resize_bicubic_rgb8(&image(1000, 900, vec![17u8; 1000 * 900 * 3]), 768, 768);
        assert!(down.iter().all(|&v| v == 17));
    }

    #[test]
    fn empty_output_is_empty() {
        let img = image(3, 2, vec![9u8; 18]);
        assert!(resize_bicubic_rgb8(&img, 0, 5).is_empty());
        assert!(resize_bicubic_rgb8(&img, 5, 0).is_empty());
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(3, 768), (1000, 768), (768, 768 * 3), (17, 5)] {
            let t = taps(i, o);
            for (xx, &(_, n)) in t.bounds.iter().enumerate() {
                let s: i64 = t.weights[xx * t.ksize..xx * t.ksize + n]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} at {xx}: {s}");
            }
        }
    }
}
