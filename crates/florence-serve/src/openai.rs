//! `POST /v1/chat/completions`: the OpenAI vision request and reply, streamed as server-sent
//! events with `stream: true`.
//!
//! The last user message carries one image as a `data:` URL and, optionally, text: a task token
//! (`<MORE_DETAILED_CAPTION>`; one that takes an input has it after the token, as in
//! `<CAPTION_TO_PHRASE_GROUNDING>a green car`) or a free prompt; without text, the server's
//! default task. The caption is `choices[0].message.content`; structured tasks give their JSON.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use florence::{GenerationRequest, Output, SamplingRequest, Task};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::request::{self, Job, Pending};
use crate::AppState;

/// The fields of a chat request that matter here; the rest of the OpenAI request is accepted
/// and ignored.
#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    n: Option<usize>,
    /// Not OpenAI's: beams of beam search (1: greedy search or plain sampling).
    num_beams: Option<usize>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    /// A string (text only) or a list of parts; parsed when used, for errors that name the part.
    content: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize)]
struct ImageUrl {
    url: String,
}

impl ChatRequest {
    /// The image and the text of the last user message.
    fn image_and_text(&self) -> Result<(String, String), ApiError> {
        let message = self
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .ok_or_else(|| ApiError::bad_param("messages", "no user message; send one with an image_url part"))?;
        let parts: Vec<Part> = match &message.content {
            Some(parts @ Value::Array(_)) => serde_json::from_value(parts.clone())
                .map_err(|e| ApiError::bad_param("messages", format!("bad content part in the user message: {e}")))?,
            _ => {
                return Err(ApiError::bad_param(
                    "messages",
                    "the user message has no image: send content as parts with one {\"type\": \"image_url\"}",
                ))
            }
        };
        let mut images = parts.iter().filter_map(|p| match p {
            Part::ImageUrl { image_url } => Some(image_url.url.clone()),
            Part::Text { .. } => None,
        });
        let image = images.next().ok_or_else(|| {
            ApiError::bad_param(
                "messages",
                "the user message has no image_url part; Florence-2 needs an image",
            )
        })?;
        if images.next().is_some() {
            return Err(ApiError::bad_param(
                "messages",
                "one image per request; send the others separately",
            ));
        }
        let text: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                Part::ImageUrl { .. } => None,
            })
            .collect();
        Ok((image, text.join(" ")))
    }

    /// Sampling when a temperature above 0 or a `top_p` is asked for; otherwise the model's
    /// deterministic search, as the CLI.
    fn generation(&self) -> Result<GenerationRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_param("n", "n must be 1: one caption per request"));
        }
        let sample = self.temperature.is_some_and(|t| t > 0.0) || self.top_p.is_some();
        Ok(GenerationRequest {
            num_beams: self.num_beams,
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
            sampling: sample.then(|| SamplingRequest {
                temperature: self.temperature.filter(|&t| t > 0.0),
                top_p: self.top_p,
                seed: self.seed.unwrap_or(0),
                ..SamplingRequest::default()
            }),
            ..GenerationRequest::default()
        })
    }
}

/// The task a chat message's text asks for: a task token (with its input after it), a free
/// prompt, or, with no text, `default`.
pub fn task_from_text(text: &str, default: &str) -> Result<Task, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return request::task(default, None, "messages");
    }
    let token_end = text
        .strip_prefix('<')
        .and_then(|rest| rest.find('>'))
        .map(|i| i + 2)
        .filter(|&end| request::is_task_token(&text[..end]));
    let Some(end) = token_end else {
        return request::task(text, None, "messages");
    };
    let (token, input) = (&text[..end], text[end..].trim());
    let needs_input = florence::tasks::TASKS
        .iter()
        .any(|t| t.token == token && t.needs_input());
    if needs_input && input.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            format!("task {token} needs a text input after it, e.g. \"{token}a green car\""),
        ));
    }
    request::task(token, (!input.is_empty()).then_some(input), "messages")
}

