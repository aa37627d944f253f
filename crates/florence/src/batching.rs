//! Continuous batching: images join a running generation at any decoding step and leave it as
//! soon as their search is over, so that a server keeps one batch busy with whatever requests
//! are in flight.
//!
//! Images that join together are encoded together (one vision pass, one text-encoder pass per
//! prompt); then every step feeds the rows of all images in the batch to the decoder at once,
//! whatever their position, prompt or beam count. Each image has its own decoder cache and its
//! own search, and every kernel computes a row the same way whatever rows are beside it, so an
//! image's tokens are those it gets alone.
//!
//! ```no_run
//! use florence::batching::{Joining, RunningBatch, Event};
//! use florence::{Florence, LoadOptions, Task};
//!
//! # fn main() -> florence::Result<()> {
//! let model = Florence::load("Florence-2-base".as_ref(), &LoadOptions::default())?;
//! let image = model.processor().prepare(&florence::preprocess::load_image("a.jpg".as_ref())?);
//! let mut batch = RunningBatch::new(&model)?;
//! let task = Task::new("<CAPTION>", None)?;
//! batch.join(vec![Joining { key: "a", image, task, generation: model.generation_config().clone() }]);
//! while !batch.is_empty() {
//!     for event in batch.step()? {
//!         if let Event::Done { key, output } = event {
//!             println!("{key}: {}", output?.result);
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generation::{Advance, GenerationConfig, ImageSearch};
use crate::language::SequenceCache;
use crate::preprocess::PreparedImage;
use crate::tasks::Task;
use crate::{on_pool_thread, Florence, Florence2, Output};

/// An image that asks to join the batch.
#[derive(Debug, Clone)]
pub struct Joining<K> {
    /// The caller's name for it, returned with its events.
    pub key: K,
    /// The image, prepared at the model's size.
    pub image: PreparedImage,
    /// What to run on it.
    pub task: Task,
    /// How to generate (checked on joining).
    pub generation: GenerationConfig,
}

/// What happened to an image during a step.
#[derive(Debug)]
pub enum Event<K> {
    /// A one-row search (greedy or sampling) chose a token: `ids` is its sequence so far,
    /// decoder start token first, and begins its result.
    Token {
        /// The image.
        key: K,
        /// The tokens so far.
        ids: Vec<u32>,
    },
    /// The image's generation is over and it left the batch (or it could not join).
    Done {
        /// The image.
        key: K,
        /// Its result, or why it failed.
        output: Result<Output>,
    },
}

/// One image in the batch.
struct Entry<K> {
    key: K,
    task: Task,
    size: (u32, u32),
    search: ImageSearch,
    cache: SequenceCache,
}

/// A generation that images join and leave at any step.
pub struct RunningBatch<'m, K> {
    model: &'m Florence,
    network: &'m Florence2,
    entries: Vec<Entry<K>>,
}

