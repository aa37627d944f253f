//! Telling a file that was cut short from a whole one.
//!
//! PIL refuses a truncated image ("image file is truncated"), so a Python captioner skips it; the
//! `image` crate's decoders differ. The PNG, BMP and TIFF decoders fail with an I/O
//! `UnexpectedEof`, the decoders' own signal, which [`is_eof`] recognizes. The JPEG, WebP and GIF
//! decoders instead return an image for some cuts and say nothing: zune-jpeg fills the missing
//! rows with grey, image-webp ignores a missing last byte, and the gif crate stops once the
//! frame's pixels are filled, without its LZW end code; the tiff crate, which reads only the tags
//! it needs, misses a cut through the others' values when the IFD comes last. [`is_cut_short`]
//! finds those cuts from the file's own structure, which the decoders do not expose.

use image::{ImageError, ImageFormat};

/// Whether a decoder error says the data ended early.
pub(super) fn is_eof(e: &ImageError) -> bool {
    matches!(e, ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// Whether `bytes` end before their structure says the image (its first frame) does, for the
/// formats whose decoders do not report it; `false` for the others.
pub(super) fn is_cut_short(format: ImageFormat, bytes: &[u8]) -> bool {
    match format {
        ImageFormat::Jpeg => !jpeg_reaches_eoi(bytes),
        ImageFormat::WebP => webp_riff_is_short(bytes),
        ImageFormat::Gif => !gif_first_image_complete(bytes),
        ImageFormat::Tiff => !tiff_first_ifd_complete(bytes),
        _ => false,
    }
}

/// Walks a JPEG's markers from SOI to EOI: segments are skipped by their length (so an EXIF
/// thumbnail's own EOI inside APP1 does not count), entropy-coded data byte by byte. libjpeg,
/// and so PIL, reads up to EOI and calls the file truncated without it.
fn jpeg_reaches_eoi(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i < b.len() {
        // Entropy-coded data, and any stray bytes between segments, until the next 0xFF.
        let Some(ff) = b[i..].iter().position(|&x| x == 0xFF) else {
            return false;
        };
        i += ff;
        let Some(&marker) = b.get(i + 1) else {
            return false;
        };
        i += match marker {
            0xD9 => return true,
            // A fill byte before a marker.
            0xFF => 1,
            // Markers without a segment: a stuffed zero in scan data, TEM, RSTn, SOI.
            0x00 | 0x01 | 0xD0..=0xD8 => 2,
            _ => match b.get(i + 2..i + 4) {
                Some(len) => 2 + u16::from_be_bytes([len[0], len[1]]) as usize,
                None => return false,
            },
        };
    }
    false
}

/// Whether a WebP's RIFF header declares more bytes than there are. libwebp refuses such a file;
/// image-webp decodes it when only the chunk's padding byte is missing.
fn webp_riff_is_short(b: &[u8]) -> bool {
    match b.get(4..8) {
        Some(size) => 8 + u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as u64 > b.len() as u64,
        None => true,
    }
}

/// Walks a GIF's blocks up to the end of its first image's data, the zero-length sub-block that
/// closes it: the part `Image.open(...).convert("RGB")` reads. PIL refuses a file cut inside that
/// data even where the gif crate has all the pixels (the LZW end code missing); it accepts one
/// that lacks only the closing zero byte and the trailer, which this check refuses too, as there
/// is no telling without decoding whether the end code came before the cut.
fn gif_first_image_complete(b: &[u8]) -> bool {
    /// Skips a run of sub-blocks from `i`, returning the index after its terminator.
    fn sub_blocks(b: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let n = *b.get(i)? as usize;
            i += 1 + n;
            if n == 0 {
                return Some(i);
            }
        }
    }
    /// The size of the colour table a packed-fields byte announces.
    fn table(flags: u8) -> usize {
        if flags & 0x80 != 0 {
            3 << ((flags & 7) + 1)
        } else {
            0
        }
    }
    let walk = || -> Option<()> {
        let mut i = 13 + table(*b.get(10)?); // header, logical screen descriptor, global table
        loop {
            match *b.get(i)? {
                0x21 => i = sub_blocks(b, i + 2)?,
                0x2C => {
                    // Descriptor (9 bytes), local table, LZW minimum code size, then the data.
                    sub_blocks(b, i + 11 + table(*b.get(i + 9)?))?;
                    return Some(());
                }
                // A trailer or an unknown block: not a cut, the decoder judges the rest.
                _ => return Some(()),
            }
        }
    };
    walk().is_some()
}

/// Whether a TIFF's first IFD, its entries' out-of-line values and its next-IFD offset all lie in
/// the file. PIL stops reading an IFD at the first value cut short and refuses the file when a
/// tag it needs came after it; the tiff crate fails on a cut strip itself.
fn tiff_first_ifd_complete(b: &[u8]) -> bool {
    let walk = || -> Option<()> {
        let big_endian = b.get(..2)? == b"MM";
        let uint = |at: usize, size: usize| -> Option<u64> {
            let bytes = b.get(at..at.checked_add(size)?)?;
            let fold = |v: u64, &x: &u8| (v << 8) | x as u64;
            Some(if big_endian {
                bytes.iter().fold(0, fold)
            } else {
                bytes.iter().rev().fold(0, fold)
            })
        };
        // Classic TIFF: 2-byte entry count, 12-byte entries, 4-byte counts and offsets;
        // BigTIFF (version 43): 8, 20 and 8.
        let (count_size, word, ifd) = match uint(2, 2)? {
            43 => (8, 8, uint(8, 8)?),
            _ => (2, 4, uint(4, 4)?),
        };
        let ifd = usize::try_from(ifd).ok()?;
        let entries = usize::try_from(uint(ifd, count_size)?).ok()?;
        let (first, entry_size) = (ifd + count_size, 4 + 2 * word);
        // The entries, then the next IFD's offset.
        let end = entries.checked_mul(entry_size)?.checked_add(first + word)?;
        if end > b.len() {
            return None;
        }
        for e in (0..entries).map(|i| first + i * entry_size) {
            let unit: u64 = match uint(e + 2, 2)? {
                1 | 2 | 6 | 7 => 1,
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16..=18 => 8,
                _ => continue, // an unknown type, which readers skip
            };
            let size = uint(e + 4, word)?.checked_mul(unit)?;
            if size > word as u64 && uint(e + 4 + word, word)?.checked_add(size)? > b.len() as u64 {
                return None;
            }
        }
        Some(())
    };
    walk().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_eoi_inside_a_segment_does_not_count() {
        // SOI, a COM segment holding FF D9, SOS with one byte of scan data, no EOI.
        let cut = [
            0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x04, 0xFF, 0xD9, 0xFF, 0xDA, 0x00, 0x02, 0x12,
        ];
        assert!(!jpeg_reaches_eoi(&cut));
        let whole = [&cut[..], &[0xFF, 0x00, 0xFF, 0xD0, 0x34, 0xFF, 0xFF, 0xD9]].concat();
        assert!(jpeg_reaches_eoi(&whole));
        // A segment length running past the end.
        assert!(!jpeg_reaches_eoi(&[0xFF, 0xD8, 0xFF, 0xE1, 0x10, 0x00, 0xFF, 0xD9]));
    }

    #[test]
    fn gif_sub_blocks_must_be_whole() {
        // 1x1, no global table, an image with one 2-byte data sub-block.
        let head = b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x2C\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02";
        let whole = [&head[..], b"\x02\x44\x01\x00\x3B"].concat();
        assert!(gif_first_image_complete(&whole));
        assert!(gif_first_image_complete(&whole[..whole.len() - 1]));
        for cut in 1..=3 {
            assert!(!gif_first_image_complete(&whole[..whole.len() - 1 - cut]), "{cut}");
        }
    }
}
