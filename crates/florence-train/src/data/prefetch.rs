//! Images decoded and preprocessed ahead of the trainer: a feeder thread walks an epoch's
//! micro-batches in order, decodes each one's images on worker threads, and hands the pixel
//! tensors over a bounded channel, so at most `ahead` micro-batches wait in memory.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use florence::preprocess::load_image_with;
use florence::{ImageProcessor, Result};

use super::DECODE;

/// One micro-batch: its sample indices and their `(B, 3, H, W)` f32 pixels on the CPU.
pub type Batch = (Vec<usize>, Tensor);

/// Yields an epoch's micro-batches in order, decoded ahead on worker threads. A file that cannot
/// be read mid-epoch yields an error naming it, and the iteration ends.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch>>>,
    feeder: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts decoding `batches` (indices into `images`) with `workers` threads per micro-batch,
    /// at most `ahead` (>= 1) micro-batches ahead of the consumer.
    pub fn new(
        images: Arc<[PathBuf]>,
        batches: Vec<Vec<usize>>,
        processor: ImageProcessor,
        ahead: usize,
        workers: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(ahead.max(1));
        let feeder = std::thread::spawn(move || {
            for batch in batches {
                let result = pixels(&images, &batch, &processor, workers.max(1)).map(|t| (batch, t));
                let failed = result.is_err();
                // A closed channel means the consumer stopped early: nothing more to do.
                if tx.send(result).is_err() || failed {
                    return;
                }
            }
        });
        Self {
            rx: Some(rx),
            feeder: Some(feeder),
        }
    }
}

/// Decodes and preprocesses one micro-batch, its images split over `workers` threads.
fn pixels(images: &[PathBuf], batch: &[usize], processor: &ImageProcessor, workers: usize) -> Result<Tensor> {
    let per = batch.len().div_ceil(workers).max(1);
    let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for &i in chunk {
                        let img = load_image_with(&images[i], &DECODE)?;
                        out.extend(processor.pixel_values(&img));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(florence::Error::internal("an image worker panicked")))
            })
            .collect()
    });
    let mut data = Vec::new();
    for part in parts {
        data.extend(part?);
    }
    let c = &processor.config;
    Ok(Tensor::from_vec(
        data,
        (batch.len(), 3, c.height, c.width),
        &Device::Cpu,
    )?)
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel first lets a feeder blocked on a full channel return.
        self.rx.take();
        if let Some(feeder) = self.feeder.take() {
            let _ = feeder.join();
        }
    }
}
