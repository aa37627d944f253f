//! `POST /v1/caption`: our own request, with the CLI's settings, answered with the record
//! `florence caption --format jsonl` prints for the image.
//!
//! The body is JSON (`{"image": BASE64 or data: URL, "task": ..., "num_beams": ...}`) or a
//! multipart form (an `image` file and the same fields as text).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::Json;
use florence::{GenerationRequest, SamplingRequest};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::request::{self, Job};
use crate::AppState;

/// The request: the image and the flags of `florence caption`, by their names with `_`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionRequest {
    /// Base64, or a `data:` URL (JSON bodies; a multipart form sends the file).
    #[serde(default)]
    image: Option<String>,
    /// Named in the record's `path`.
    path: Option<String>,
    task: Option<String>,
    text_input: Option<String>,
    num_beams: Option<usize>,
    max_new_tokens: Option<usize>,
    min_new_tokens: Option<usize>,
    #[serde(default)]
    do_sample: bool,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    #[serde(default)]
    seed: u64,
}

impl CaptionRequest {
    fn generation(&self) -> Result<GenerationRequest, ApiError> {
        let sampling_fields = [
            ("temperature", self.temperature.is_some()),
            ("top_k", self.top_k.is_some()),
            ("top_p", self.top_p.is_some()),
            ("min_p", self.min_p.is_some()),
        ];
        if let Some((name, _)) = sampling_fields.iter().find(|(_, set)| *set).filter(|_| !self.do_sample) {
            return Err(ApiError::bad_param(name, format!("{name} needs \"do_sample\": true")));
        }
        Ok(GenerationRequest {
            num_beams: self.num_beams,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            sampling: self.do_sample.then_some(SamplingRequest {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
            }),
        })
    }
}

/// Fields of the form kept as text even when they look like numbers.
const TEXT_FIELDS: [&str; 3] = ["task", "text_input", "path"];

/// Reads a multipart form: the `image` file, and the other fields as the JSON request's.
async fn from_form(mut form: Multipart, limit: usize) -> Result<(CaptionRequest, Option<Vec<u8>>), ApiError> {
    let mut fields = Map::new();
    let mut image = None;
    let mut file_name = None;
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| request::too_large_or(limit, &e.body_text()))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        if name == "image" {
            file_name = field.file_name().map(str::to_string);
            let bytes = field
                .bytes()
                .await
                .map_err(|e| request::too_large_or(limit, &e.body_text()))?;
            image = Some(bytes.to_vec());
            continue;
        }
        let text = field
            .text()
            .await
            .map_err(|e| request::too_large_or(limit, &e.body_text()))?;
        let value = if TEXT_FIELDS.contains(&name.as_str()) {
            Value::String(text)
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        fields.insert(name, value);
    }
    if let Some(name) = file_name {
        fields.entry("path").or_insert(Value::String(name));
    }
    let parsed = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("bad form field: {e}")))?;
    Ok((parsed, image))
}

/// `POST /v1/caption`.
pub async fn caption(State(state): State<Arc<AppState>>, request: Request<Body>) -> Result<Json<Value>, ApiError> {
    let (admitted, ready) = request::admit(&state)?;
    let limit = state.config.max_body_bytes;
    let is_form = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (req, image) = if is_form {
        let form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request(format!("bad multipart form: {}", e.body_text())))?;
        from_form(form, limit).await?
    } else {
        let bytes = request::read_body(request.into_body(), limit).await?;
        let req: CaptionRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the request is not a valid caption request: {e}")))?;
        (req, None)
    };
    let image = match (image, &req.image) {
        (Some(bytes), None) => bytes,
        (None, Some(encoded)) => request::image_bytes(encoded, "image", true)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_param(
                "image",
                "send the image once: as a file or as base64",
            ))
        }
        (None, None) => {
            return Err(ApiError::bad_param(
                "image",
                "no image: send \"image\" as base64 or a form file",
            ))
        }
    };
    let task_name = req.task.as_deref().unwrap_or("<CAPTION>");
    let task = request::task(task_name, req.text_input.as_deref(), "task")?;
    let job = Job {
        image,
        task,
        generation: req.generation()?,
    };
    let mut pending = request::submit(&state, ready, admitted, job, false).await?;
    let output = pending.result(&state).await?;
    let generation = florence::pipeline::generation_json(&pending.generation, &state.config.weights);
    let caption = output.result.text().unwrap_or_default().to_string();
    Ok(Json(florence::pipeline::jsonl_record(
        req.path.as_deref(),
        &pending.task.name,
        &output,
        &caption,
        &state.config.model_id,
        &generation,
    )))
}
