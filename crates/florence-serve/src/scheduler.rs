//! The model's thread: one [`RunningBatch`] that requests join as they arrive and leave as they
//! finish. Between two decoding steps it takes whatever waits (up to the batch size), encodes
//! those images together, then steps every image in the batch at once.
//!
//! A request whose caller went away (a client that disconnected, a timeout) is dropped from the
//! batch at the next step: its reply channel is closed.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use florence::batching::{Event, Joining, RunningBatch};
use florence::{Florence, GenerationConfig, Output, PreparedImage, Task};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::metrics::Metrics;

/// One image to caption, with where its result goes.
pub struct Submission {
    /// The image, prepared at the model's size.
    pub image: PreparedImage,
    /// What to run.
    pub task: Task,
    /// How to generate (already checked against the model).
    pub generation: GenerationConfig,
    /// Receives the result.
    pub reply: oneshot::Sender<florence::Result<Output>>,
    /// Receives the tokens so far after each step, for streaming (one-row searches only).
    pub tokens: Option<async_mpsc::UnboundedSender<Vec<u32>>>,
    /// When the request was admitted.
    pub admitted: Instant,
}

/// What the thread keeps of a request in the batch.
struct InFlight {
    reply: oneshot::Sender<florence::Result<Output>>,
    tokens: Option<async_mpsc::UnboundedSender<Vec<u32>>>,
    joined: Instant,
}

impl InFlight {
    fn gone(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Starts the model's thread. It runs until every sender of `submissions` is dropped and the
/// batch is empty, so dropping the sender drains the requests in flight.
pub fn spawn(
    model: Arc<Florence>,
    submissions: mpsc::Receiver<Submission>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("florence-model".into())
        .spawn(move || run(&model, &submissions, max_batch, &metrics))
        .expect("the model thread starts")
}

fn run(model: &Florence, submissions: &mpsc::Receiver<Submission>, max_batch: usize, metrics: &Metrics) {
    // `serve` refuses a model off the CPU kernels before it is ready; nothing is queued then.
    let Ok(mut batch) = RunningBatch::<u64>::new(model) else {
        return;
    };
    let mut in_flight: HashMap<u64, InFlight> = Default::default();
    let mut next_key = 0u64;
    loop {
        let mut arrived = Vec::new();
        if batch.is_empty() {
            match submissions.recv() {
                Ok(s) => arrived.push(s),
                Err(_) => return,
            }
        }
        while batch.len() + arrived.len() < max_batch {
            match submissions.try_recv() {
                Ok(s) => arrived.push(s),
                Err(_) => break,
            }
        }
        let mut joining = Vec::with_capacity(arrived.len());
        for s in arrived {
            metrics.queue_depth.dec();
            if s.reply.is_closed() {
                continue;
            }
            let key = next_key;
            next_key += 1;
            metrics.queue_seconds.observe(s.admitted.elapsed().as_secs_f64());
            in_flight.insert(
                key,
                InFlight {
                    reply: s.reply,
                    tokens: s.tokens,
                    joined: Instant::now(),
                },
            );
            joining.push(Joining {
                key,
                image: s.image,
                task: s.task,
                generation: s.generation,
            });
        }
        let events = guarded(&mut batch, |b| Ok(b.join(joining)));
        settle(events, &mut batch, &mut in_flight, metrics);
        if batch.is_empty() {
            continue;
        }
        metrics.batch_size.observe(batch.len() as f64);
        let events = guarded(&mut batch, |b| b.step());
        settle(events, &mut batch, &mut in_flight, metrics);
    }
}

/// Delivers `events`, then drops the images whose caller went away. A request that is neither
/// in the batch nor answered (lost to a bug) has its reply channel closed, which its handler
/// reports.
fn settle(
    events: Vec<Event<u64>>,
    batch: &mut RunningBatch<u64>,
    in_flight: &mut HashMap<u64, InFlight>,
    metrics: &Metrics,
) {
    deliver(events, in_flight, metrics);
    batch.retain(|key| in_flight.get(key).is_some_and(|f| !f.gone()));
    let live: HashSet<u64> = batch.keys().copied().collect();
    in_flight.retain(|key, _| live.contains(key));
    metrics.batch_images.set(batch.len() as i64);
}

/// Runs `f` on the batch; a panic (a bug) fails every image of the batch instead of the server.
fn guarded<'m>(
    batch: &mut RunningBatch<'m, u64>,
    f: impl FnOnce(&mut RunningBatch<'m, u64>) -> florence::Result<Vec<Event<u64>>>,
) -> Vec<Event<u64>> {
    let keys: Vec<u64> = batch.keys().copied().collect();
    match catch_unwind(AssertUnwindSafe(|| f(batch))) {
        Ok(Ok(events)) => events,
        Ok(Err(e)) => fail_all(batch, keys, &e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            fail_all(batch, keys, &format!("the model failed on this batch: {what}"))
        }
    }
}

fn fail_all(batch: &mut RunningBatch<u64>, keys: Vec<u64>, reason: &str) -> Vec<Event<u64>> {
    batch.retain(|_| false);
    keys.into_iter()
        .map(|key| Event::Done {
            key,
            output: Err(florence::Error::internal(reason)),
        })
        .collect()
}

fn deliver(events: Vec<Event<u64>>, in_flight: &mut HashMap<u64, InFlight>, metrics: &Metrics) {
    for event in events {
        match event {
            Event::Token { key, ids } => {
                if let Some(tokens) = in_flight.get(&key).and_then(|f| f.tokens.as_ref()) {
                    let _ = tokens.send(ids);
                }
            }
            Event::Done { key, output } => {
                let Some(f) = in_flight.remove(&key) else { continue };
                metrics.model_seconds.observe(f.joined.elapsed().as_secs_f64());
                if let Ok(out) = &output {
                    metrics.images.inc();
                    metrics.tokens.inc_by(out.ids.len().saturating_sub(1) as u64);
                }
                let _ = f.reply.send(output);
            }
        }
    }
}
