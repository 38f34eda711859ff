//! The HTTP gateway: how records reach Freshet (or any Kafka-compatible cluster) from
//! the web, where no Kafka client exists. It owns the HTTP server and its routes —
//! `/ingest/{topic}` for web forms, the Confluent REST Proxy v2 API, live streams
//! (SSE), schemas, health and metrics — and the spool that keeps accepted records
//! while the cluster is away. It talks to the cluster only through the Kafka protocol
//! (librdkafka), whether it runs embedded in `freshet serve` or standalone as
//! `freshet gateway`.
//!
//! Codemap: `config` (settings and limits), `producer` (the acks=all idempotent
//! producer every accepted record goes through, in front of the spool), `spool` (the
//! on-disk spool), `ingest` (`POST /ingest/{topic}`, `Idempotency-Key`),
//! `rest_proxy` (REST Proxy v2 produce and topics), `consumers` (REST Proxy v2
//! consumer instances), `stream` (`GET /topics/{topic}/stream`, shared readers),
//! `schema` (per-topic JSON Schemas), `shared` (topics in the cluster that every
//! gateway follows: schemas, `Idempotency-Key` answers, pipeline definitions),
//! `pipelines` (`/pipelines`: definitions in the cluster, runs in threads), `ops` (`/health`, `/ready`, `/metrics`,
//! `/openapi.json`), `metrics`, `error` (the JSON error body), `console` (the web
//! console), `pages` (the user's static pages under `/pages/`).
//!
//! Architecture invariant: a `2xx` answer to a request that carries records means
//! every one of them is durable: acknowledged by the cluster with acks=all, or
//! fsync'd in the spool.

pub mod admin;
pub mod config;
pub mod console;
mod consumers;
mod error;
pub mod groups;
pub mod history;
mod ingest;
pub mod metrics;
mod ops;
mod pages;
pub mod pipelines;
pub mod producer;
pub mod rest_proxy;
pub mod schema;
mod shared;
pub mod spool;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::{watch, Semaphore};

pub use config::GatewayConfig;
pub use error::ApiError;
use producer::DurableProducer;

/// What every handler shares.
pub struct Gateway {
    pub config: GatewayConfig,
    pub producer: Arc<DurableProducer>,
    pub schemas: Arc<schema::Schemas>,
    pub metrics: metrics::Metrics,
    /// What the process adds to `GET /metrics` (`freshet serve`: its broker's).
    metric_sources: Vec<metrics::Source>,
    /// The metrics' recent past (`GET /metrics/history`).
    history: history::History,
    pub pipelines: Arc<pipelines::Pipelines>,
    streams: stream::Streams,
    consumers: consumers::Instances,
    idempotency: Arc<ingest::IdempotencyCache>,
    idempotency_topic: Arc<shared::SharedTopic>,
    requests: Arc<Semaphore>,
    /// Becomes `true` when the gateway starts shutting down; long-lived responses
    /// (streams) end when they see it.
    pub shutting_down: watch::Receiver<bool>,
}

/// A running gateway: its address, and the way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    gateway: Arc<Gateway>,
}

impl Running {
    /// Stops accepting, ends the streams, lets in-flight requests finish (up to
    /// `shutdown_timeout_ms`), then gives the cluster the same time to take what is
    /// queued; whatever it did not take stays in the spool for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let timeout = Duration::from_millis(self.gateway.config.shutdown_timeout_ms);
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            tracing::warn!("HTTP requests still running after the shutdown timeout; closing them");
            task.abort();
        }
        self.gateway.consumers.close_all().await;
        self.gateway.streams.stop_all();
        self.gateway.schemas.stop();
        self.gateway.idempotency_topic.stop();
        let pipelines = self.gateway.pipelines.clone();
        let _ = tokio::task::spawn_blocking(move || pipelines.stop_all()).await;
        self.gateway.producer.shutdown(timeout).await;
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }
}

/// Opens the spool (queueing what an earlier run left), loads the schemas, binds
/// `config.listen` and serves until [`Running::shutdown`].
pub async fn start(config: GatewayConfig) -> anyhow::Result<Running> {
    start_with_metrics(config, Vec::new()).await
}

