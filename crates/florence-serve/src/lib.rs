//! `florence serve`: a Florence-2 model over HTTP, loaded once and shared by every client.
//!
//! Routes ([`routes`]): `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (the
//! OpenAI vision request, streamed with `stream: true`), `POST /v1/caption` (the record `florence
//! caption --format jsonl` prints), `GET /metrics` (Prometheus text).
//!
//! Requests run batched across clients ([`scheduler`]): concurrent requests join the running
//! generation between two decoding steps and leave it when their caption is done, with the
//! tokens each would get alone. Admission is decided before anything is read: at most
//! `max_batch_size` requests run and `max_queue` wait; the next one gets 503 with `Retry-After`.

#![warn(missing_docs)]

mod caption;
mod error;
pub mod metrics;
mod openai;
mod request;
pub mod routes;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use florence::preprocess::DecodeOptions;
use florence::{Error, Florence, GenerationConfig};
use tokio::sync::Semaphore;

pub use error::ApiError;

/// How the server runs: where it listens, its limits, and what it answers with by default.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`127.0.0.1:8000`).
    pub addr: SocketAddr,
    /// The model's id in `/v1/models` and in replies.
    pub model_id: String,
    /// How the weights are held, for the records' `generation.weights`.
    pub weights: String,
    /// Most images in the running batch.
    pub max_batch_size: usize,
    /// Most requests admitted beyond those in the batch; the next gets 503.
    pub max_queue: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// How images are decoded (the pixel limit among them).
    pub decode: DecodeOptions,
    /// Longest a request may take, queue included (504 beyond).
    pub timeout: Duration,
    /// Requests to `/v1/*` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The task of chat requests whose text names none.
    pub default_task: String,
}

impl ServeConfig {
    /// The defaults: 127.0.0.1:8000, batches of 8, a queue of 64, 20 MiB bodies, 5 minutes.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            model_id: model_id.into(),
            weights: "f32".into(),
            max_batch_size: 8,
            max_queue: 64,
            max_body_bytes: 20 << 20,
            decode: DecodeOptions::default(),
            timeout: Duration::from_secs(300),
            api_key: None,
            default_task: "<CAPTION>".into(),
        }
    }
}

/// The loaded model and the way to its thread.
struct Ready {
    model: Arc<Florence>,
    defaults: GenerationConfig,
    /// Taken (closing the channel) when the server stops, so the thread drains and ends.
    submit: Mutex<Option<mpsc::Sender<scheduler::Submission>>>,
}

/// What every handler shares.
pub struct AppState {
    config: ServeConfig,
    metrics: Arc<metrics::Metrics>,
    ready: OnceLock<Ready>,
    /// One permit per request admitted (running or waiting).
    admission: Arc<Semaphore>,
    /// Unix time the server started (the model's `created`).
    started: u64,
}

impl AppState {
    fn new(config: ServeConfig) -> Self {
        let permits = config.max_batch_size + config.max_queue;
        Self {
            config,
            metrics: Arc::default(),
            ready: OnceLock::new(),
            admission: Arc::new(Semaphore::new(permits)),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Starts the model's thread over `model`; from then on requests are served.
    fn set_ready(&self, model: Florence) {
        let model = Arc::new(model);
        let (tx, rx) = mpsc::channel();
        scheduler::spawn(model.clone(), rx, self.config.max_batch_size, self.metrics.clone());
        let _ = self.ready.set(Ready {
            defaults: model.generation_config().clone(),
            model,
            submit: Mutex::new(Some(tx)),
        });
    }

    /// Closes the way to the model's thread: it finishes the batch and ends.
    fn close(&self) {
        if let Some(ready) = self.ready.get() {
            ready.submit.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// Listens on `config.addr`, loads the model with `load` (meanwhile `/health` answers 503), and
/// serves until Ctrl-C or SIGTERM: then it stops accepting, finishes the requests in flight and
/// returns. `on_listening` is told the address (with the port the OS chose for port 0).
pub fn serve(
    config: ServeConfig,
    load: impl FnOnce() -> florence::Result<Florence> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> florence::Result<()> {
    if config.max_batch_size == 0 {
        return Err(Error::usage("--max-batch-size must be at least 1"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The model has its own threads; these only move bytes and decode images.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the server's runtime: {e}")))?;
    runtime.block_on(async move {
        let addr = config.addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::usage(format!("cannot listen on {addr}: {e}; pick another --host or --port")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("the listening socket has no address: {e}")))?;
        on_listening(local);
        let state = Arc::new(AppState::new(config));
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Error>();
        let loading = state.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            // Batching across requests needs the CPU kernels: a GPU model is refused here.
            let loaded = load().and_then(|model| {
                model.network()?;
                Ok(model)
            });
            match loaded {
                Ok(model) => {
                    loading.set_ready(model);
                    eprintln!("model loaded in {:.1} s; ready", started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        });
        let app = routes::router(state.clone());
        let failure = Arc::new(Mutex::new(None));
        let failure_slot = failure.clone();
        let shutdown = async move {
            tokio::select! {
                _ = shutdown_signal() => eprintln!("stopping: finishing the requests in flight"),
                Ok(e) = failed_rx => {
                    failure_slot.lock().unwrap_or_else(|p| p.into_inner()).replace(e);
                }
            }
        };
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        state.close();
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        served.map_err(|e| Error::internal(format!("the server failed: {e}")))
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
