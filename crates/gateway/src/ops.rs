//! Operations endpoints: `GET /health` (the process is up: cluster reachability,
//! spool depth and age), `GET /ready` (200 only when the cluster answers a metadata
//! request and the gateway is not shutting down), `GET /metrics` (Prometheus text),
//! `GET /openapi.json`, and the schema endpoints `GET|PUT|DELETE
//! /topics/{topic}/schema`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ingest::check_topic_name;
use crate::metrics::Gauges;
use crate::schema::SchemaError;
use crate::Gateway;
use prometheus_client::registry::Registry;

/// The OpenAPI 3.1 description of every route.
const OPENAPI: &str = include_str!("openapi.json");

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/metrics/history", get(history))
        .route("/openapi.json", get(openapi))
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let cluster = cluster_reachable(&gateway).await;
    let depth = gateway.producer.spool_depth();
    Json(json!({
        "status": "ok",
        "cluster": if cluster { "reachable" } else { "unreachable" },
        "outage_mode": gateway.producer.in_outage(),
        "spool": {
            "records": depth.records,
            "bytes": depth.bytes,
            "oldest_age_ms": depth.oldest_timestamp_ms.map(|ts| (crate::now_ms() - ts).max(0)),
            "max_bytes": gateway.config.spool_max_bytes,
            "held_bytes": gateway.producer.held_bytes(),
            "failure": gateway.producer.spool_failure(),
        },
        "streams": {"subscribers": gateway.streams.subscribers(), "readers": gateway.streams.readers()},
        "consumer_instances": gateway.consumers.count(),
    }))
    .into_response()
}

async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    if *gateway.shutting_down.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    if cluster_reachable(&gateway).await {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "the cluster does not answer"})),
        )
            .into_response()
    }
}

/// The text of `GET /metrics`: the gateway's metrics, its pipelines', and the
/// process's sources.
fn scrape(gateway: &Gateway) -> String {
    let depth = gateway.producer.spool_depth();
    let stats = gateway.producer.stats();
    let gauges = Gauges {
        spool_records: depth.records,
        spool_bytes: depth.bytes,
        spool_oldest_age_s: depth
            .oldest_timestamp_ms
            .map_or(0.0, |ts| (crate::now_ms() - ts).max(0) as f64 / 1000.0),
        held_bytes: gateway.producer.held_bytes(),
        stream_subscribers: gateway.streams.subscribers() as u64,
        stream_readers: gateway.streams.readers() as u64,
        consumer_instances: gateway.consumers.count() as u64,
        records_delivered: stats.delivered.load(Ordering::Relaxed),
        records_spooled: stats.spooled.load(Ordering::Relaxed),
        records_rejected: stats.rejected.load(Ordering::Relaxed),
        records_dropped: stats.dropped.load(Ordering::Relaxed),
        records_replayed: stats.replayed.load(Ordering::Relaxed),
        records_reconciled: stats.reconciled.load(Ordering::Relaxed),
        outage: u64::from(gateway.producer.in_outage()),
        outages: stats.outages.load(Ordering::Relaxed),
        producer_recoveries: stats.recoveries.load(Ordering::Relaxed),
    };
    let pipelines = gateway.pipelines.clone();
    let mut sources = gateway.metric_sources.clone();
    sources.push(Arc::new(move |registry: &mut Registry| {
        pipelines.register_metrics(registry)
    }));
    gateway.metrics.render(&gauges, &sources)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut response = scrape(&gateway).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Samples `GET /metrics` into the history every `history_interval_ms`, until the
/// gateway shuts down (on a blocking thread: a scrape locks partitions).
pub(crate) fn spawn_history(gateway: Arc<Gateway>) {
    let mut stop = gateway.shutting_down.clone();
    tokio::spawn(async move {
        let every = Duration::from_millis(gateway.config.history_interval_ms);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let g = gateway.clone();
            let sampled = tokio::task::spawn_blocking(move || {
                let text = scrape(&g);
                let names = &g.config.history_metrics;
                g.history
                    .record(crate::now_ms(), crate::history::samples(&text, names));
            })
            .await;
            if sampled.is_err() {
                return;
            }
        }
    });
}

/// `GET /metrics/history?name=NAME&LABEL=VALUE...`: the kept past of the series named
/// `NAME` whose labels include the others given, as `{"times": [...], "series":
/// [{"name", "labels", "values": [...]}]}` (a value per time, `null` where absent).
/// Without `name`: the series kept, without values.
async fn history(
    State(gateway): State<Arc<Gateway>>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let name = query
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.as_str());
    let labels: Vec<(String, String)> =
        query.iter().filter(|(k, _)| k != "name").cloned().collect();
    let mut answer = serde_json::to_value(gateway.history.query(name, &labels)).unwrap_or_default();
    if let Value::Object(map) = &mut answer {
        map.insert(
            "interval_ms".into(),
            json!(gateway.config.history_interval_ms),
        );
    }
    Json(answer).into_response()
}

async fn openapi() -> Response {
    let mut response = OPENAPI.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) async fn get_schema(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
) -> Response {
    if let Err(err) = check_topic_name(&topic) {
        return err.into_response();
    }
    match gateway.schemas.get(&topic) {
        Some(schema) => Json(schema.document.clone()).into_response(),
        None => ApiError::not_found(3, format!("topic '{topic}' has no schema")).into_response(),
    }
}

pub(crate) async fn put_schema(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(err) = check_topic_name(&topic) {
        return err.into_response();
    }
    let document: Value = match serde_json::from_slice(&body) {
        Ok(document) => document,
        Err(e) => {
            return ApiError::bad_request(format!("body is not valid JSON: {e}")).into_response()
        }
    };
    match gateway.schemas.put(&topic, Some(document)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => schema_error(err).into_response(),
    }
}

pub(crate) async fn delete_schema(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
) -> Response {
    if let Err(err) = check_topic_name(&topic) {
        return err.into_response();
    }
    if gateway.schemas.get(&topic).is_none() {
        return ApiError::not_found(3, format!("topic '{topic}' has no schema")).into_response();
    }
    match gateway.schemas.put(&topic, None).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => schema_error(err).into_response(),
    }
}

fn schema_error(err: SchemaError) -> ApiError {
    match err {
        SchemaError::Invalid(why) => ApiError::unprocessable(why),
        SchemaError::Unavailable(why) => ApiError::busy(why),
    }
}

/// Whether the cluster answers a metadata request within a second.
async fn cluster_reachable(gateway: &Arc<Gateway>) -> bool {
    let gateway = gateway.clone();
    tokio::task::spawn_blocking(move || gateway.producer.cluster_answers(Duration::from_secs(1)))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_document_is_json_and_names_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(super::OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        for route in [
            "/ingest/{topic}",
            "/topics/{topic}",
            "/topics/{topic}/stream",
            "/topics/{topic}/schema",
            "/consumers/{group}/instances/{name}/records",
            "/health",
            "/metrics",
        ] {
            assert!(
                paths.contains_key(route),
                "{route} missing from openapi.json"
            );
        }
    }
}