/// [`start`], with more metrics for `GET /metrics` to show.
pub async fn start_with_metrics(
    config: GatewayConfig,
    metric_sources: Vec<metrics::Source>,
) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let (stop, shutting_down) = watch::channel(false);
    let idempotency = Arc::new(ingest::IdempotencyCache::new(config.idempotency_keys));
    let learner = idempotency.clone();
    let idempotency_topic = shared::SharedTopic::follow(
        &config.client(),
        &config.idempotency_topic,
        config.idempotency_retention_ms,
        shared::Start::Last(config.idempotency_keys as i64),
        "gateway-idempotency",
        move |event| {
            if let shared::Event::Record {
                key,
                value: Some(value),
            } = event
            {
                if let Ok(id) = std::str::from_utf8(key) {
                    learner.learn(id, value);
                }
            }
        },
    )?;
    // Created in the background: a cluster away at start must not delay it.
    let creator = idempotency_topic.clone();
    let mut stopped = shutting_down.clone();
    tokio::spawn(async move {
        while let Err(err) = creator.ensure().await {
            tracing::debug!(error = %err, "the idempotency topic cannot be created yet");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stopped.changed() => return,
            }
        }
    });
    // After the follower: what an earlier run spooled is checked against the
    // idempotency topic before it is sent.
    let reconciler: Arc<dyn producer::Reconcile> = Arc::new(ingest::Reconciler {
        cache: idempotency.clone(),
        topic: idempotency_topic.clone(),
    });
    let producer_config = config.producer();
    let producer = tokio::task::spawn_blocking(move || {
        DurableProducer::open_with(&producer_config, Some(reconciler))
    })
    .await??;
    // After the producer, which connects and gets its producer id meanwhile.
    let schema_config = config.clone();
    let schemas = tokio::task::spawn_blocking(move || {
        schema::Schemas::open(&schema_config, &schema_config.client())
    })
    .await??;
    let pipeline_config = config.clone();
    let pipelines =
        tokio::task::spawn_blocking(move || pipelines::Pipelines::open(&pipeline_config)).await??;
    let gateway = Arc::new(Gateway {
        pipelines,
        producer: Arc::new(producer),
        schemas,
        metrics: metrics::Metrics::default(),
        metric_sources,
        history: history::History::new(config.history_points, config.history_max_series),
        streams: stream::Streams::new(&config),
        consumers: consumers::Instances::new(&config),
        idempotency,
        idempotency_topic,
        requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        shutting_down: shutting_down.clone(),
        config,
    });
    let app = router(gateway.clone());
    let mut signal = shutting_down;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = signal.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "HTTP server failed");
        }
    });
    consumers::spawn_reaper(gateway.clone());
    ops::spawn_history(gateway.clone());
    console::started();
    Ok(Running {
        addr,
        stop,
        task,
        gateway,
    })
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    // Requests that produce or consume count against `max_concurrent_requests`;
    // streams have their own limit.
    let limited = Router::new()
        .merge(ingest::routes())
        .merge(rest_proxy::routes())
        .merge(consumers::routes())
        .merge(schema_routes())
        .route_layer(middleware::from_fn_with_state(
            gateway.clone(),
            limit_concurrency,
        ));
    Router::new()
        .merge(limited)
        .merge(stream::routes())
        .merge(pipelines::routes())
        .merge(ops::routes())
        .merge(console::routes())
        .merge(pages::routes())
        .fallback(|| async { ApiError::not_found(0, "no such route (see /openapi.json)") })
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(gateway.clone(), observe))
        .layer(DefaultBodyLimit::max(gateway.config.max_body_bytes))
        .with_state(gateway)
}

fn schema_routes() -> Router<Arc<Gateway>> {
    use axum::routing::get;
    Router::new().route(
        "/topics/{topic}/schema",
        get(ops::get_schema)
            .put(ops::put_schema)
            .delete(ops::delete_schema),
    )
}

async fn limit_concurrency(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    match gateway.requests.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::busy("too many concurrent requests").into_response(),
    }
}

/// Gives the errors axum itself answers (a body over the limit, a malformed query
/// or path, a wrong method) the same JSON body as ours.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !plain {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut answer = ApiError::new(status, 0, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// Counts every answer by route (the matched pattern, so topic names do not become
/// labels) and status, with its latency.
async fn observe(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    gateway
        .metrics
        .observe(&route, response.status().as_u16(), started.elapsed());
    response
}

/// A request id unique across gateways and restarts: a random 64-bit prefix drawn
/// once per process and a counter, in UUID form. One `getrandom` per request (a v4
/// UUID) was 1% of the gateway's CPU.
pub(crate) fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    uuid::Uuid::from_u64_pair(prefix, COUNTER.fetch_add(1, Ordering::Relaxed)).to_string()
}

/// Milliseconds since the Unix epoch, for record timestamps and the
/// `freshet-received-at` header.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_differ_and_look_like_uuids() {
        let (a, b) = (super::request_id(), super::request_id());
        assert_ne!(a, b);
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
        assert_eq!(a[..18], b[..18], "one process prefix");
    }
}