/// The reply's content: the text, or a structured task's JSON.
pub fn content(output: &Output) -> String {
    match output.result.text() {
        Some(text) => text.to_string(),
        None => serde_json::to_string(&output.result).expect("results serialize"),
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let (admitted, ready) = request::admit(&state)?;
    let bytes = request::read_body(body, state.config.max_body_bytes).await?;
    let chat: ChatRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request is not a valid chat completion request: {e}")))?;
    let (image, text) = chat.image_and_text()?;
    let job = Job {
        image: request::image_bytes(&image, "messages", false)?,
        task: task_from_text(&text, &state.config.default_task)?,
        generation: chat.generation()?,
    };
    let include_usage = chat.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let pending = request::submit(&state, ready, admitted, job, chat.stream).await?;
    let reply = Reply::new(&state);
    if chat.stream {
        return Ok(stream(state, pending, reply, include_usage).into_response());
    }
    let mut pending = pending;
    let output = pending.result(&state).await?;
    Ok(Json(reply.completion(&pending, &output)).into_response())
}

/// What every reply of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn new(state: &AppState) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: format!("chatcmpl-{}-{}", state.started, NEXT.fetch_add(1, Ordering::Relaxed)),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.config.model_id.clone(),
        }
    }

    fn usage(pending: &Pending, output: &Output) -> Value {
        let completion = output.ids.len().saturating_sub(1);
        json!({
            "prompt_tokens": pending.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": pending.prompt_tokens + completion,
        })
    }

    /// `stop`, or `length` when the caption was cut at `max_tokens`.
    fn finish_reason(pending: &Pending, output: &Output) -> &'static str {
        if output.ids.len() > pending.generation.max_new_tokens {
            "length"
        } else {
            "stop"
        }
    }

    fn completion(&self, pending: &Pending, output: &Output) -> Value {
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content(output)},
                "finish_reason": Self::finish_reason(pending, output),
            }],
            "usage": Self::usage(pending, output),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Event {
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        Event::default().data(chunk.to_string())
    }
}

/// The reply as server-sent events: the role, the caption as it grows (greedy search and
/// sampling; beam search knows it only at the end), the finish reason, the usage when asked,
/// then `[DONE]`. A client that goes away cancels the request.
fn stream(
    state: Arc<AppState>,
    mut pending: Pending,
    reply: Reply,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let send = |event: Event| {
            let tx = tx.clone();
            async move { tx.send(event).await.is_ok() }
        };
        if !send(reply.chunk(json!({"role": "assistant", "content": ""}), None)).await {
            return;
        }
        let mut sent = String::new();
        let model = state.ready.get().map(|r| r.model.clone());
        if let (Some(mut tokens), Some(model)) = (pending.tokens.take(), model) {
            loop {
                let ids = tokio::select! {
                    ids = tokens.recv() => match ids {
                        Some(ids) => ids,
                        None => break,
                    },
                    // The client went away: dropping the request takes it out of the batch.
                    _ = tx.closed() => return,
                };
                let Ok(partial) = model.output(ids, &pending.task, pending.size) else {
                    continue;
                };
                let Some(text) = partial.result.text() else { continue };
                // A partial character (a byte-level token cut in two) waits for the next token.
                if text.ends_with('\u{FFFD}') || !text.starts_with(sent.as_str()) || text.len() == sent.len() {
                    continue;
                }
                let delta = text[sent.len()..].to_string();
                sent = text.to_string();
                if !send(reply.chunk(json!({"content": delta}), None)).await {
                    return;
                }
            }
        }
        let result = tokio::select! {
            r = pending.result(&state) => r,
            _ = tx.closed() => return,
        };
        let events = match result {
            Ok(output) => {
                let text = content(&output);
                let mut events = Vec::new();
                if let Some(rest) = text.strip_prefix(sent.as_str()).filter(|r| !r.is_empty()) {
                    events.push(reply.chunk(json!({"content": rest}), None));
                }
                events.push(reply.chunk(json!({}), Some(Reply::finish_reason(&pending, &output))));
                if include_usage {
                    let usage = json!({
                        "id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                        "model": reply.model, "choices": [], "usage": Reply::usage(&pending, &output),
                    });
                    events.push(Event::default().data(usage.to_string()));
                }
                events
            }
            Err(e) => vec![Event::default().data(e.body().to_string())],
        };
        for event in events.into_iter().chain([Event::default().data("[DONE]")]) {
            if !send(event).await {
                return;
            }
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Sse::new(events).keep_alive(KeepAlive::default())
}
