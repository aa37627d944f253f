//! The routes, the API key check on `/v1/*`, and the request counts by route and status.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::AppState;

/// Every route over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(crate::openai::chat_completions))
        .route("/v1/caption", post(crate::caption::caption))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed (a bug; see the server's log)",
            )
            .into_response()
        }))
        .with_state(state)
}

/// `GET /health`: 200 once the model is loaded, 503 before.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.get().is_some() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    }
}

/// `GET /v1/models`: the one model, in OpenAI's list shape.
async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.config.model_id, "object": "model", "created": state.started, "owned_by": "florence"}],
    }))
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}; the routes are GET /health, GET /v1/models, POST /v1/chat/completions, \
             POST /v1/caption, GET /metrics",
            request.method(),
            request.uri().path()
        ),
    )
}

/// With an API key, requests must carry `Authorization: Bearer KEY` (compared in constant time).
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            // Read what the client sends (within the body limit) before answering: a connection
            // closed under a client still writing its body gives it a broken pipe, not the 401.
            let _ = axum::body::to_bytes(request.into_body(), state.config.max_body_bytes).await;
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Counts each request by route and status; one whose client went away before the answer
/// counts as 499 (nginx's "client closed request").
async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let mut counted = Counted {
        state: state.clone(),
        route,
        status: 499,
    };
    let response = next.run(request).await;
    counted.status = response.status().as_u16();
    response
}

/// Counts its request when dropped: after the answer, or when the handler is cancelled.
struct Counted {
    state: Arc<AppState>,
    route: String,
    status: u16,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.state.metrics.request(&self.route, self.status);
    }
}
