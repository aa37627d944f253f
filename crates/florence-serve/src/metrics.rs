//! `GET /metrics`: Prometheus text. Rates (images/s, tokens/s) are what Prometheus derives from
//! the counters: `rate(florence_images_total[1m])`, `rate(florence_generated_tokens_total[1m])`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

/// Everything the server counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Requests admitted and not yet in the running batch (decoding their image, or waiting).
    pub queue_depth: Gauge,
    /// Images in the running batch.
    pub batch_images: Gauge,
    /// Images per decoding step.
    pub batch_size: Histogram,
    /// Seconds from admission to joining the batch.
    pub queue_seconds: Histogram,
    /// Seconds from joining the batch to the result.
    pub model_seconds: Histogram,
    /// Images captioned.
    pub images: Counter,
    /// Tokens generated (the decoder start token not counted).
    pub tokens: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("florence");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests admitted and waiting to join the batch",
            queue_depth.clone(),
        );
        let batch_images = Gauge::default();
        registry.register("batch_images", "Images in the running batch", batch_images.clone());
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register("batch_size", "Images per decoding step", batch_size.clone());
        let queue_seconds = Histogram::new(exponential_buckets(0.001, 2.5, 14));
        registry.register(
            "queue_seconds",
            "Time from admission to joining the batch",
            queue_seconds.clone(),
        );
        let model_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "model_seconds",
            "Time from joining the batch to the result",
            model_seconds.clone(),
        );
        let images = Counter::default();
        registry.register("images", "Images captioned", images.clone());
        let tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated", tokens.clone());
        Self {
            registry,
            requests,
            queue_depth,
            batch_images,
            batch_size,
            queue_seconds,
            model_seconds,
            images,
            tokens,
        }
    }
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