impl<'m, K: Clone> RunningBatch<'m, K> {
    /// An empty batch over `model`, which must run on the CPU kernels (the searches of a
    /// running batch keep one cache per image there).
    pub fn new(model: &'m Florence) -> Result<Self> {
        Ok(Self {
            model,
            network: model.network()?,
            entries: Vec::new(),
        })
    }

    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no image is in the batch.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The keys of the images in the batch.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|e| &e.key)
    }

    /// Decoder rows of the batch (beams of all its images).
    pub fn rows(&self) -> usize {
        self.entries.iter().map(|e| e.search.rows()).sum()
    }

    /// Encodes `joining` together and adds the images to the batch; they take part from the
    /// next [`step`](Self::step). Images that cannot join (settings that do not fit the model,
    /// a prompt too long) come back as [`Event::Done`] with the error.
    pub fn join(&mut self, joining: Vec<Joining<K>>) -> Vec<Event<K>> {
        let (model, network) = (self.model, self.network);
        let max_positions = model.max_decoder_positions();
        let mut refused = Vec::new();
        let mut accepted = Vec::with_capacity(joining.len());
        for j in joining {
            match j.generation.validate(max_positions) {
                Ok(()) => accepted.push(j),
                Err(e) => refused.push(Event::Done {
                    key: j.key,
                    output: Err(e),
                }),
            }
        }
        if accepted.is_empty() {
            return refused;
        }
        let images: Vec<PreparedImage> = accepted.iter().map(|j| j.image.clone()).collect();
        let features = on_pool_thread(|| -> Result<Tensor> {
            let features = network.vision_features(&model.stack(&images)?)?;
            network.settle_memory();
            network.project(&features)
        });
        let features = match features {
            Ok(f) => f,
            Err(e) => {
                let reason = e.to_string();
                refused.extend(accepted.into_iter().map(|j| Event::Done {
                    key: j.key,
                    output: Err(Error::internal(reason.clone())),
                }));
                return refused;
            }
        };
        // One text-encoder pass per prompt.
        let mut by_prompt: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, j) in accepted.iter().enumerate() {
            by_prompt.entry(j.task.prompt.clone()).or_default().push(i);
        }
        let mut caches: Vec<Option<Result<SequenceCache>>> = (0..accepted.len()).map(|_| None).collect();
        for (prompt, members) in by_prompt {
            let rows: Vec<usize> = members.iter().map(|&i| accepted[i].generation.num_beams).collect();
            let started = on_pool_thread(|| start_group(model, &features, &prompt, &members, &rows));
            match started {
                Ok(group) => {
                    for (i, cache) in members.into_iter().zip(group) {
                        caches[i] = Some(Ok(cache));
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    for i in members {
                        caches[i] = Some(Err(Error::usage(reason.clone())));
                    }
                }
            }
        }
        for (j, cache) in accepted.into_iter().zip(caches) {
            match cache.expect("every image belongs to one prompt group") {
                Ok(cache) => self.entries.push(Entry {
                    key: j.key,
                    size: (j.image.width, j.image.height),
                    search: ImageSearch::new(&j.generation),
                    task: j.task,
                    cache,
                }),
                Err(e) => refused.push(Event::Done {
                    key: j.key,
                    output: Err(e),
                }),
            }
        }
        refused
    }

    /// Removes the images for which `keep` is false (a client that went away), without a result.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|e| keep(&e.key));
    }

    /// One decoding step for every image in the batch. Returns a [`Event::Token`] for each
    /// one-row search that goes on, and a [`Event::Done`] for each image that finished and left.
    /// An error of the step itself (a bug) fails every image of the batch, which is emptied.
    pub fn step(&mut self) -> Result<Vec<Event<K>>> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let (model, network) = (self.model, self.network);
        let tokens: Vec<u32> = self.entries.iter().flat_map(|e| e.search.tokens()).collect();
        let logits = {
            let mut caches: Vec<&mut SequenceCache> = self.entries.iter_mut().map(|e| &mut e.cache).collect();
            on_pool_thread(|| network.decode_step(&tokens, &mut caches))
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let reason = e.to_string();
                return Ok(self
                    .entries
                    .drain(..)
                    .map(|e| Event::Done {
                        key: e.key,
                        output: Err(Error::internal(reason.clone())),
                    })
                    .collect());
            }
        };
        let mut logits = logits.into_iter();
        let mut events = Vec::new();
        let mut kept = Vec::with_capacity(self.entries.len());
        for mut e in self.entries.drain(..) {
            let rows: Vec<Vec<f32>> = logits.by_ref().take(e.search.rows()).collect();
            let advanced = e.search.advance(rows).and_then(|a| match a {
                Advance::Continue { reorder: Some(order) } => e.cache.reorder(&order).map(|()| false),
                Advance::Continue { reorder: None } => Ok(false),
                Advance::Done => Ok(true),
            });
            match advanced {
                Ok(false) => {
                    kept.push(e);
                }
                Ok(true) => {
                    let ids = e.search.into_sequence();
                    let output = model.output(ids, &e.task, e.size);
                    events.push(Event::Done { key: e.key, output });
                }
                Err(err) => events.push(Event::Done {
                    key: e.key,
                    output: Err(err),
                }),
            }
        }
        for e in &kept {
            if let Some(ids) = e.search.partial() {
                events.push(Event::Token {
                    key: e.key.clone(),
                    ids: ids.to_vec(),
                });
            }
        }
        self.entries = kept;
        Ok(events)
    }
}

/// Encodes the images `members` of `features` under `prompt` and starts their caches, with
/// `rows[i]` rows for member `i`.
fn start_group(
    model: &Florence,
    features: &Tensor,
    prompt: &str,
    members: &[usize],
    rows: &[usize],
) -> Result<Vec<SequenceCache>> {
    let network = model.network()?;
    let ids = model.tokenizer().encode(prompt)?;
    let index = Tensor::new(members.iter().map(|&i| i as u32).collect::<Vec<_>>(), features.device())?;
    let memory = network.encode(&features.index_select(&index, 0)?, &ids)?;
    rows.iter()
        .enumerate()
        .map(|(i, &rows)| {
            let mut one = network.start_sequences(&memory.narrow(0, i, 1)?, rows)?;
            Ok(one.pop().expect("one cache per image"))
        })
        .collect()
}
