//! The decode-ahead stage: images are read (from files, tar shards, Parquet row groups), decoded
//! and resized on a thread of their own while the model works on the batch before.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, OnceLock};

use super::dataset::Job;
use super::source::{Container, Read, Source};
use crate::preprocess::{decode_image, DecodeOptions, ImageProcessor, PreparedImage, RgbImage};

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

/// What the loader hands over, in input order.
pub(crate) enum Loaded {
    /// One job and its image, or why the image could not be read.
    Image(Job, Result<Decoded, String>),
    /// A container that cannot be read further (its path), and why.
    Broken(PathBuf, String),
    /// Every image of the container was handed over before this.
    Done(Arc<Container>),
}

/// Starts reading `sources` in order on a thread of `scope`, decoding their images at most
/// `ahead` images ahead of the consumer. Once `processor` is set the images are resized on that
/// thread too. The thread stops early when `stop` is set or the receiver is dropped.
pub(crate) fn decode_ahead<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    sources: Vec<Source>,
    options: DecodeOptions,
    ahead: usize,
    processor: &'scope OnceLock<ImageProcessor>,
    stop: &'scope AtomicBool,
) -> Receiver<Loaded> {
    let (tx, rx) = sync_channel(ahead);
    scope.spawn(move || {
        let mut emit = |read: Read| {
            if stop.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            let loaded = match read {
                Read::Image(job, bytes) => {
                    let decoded = bytes.and_then(|bytes| {
                        decode_image(&bytes, &options).map_err(|message| format!("cannot decode image: {message}"))
                    });
                    let decoded = decoded.map(|rgb| match processor.get() {
                        Some(p) => Decoded::Prepared(p.prepare(&rgb)),
                        None => Decoded::Raw(rgb),
                    });
                    Loaded::Image(job, decoded)
                }
                Read::Broken(path, reason) => Loaded::Broken(path, reason),
                Read::Done(container) => Loaded::Done(container),
            };
            match tx.send(loaded) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        };
        for source in sources {
            if source.read(&mut emit).is_break() {
                break;
            }
        }
    });
    rx
}
