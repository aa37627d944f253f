//! The path every captioning request takes, whichever route it came by: admission, the body
//! read within its limit, the image decoded and resized off the model's thread, the settings
//! checked, then a place in the batch and the wait for the result.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use florence::{GenerationConfig, GenerationRequest, Output, Task};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::error::ApiError;
use crate::scheduler::Submission;
use crate::{AppState, Ready};

/// Standard base64, with or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A request that was let in: it holds its place until it ends.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    at: Instant,
}

/// Lets a request in, or answers 503: the model is still loading, or `max_batch_size` requests
/// run and `max_queue` wait already. Nothing of the request has been read yet.
pub fn admit(state: &AppState) -> Result<(Admitted, &Ready), ApiError> {
    let ready = state
        .ready
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading; retry in a moment"))?;
    let permit = state.admission.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(format!(
            "the server is at capacity ({} requests running and {} waiting); retry later",
            state.config.max_batch_size, state.config.max_queue
        ))
    })?;
    Ok((
        Admitted {
            _permit: permit,
            at: Instant::now(),
        },
        ready,
    ))
}

/// Reads the body, refusing one over `--max-body-bytes` with 413.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| too_large_or(limit, &e.to_string()))
}

/// 413 for a body over the limit, 400 for a body that could not be read.
pub fn too_large_or(limit: usize, error: &str) -> ApiError {
    if error.contains("length limit") {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the server's --max-body-bytes of {limit} bytes; send a smaller image"
            ),
        )
    } else {
        ApiError::bad_request(format!("cannot read the request body: {error}"))
    }
}

/// The bytes of an image given as a `data:` URL, or (where `bare` allows) as plain base64.
/// Other URLs are refused: the server fetches nothing.
pub fn image_bytes(value: &str, param: &'static str, bare: bool) -> Result<Vec<u8>, ApiError> {
    let value = value.trim();
    let payload = if let Some(rest) = value.strip_prefix("data:") {
        let (meta, payload) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::bad_param(param, "a data: URL without a comma before its data"))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad_param(
                param,
                "the data: URL is not base64; send data:image/png;base64,...",
            ));
        }
        payload
    } else if value.contains("://") || !bare {
        return Err(ApiError::bad_param(
            param,
            "only data: URLs are accepted (data:image/jpeg;base64,...); the server does not fetch URLs",
        ));
    } else {
        value
    };
    let compact: Vec<u8> = payload.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    BASE64
        .decode(compact)
        .map_err(|e| ApiError::bad_param(param, format!("the image is not valid base64: {e}")))
}

/// Whether `text` has the shape of a task token: `<` capitals and underscores `>`.
pub fn is_task_token(text: &str) -> bool {
    text.len() > 2
        && text.starts_with('<')
        && text.ends_with('>')
        && text[1..text.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'_')
}

/// The task `name` with `input`: a task token, or a free prompt (as the CLI's `--task`). Text
/// shaped like a task token that names none is refused, listing the tasks.
pub fn task(name: &str, input: Option<&str>, param: &'static str) -> Result<Task, ApiError> {
    let tasks = florence::tasks::TASKS;
    if is_task_token(name) && !tasks.iter().any(|t| t.token == name) {
        let known: Vec<&str> = tasks.iter().map(|t| t.token).collect();
        return Err(ApiError::bad_param(
            param,
            format!("unknown task {name}; the tasks are {}", known.join(", ")),
        ));
    }
    Task::new(name, input).map_err(|e| ApiError::bad_param(param, e.to_string()))
}

/// A request parsed and checked, ready for the model.
pub struct Job {
    /// The encoded image.
    pub image: Vec<u8>,
    /// What to run.
    pub task: Task,
    /// Settings over the model's own.
    pub generation: GenerationRequest,
}

/// A request in the batch.
pub struct Pending {
    reply: oneshot::Receiver<florence::Result<Output>>,
    /// The tokens so far after each step (one-row searches asked to stream).
    pub tokens: Option<mpsc::UnboundedReceiver<Vec<u32>>>,
    admitted: Admitted,
    /// The settings it runs with.
    pub generation: GenerationConfig,
    /// What it runs.
    pub task: Task,
    /// The original image's size.
    pub size: (u32, u32),
    /// Text tokens of the prompt.
    pub prompt_tokens: usize,
}

/// Checks the settings, decodes the image on a blocking thread, and puts the request in the
/// batch's queue.
pub async fn submit(
    state: &Arc<AppState>,
    ready: &Ready,
    admitted: Admitted,
    job: Job,
    stream: bool,
) -> Result<Pending, ApiError> {
    let model = ready.model.clone();
    let generation = job.generation.resolve(&ready.defaults);
    generation
        .validate(model.max_decoder_positions())
        .map_err(|e| ApiError::from_florence(&e))?;
    let prompt_tokens = model
        .tokenizer()
        .encode(&job.task.prompt)
        .map_err(|e| ApiError::from_florence(&e))?
        .len();
    let decode = state.config.decode;
    let prepared = tokio::task::spawn_blocking(move || {
        let image = florence::preprocess::decode_image(&job.image, &decode)
            .map_err(|reason| ApiError::bad_param("image", format!("cannot read the image: {reason}")))?;
        Ok::<_, ApiError>(model.processor().prepare(&image))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("decoding the image failed: {e}"),
        )
    })??;
    let size = (prepared.width, prepared.height);
    let (reply_tx, reply) = oneshot::channel();
    let (tokens_tx, tokens) = if stream && generation.num_beams == 1 {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let submission = Submission {
        image: prepared,
        task: job.task.clone(),
        generation: generation.clone(),
        reply: reply_tx,
        tokens: tokens_tx,
        admitted: admitted.at,
    };
    // Counted before it is sent: the model's thread counts it out when it takes it.
    state.metrics.queue_depth.inc();
    let sent = ready
        .submit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|tx| tx.send(submission).is_ok());
    if sent != Some(true) {
        state.metrics.queue_depth.dec();
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    Ok(Pending {
        reply,
        tokens,
        admitted,
        generation,
        task: job.task,
        size,
        prompt_tokens,
    })
}

impl Pending {
    /// Waits for the result until the request's deadline (`--timeout-s` after admission).
    pub async fn result(&mut self, state: &AppState) -> Result<Output, ApiError> {
        let deadline = tokio::time::Instant::from_std(self.admitted.at + state.config.timeout);
        match tokio::time::timeout_at(deadline, &mut self.reply).await {
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the caption took longer than the server's --timeout-s of {} s; ask for fewer tokens or retry",
                    state.config.timeout.as_secs_f64()
                ),
            )),
            Ok(Err(_)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model dropped the request (a bug; see the server's log)",
            )),
            Ok(Ok(result)) => result.map_err(|e| ApiError::from_florence(&e)),
        }
    }
}
