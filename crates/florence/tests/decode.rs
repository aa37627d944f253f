//! Decoding files cut short, and RGB images that do not add up (issue 18).
//!
//! Every image here is encoded by the test and cut at points chosen from its structure. PIL's
//! verdict on each cut is recorded in `pil_refuses`; to see them for these very bytes, run
//! `FLORENCE_CUTS_DIR=/tmp/cuts cargo test -p florence --test decode -- --ignored write_cuts`,
//! then `python tools/reference/truncation_verdicts.py /tmp/cuts`.
//!
//! Before the fix, the JPEG cuts inside the scan, the WebP missing its last byte, the GIF missing
//! its LZW end code and the TIFF cut in a tag value the decoder skips all decoded without a word;
//! the other cuts failed with the decoder's own message.

use florence::preprocess::{decode_image, DecodeOptions, ImageProcessor, RgbImage};
use florence::PreprocessorConfig;
use image::{DynamicImage, ImageFormat};

/// A 64x48 image with edges and noise, so every encoder produces real data.
fn sample() -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| {
        let n = (x * 7919 + y * 104_729) ^ (x * y * 31);
        image::Rgb([(x * 4) as u8, (y * 5) as u8, (n % 256) as u8])
    }))
}

fn encode(format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    sample().write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// One cut of a file: its first `len` bytes.
struct Cut {
    name: &'static str,
    len: usize,
    /// Whether `Image.open(...).convert("RGB")` raises on these bytes.
    pil_refuses: bool,
    /// Whether the `image` crate decodes it with `allow_truncated`.
    decodes_when_allowed: bool,
}

fn cut(name: &'static str, len: usize, pil_refuses: bool, decodes_when_allowed: bool) -> Cut {
    Cut {
        name,
        len,
        pil_refuses,
        decodes_when_allowed,
    }
}

/// Where a JPEG's entropy-coded data starts: after its (first) SOS segment.
fn jpeg_scan_start(b: &[u8]) -> usize {
    let sos = b.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    sos + 2 + u16::from_be_bytes([b[sos + 2], b[sos + 3]]) as usize
}

/// The cuts of each format, with PIL 13's verdicts.
fn cuts(format: ImageFormat, b: &[u8]) -> Vec<Cut> {
    let n = b.len();
    match format {
        ImageFormat::Jpeg => {
            assert_eq!(b[n - 2..], [0xFF, 0xD9]);
            let scan = jpeg_scan_start(b);
            vec![
                cut("in-headers", scan / 2, true, false),
                cut("scan-start", scan, true, true),
                cut("mid-scan", (scan + n) / 2, true, true),
                cut("no-eoi", n - 2, true, true),
                cut("half-eoi", n - 1, true, true),
            ]
        }
        ImageFormat::Png => {
            assert_eq!(&b[n - 8..n - 4], b"IEND");
            vec![
                cut("after-ihdr", 33, true, false),
                cut("mid-idat", n / 2, true, false),
                // PIL has every row by then; the png crate wants the chunk after IDAT.
                cut("no-iend", n - 12, false, false),
            ]
        }
        ImageFormat::WebP => vec![
            cut("after-vp8l-header", 25, true, false),
            cut("middle", n / 2, true, false),
            // The chunk's padding byte: image-webp does not need it, libwebp does.
            cut("no-padding", n - 1, true, true),
        ],
        ImageFormat::Gif => {
            // The encoder's last data sub-block holds one byte, the end of the LZW stream.
            assert_eq!(b[n - 4..], [0x01, 0x01, 0x00, 0x3B]);
            vec![
                cut("middle", n / 2, true, false),
                cut("no-last-sub-block", n - 4, true, true),
                cut("no-lzw-end", n - 3, true, true),
                // PIL has the end code; telling that needs LZW decoding, so we refuse this one.
                cut("no-terminator", n - 2, false, true),
            ]
        }
        ImageFormat::Bmp => {
            let pixels = u32::from_le_bytes(b[10..14].try_into().unwrap()) as usize;
            vec![
                cut("after-headers", pixels, true, false),
                cut("middle", n / 2, true, false),
                cut("last-byte", n - 1, true, false),
            ]
        }
        ImageFormat::Tiff => vec![
            cut("after-header", 8, true, false),
            cut("mid-strip", n / 2, true, false),
            // The end of the IFD's out-of-line values, which PIL does without; the tiff crate does not.
            cut("last-byte", n - 1, false, false),
        ],
        _ => unreachable!(),
    }
}

const FORMATS: [(ImageFormat, &str); 6] = [
    (ImageFormat::Jpeg, "jpg"),
    (ImageFormat::Png, "png"),
    (ImageFormat::WebP, "webp"),
    (ImageFormat::Gif, "gif"),
    (ImageFormat::Bmp, "bmp"),
    (ImageFormat::Tiff, "tiff"),
];

#[test]
fn cut_files_are_refused_as_truncated() {
    let strict = DecodeOptions::default();
    let lenient = DecodeOptions {
        allow_truncated: true,
        ..DecodeOptions::default()
    };
    for (format, ext) in FORMATS {
        let bytes = encode(format);
        let whole = decode_image(&bytes, &strict).unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert_eq!((whole.width(), whole.height()), (64, 48));
        for c in cuts(format, &bytes) {
            let what = format!("{ext} {} ({} of {} bytes)", c.name, c.len, bytes.len());
            // Refused wherever PIL refuses, and where the decoder fails on the cut; always naming
            // the cause.
            let err = decode_image(&bytes[..c.len], &strict)
                .map(|_| ())
                .expect_err(&format!("{what}: decoded (PIL refuses: {})", c.pil_refuses));
            assert!(
                err.starts_with(&format!("the file is truncated ({} bytes); re-download", c.len)),
                "{what}: {err}"
            );
            // The flag is only suggested where it helps.
            assert_eq!(
                err.contains("--allow-truncated"),
                c.decodes_when_allowed,
                "{what}: {err}"
            );
            match decode_image(&bytes[..c.len], &lenient) {
                Ok(img) => {
                    assert!(c.decodes_when_allowed, "{what}: decoded with allow_truncated");
                    assert_eq!((img.width(), img.height()), (64, 48), "{what}");
                }
                Err(e) => {
                    assert!(!c.decodes_when_allowed, "{what}: {e}");
                    assert!(
                        e.contains("truncated") && e.contains("cannot be decoded"),
                        "{what}: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn gif_without_its_trailer_is_whole() {
    // PIL accepts a GIF missing only its trailer byte, and so do we, pixel for pixel.
    let bytes = encode(ImageFormat::Gif);
    let opts = DecodeOptions::default();
    let whole = decode_image(&bytes, &opts).unwrap();
    assert_eq!(decode_image(&bytes[..bytes.len() - 1], &opts).unwrap(), whole);
}

#[test]
fn jpeg_with_trailing_data_is_whole() {
    // Bytes after EOI (a phone's extra data, a second image) are no truncation.
    let mut bytes = encode(ImageFormat::Jpeg);
    let opts = DecodeOptions::default();
    let whole = decode_image(&bytes, &opts).unwrap();
    bytes.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 1, 2, 3]);
    assert_eq!(decode_image(&bytes, &opts).unwrap(), whole);
}

#[test]
fn jpeg_eoi_inside_a_comment_does_not_hide_a_cut() {
    // An EXIF thumbnail carries its own EOI inside APP1; a COM segment stands in for it here.
    let bytes = encode(ImageFormat::Jpeg);
    let comment = [0xFF, 0xFE, 0x00, 0x06, 0xFF, 0xD9, 0xFF, 0xD9];
    let with_comment = [&bytes[..2], &comment, &bytes[2..]].concat();
    let opts = DecodeOptions::default();
    assert_eq!(
        decode_image(&with_comment, &opts).unwrap(),
        decode_image(&bytes, &opts).unwrap()
    );
    let err = decode_image(&with_comment[..with_comment.len() / 2], &opts).unwrap_err();
    assert!(err.starts_with("the file is truncated"), "{err}");
}

/// A 2x2 RGB TIFF laid out as some writers do: IFD first, then the bit depths, the pixels and
/// last the value of a DocumentName tag, which the tiff crate never reads.
fn tiff_with_document_name() -> Vec<u8> {
    let mut b = b"II\x2A\x00\x08\x00\x00\x00".to_vec();
    let entries: [(u16, u16, u32, u32); 10] = [
        (256, 3, 1, 2),    // ImageWidth
        (257, 3, 1, 2),    // ImageLength
        (258, 3, 3, 134),  // BitsPerSample, out of line
        (259, 3, 1, 1),    // Compression: none
        (262, 3, 1, 2),    // PhotometricInterpretation: RGB
        (269, 2, 13, 152), // DocumentName, out of line, at the end
        (273, 4, 1, 140),  // StripOffsets
        (277, 3, 1, 3),    // SamplesPerPixel
        (278, 3, 1, 2),    // RowsPerStrip
        (279, 4, 1, 12),   // StripByteCounts
    ];
    b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, typ, count, value) in entries {
        for field in [
            &tag.to_le_bytes()[..],
            &typ.to_le_bytes(),
            &count.to_le_bytes(),
            &value.to_le_bytes(),
        ] {
            b.extend_from_slice(field);
        }
    }
    b.extend_from_slice(&[0; 4]); // no next IFD
    assert_eq!(b.len(), 134);
    b.extend_from_slice(&[8, 0, 8, 0, 8, 0]);
    b.extend((0..12).map(|i| i * 20));
    b.extend_from_slice(b"cut-here.tif\0");
    b
}

#[test]
fn tiff_cut_in_a_tag_the_decoder_skips_is_truncated() {
    // PIL stops reading the IFD at the cut value and, without the tags after it, cannot identify
    // the file; the tiff crate decoded it without a word.
    let bytes = tiff_with_document_name();
    let whole = decode_image(&bytes, &DecodeOptions::default()).unwrap();
    assert_eq!(whole.data(), (0..12).map(|i| i * 20).collect::<Vec<u8>>());
    let cut = &bytes[..bytes.len() - 1];
    let err = decode_image(cut, &DecodeOptions::default()).unwrap_err();
    assert!(
        err.starts_with("the file is truncated (164 bytes)") && err.contains("--allow-truncated"),
        "{err}"
    );
    let lenient = DecodeOptions {
        allow_truncated: true,
        ..DecodeOptions::default()
    };
    assert_eq!(decode_image(cut, &lenient).unwrap(), whole);
}

#[test]
fn rgb_image_refuses_a_buffer_that_does_not_match_its_size() {
    // Once `RgbImage { width: 2, height: 2, data: vec![0; 5] }`, which made `pixel_values` panic.
    let err = RgbImage::new(2, 2, vec![0; 5]).unwrap_err().to_string();
    assert_eq!(err, "an RGB image of 2x2 needs 12 bytes (3 per pixel), not 5");
    let err = RgbImage::new(0, 3, Vec::new()).unwrap_err().to_string();
    assert_eq!(err, "an RGB image needs a nonzero width and height, not 0x3");
    let img = RgbImage::new(2, 1, vec![255, 0, 0, 0, 0, 255]).unwrap();
    assert_eq!(
        (img.width(), img.height(), img.data()),
        (2, 1, &[255, 0, 0, 0, 0, 255][..])
    );
    let processor = ImageProcessor::new(PreprocessorConfig {
        width: 3,
        height: 2,
        ..PreprocessorConfig::default()
    });
    assert_eq!(processor.pixel_values(&img).len(), 3 * 3 * 2);
}

/// Writes every cut (and each whole file) to `$FLORENCE_CUTS_DIR`, for
/// `tools/reference/truncation_verdicts.py`.
#[test]
#[ignore = "writes files for the PIL reference script"]
fn write_cuts() {
    let dir = std::path::PathBuf::from(std::env::var("FLORENCE_CUTS_DIR").expect("set FLORENCE_CUTS_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    for (format, ext) in FORMATS {
        let bytes = encode(format);
        std::fs::write(dir.join(format!("whole.{ext}")), &bytes).unwrap();
        for c in cuts(format, &bytes) {
            let refuses = if c.pil_refuses { "refuses" } else { "accepts" };
            std::fs::write(dir.join(format!("{}.{refuses}.{ext}", c.name)), &bytes[..c.len]).unwrap();
        }
    }
    let tiff = tiff_with_document_name();
    std::fs::write(dir.join("whole-with-name.tiff"), &tiff).unwrap();
    std::fs::write(dir.join("name-value.refuses.tiff"), &tiff[..tiff.len() - 1]).unwrap();
}
