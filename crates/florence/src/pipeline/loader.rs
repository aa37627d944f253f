//! The decode-ahead stage: images are read, decoded and resized on a thread of their own while
//! the model works on the batch before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::OnceLock;

use super::dataset::Job;
use crate::error::Error;
use crate::preprocess::{load_image_with, DecodeOptions, ImageProcessor, PreparedImage, RgbImage};

/// An image as the loader hands it over: resized too once the model's image size is known.
pub(crate) enum Decoded {
    /// Decoded before the model was loaded; the model's processor still has to resize it.
    Raw(RgbImage),
    /// Resized and normalized for the model.
    Prepared(PreparedImage),
}

impl Decoded {
    /// The image ready for the model.
    pub(crate) fn prepare(self, processor: &ImageProcessor) -> PreparedImage {
        match self {
            Decoded::Prepared(p) => p,
            Decoded::Raw(rgb) => processor.prepare(&rgb),
        }
    }
}

/// One job and its image, or why the image could not be read.
pub(crate) type Loaded = (Job, Result<Decoded, String>);

/// Starts decoding `jobs` in order on a thread of `scope`, at most `ahead` images ahead of the
/// consumer. Once `processor` is set the images are resized on that thread too. The thread
/// stops early when `stop` is set or the receiver is dropped.
pub(crate) fn decode_ahead<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    jobs: Vec<Job>,
    options: DecodeOptions,
    ahead: usize,
    processor: &'scope OnceLock<ImageProcessor>,
    stop: &'scope AtomicBool,
) -> Receiver<Loaded> {
    let (tx, rx) = sync_channel(ahead);
    scope.spawn(move || {
        for job in jobs {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let decoded = load_image_with(&job.image.path, &options)
                .map(|rgb| match processor.get() {
                    Some(p) => Decoded::Prepared(p.prepare(&rgb)),
                    None => Decoded::Raw(rgb),
                })
                .map_err(|e| match e {
                    Error::Image { message, .. } => format!("cannot decode image: {message}"),
                    Error::Io { source, .. } => format!("cannot read: {source}"),
                    other => other.to_string(),
                });
            if tx.send((job, decoded)).is_err() {
                break;
            }
        }
    });
    rx
}
