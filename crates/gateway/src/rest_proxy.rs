//! The Confluent REST Proxy v2 API (as Redpanda's HTTP proxy also implements it), so
//! existing REST-proxy clients work: produce with `POST /topics/{topic}` and
//! `POST /topics/{topic}/partitions/{partition}` in the JSON
//! (`application/vnd.kafka.json.v2+json`) and binary
//! (`application/vnd.kafka.binary.v2+json`, base64) embedded formats, and the topic
//! listing `GET /topics`, `GET /topics/{topic}`, `GET /topics/{topic}/partitions`.
//! Consumer instances are in `consumers`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::ingest::{check_target, check_topic_name, send_error};
use crate::producer::{Outcome, Record, SendError, TopicMetadata};
use crate::Gateway;

/// The v2 response content type.
pub const V2_JSON: &str = "application/vnd.kafka.v2+json";

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/topics", get(list_topics))
        .route(
            "/topics/{topic}",
            post(produce_to_topic).get(describe_topic),
        )
        .route("/topics/{topic}/partitions", get(list_partitions))
        .route(
            "/topics/{topic}/partitions/{partition}",
            post(produce_to_partition),
        )
}

/// How keys and values are embedded in the request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Embedded {
    Json,
    Binary,
}

impl Embedded {
    /// From a v2 content type; anything else (Avro, Protobuf, JSON Schema formats, v1)
    /// is refused with 415.
    pub fn from_headers(headers: &HeaderMap) -> Result<Embedded, ApiError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media.to_ascii_lowercase().as_str() {
            "application/vnd.kafka.json.v2+json" | "application/json" => Ok(Embedded::Json),
            "application/vnd.kafka.binary.v2+json" => Ok(Embedded::Binary),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                1,
                format!(
                    "Content-Type '{content_type}' is not supported: use \
                     application/vnd.kafka.json.v2+json or application/vnd.kafka.binary.v2+json"
                ),
            )),
        }
    }

    /// The bytes a key or value in this format stands for (`null` is no bytes).
    pub fn decode(self, field: &Value, what: &str) -> Result<Option<Vec<u8>>, ApiError> {
        match (self, field) {
            (_, Value::Null) => Ok(None),
            (Embedded::Json, value) => Ok(Some(
                serde_json::to_vec(value).expect("a JSON value serializes"),
            )),
            (Embedded::Binary, Value::String(text)) => {
                base64_decode(text).map(Some).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        2,
                        format!("{what} is not valid base64"),
                    )
                })
            }
            (Embedded::Binary, _) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                2,
                format!("{what} must be a base64 string in the binary format"),
            )),
        }
    }

    /// `bytes` as this format embeds them in a consumer's answer.
    pub fn encode(self, bytes: Option<&[u8]>) -> Value {
        match (self, bytes) {
            (_, None) => Value::Null,
            (Embedded::Json, Some(bytes)) => serde_json::from_slice(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
            (Embedded::Binary, Some(bytes)) => Value::String(base64_encode(bytes)),
        }
    }
}

#[derive(Deserialize)]
struct ProduceRequest {
    records: Vec<ProduceRecord>,
}

#[derive(Deserialize)]
struct ProduceRecord {
    #[serde(default)]
    key: Value,
    #[serde(default)]
    value: Value,
    partition: Option<i32>,
}

async fn produce_to_topic(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    produce(&gateway, &topic, None, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn produce_to_partition(
    State(gateway): State<Arc<Gateway>>,
    Path((topic, partition)): Path<(String, i32)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    produce(&gateway, &topic, Some(partition), &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn produce(
    gateway: &Gateway,
    topic: &str,
    partition: Option<i32>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    check_topic_name(topic)?;
    let format = Embedded::from_headers(headers)?;
    let request: ProduceRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            1,
            format!("invalid request body: {e}"),
        )
    })?;
    if request.records.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            1,
            "records is empty",
        ));
    }
    let request_id = crate::request_id();
    let timestamp_ms = crate::now_ms();
    let received_at = timestamp_ms.to_string();
    // Decode and validate everything first: a bad record means nothing is written.
    let mut records = Vec::with_capacity(request.records.len());
    let mut violations = Vec::new();
    for (i, r) in request.records.iter().enumerate() {
        let key = format.decode(&r.key, &format!("records[{i}].key"))?;
        let value = format.decode(&r.value, &format!("records[{i}].value"))?;
        if value.as_ref().map_or(0, Vec::len) > gateway.config.max_record_bytes {
            return Err(ApiError::too_large(format!(
                "records[{i}].value is larger than max_record_bytes ({})",
                gateway.config.max_record_bytes
            )));
        }
        if gateway.schemas.has_any(topic) {
            let document = match format {
                Embedded::Json => r.value.clone(),
                Embedded::Binary => {
                    match value.as_deref().map(serde_json::from_slice::<Value>) {
                        Some(Ok(document)) => document,
                        Some(Err(e)) => {
                            violations.push(crate::schema::Violation {
                            pointer: format!("/records/{i}/value"),
                            message: format!("the value is not JSON, so it cannot match the topic's schema: {e}"),
                        });
                            continue;
                        }
                        None => Value::Null,
                    }
                }
            };
            for mut v in gateway.schemas.validate(topic, &document) {
                v.pointer = format!("/records/{i}/value{}", v.pointer);
                violations.push(v);
            }
        }
        let record_partition = partition.or(r.partition);
        records.push(Record {
            topic: topic.to_string(),
            partition: record_partition,
            key,
            value,
            headers: vec![
                (
                    "freshet-received-at".into(),
                    received_at.clone().into_bytes(),
                ),
                ("freshet-request-id".into(), request_id.clone().into_bytes()),
            ],
            timestamp_ms,
        });
    }
    if !violations.is_empty() {
        gateway.metrics.validation_failures.inc();
        let mut err = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            3,
            format!("records do not match the schema of topic '{topic}'"),
        );
        err.violations = Some(violations);
        return Err(err);
    }
    check_target(gateway, topic, partition).await?;
    for r in &records {
        if r.partition != partition {
            check_target(gateway, topic, r.partition).await?;
        }
    }
    let sends = records.into_iter().map(|r| gateway.producer.send(r));
    let results = futures_util::future::join_all(sends).await;
    let offsets: Vec<Value> = results
        .into_iter()
        .map(|result| match result {
            Ok(Outcome::Delivered { partition, offset }) => {
                json!({"partition": partition, "offset": offset, "error_code": null, "error": null})
            }
            // Durable, not yet in the cluster: no place to report yet.
            Ok(Outcome::Spooled) => {
                json!({"partition": null, "offset": null, "error_code": null, "error": null, "spooled": true})
            }
            // The REST Proxy's per-record codes: 1 non-retriable, 2 retriable.
            Err(err @ SendError::Rejected { .. }) => json!({
                "partition": null, "offset": null, "error_code": 1, "error": send_error(topic, err).message}),
            Err(err) => json!({
                "partition": null, "offset": null, "error_code": 2, "error": send_error(topic, err).message}),
        })
        .collect();
    let body = json!({"key_schema_id": null, "value_schema_id": null, "offsets": offsets});
    Ok(v2_json(StatusCode::OK, &body))
}

/// A response in the v2 content type.
pub fn v2_json(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(V2_JSON));
    response
}

/// The cluster's topics (internal ones, named `__...`, and the gateway's own shared
/// topics left out).
async fn list_topics(State(gateway): State<Arc<Gateway>>) -> Response {
    match metadata(&gateway, None).await {
        Ok(topics) => {
            let names: Vec<&str> = topics
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| {
                    !n.starts_with("__")
                        && *n != gateway.config.schema_topic
                        && *n != gateway.config.idempotency_topic
                })
                .collect();
            v2_json(StatusCode::OK, &json!(names))
        }
        Err(err) => err.into_response(),
    }
}

async fn describe_topic(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
) -> Response {
    match one_topic(&gateway, &topic).await {
        Ok(t) => v2_json(
            StatusCode::OK,
            &json!({"name": t.name, "configs": {}, "partitions": partitions_json(&t)}),
        ),
        Err(err) => err.into_response(),
    }
}

async fn list_partitions(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
) -> Response {
    match one_topic(&gateway, &topic).await {
        Ok(t) => v2_json(StatusCode::OK, &partitions_json(&t)),
        Err(err) => err.into_response(),
    }
}

fn partitions_json(t: &TopicMetadata) -> Value {
    Value::Array(
        t.partitions
            .iter()
            .map(|(p, leader, replicas, isr)| {
                json!({
                    "partition": p,
                    "leader": leader,
                    "replicas": replicas.iter().map(|b| json!({
                        "broker": b, "leader": b == leader, "in_sync": isr.contains(b)
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

async fn one_topic(gateway: &Arc<Gateway>, topic: &str) -> Result<TopicMetadata, ApiError> {
    check_topic_name(topic)?;
    metadata(gateway, Some(topic))
        .await?
        .into_iter()
        .find(|t| t.name == topic)
        .ok_or_else(|| ApiError::topic_not_found(topic))
}

/// Cluster metadata through the gateway's producer (without creating topics).
pub(crate) async fn metadata(
    gateway: &Arc<Gateway>,
    topic: Option<&str>,
) -> Result<Vec<TopicMetadata>, ApiError> {
    let gateway = gateway.clone();
    let topic = topic.map(str::to_string);
    tokio::task::spawn_blocking(move || gateway.producer.topics_metadata(topic.as_deref()))
        .await
        .map_err(|e| ApiError::busy(e.to_string()))?
        .map_err(|e| ApiError::busy(format!("cluster unavailable: {e}")))
}

/// Standard base64 (RFC 4648 §4), as the REST Proxy's binary format uses: written
/// with padding, read with or without it.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

pub fn base64_encode(bytes: &[u8]) -> String {
    base64::Engine::encode(&BASE64, bytes)
}

/// `None` for anything that is not standard base64 (whitespace and the URL-safe
/// alphabet included).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&BASE64, text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn base64_decodes_any_text_without_panic(text in "\\PC{0,40}") {
            let _ = base64_decode(&text);
        }

        #[test]
        fn base64_round_trips_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            proptest::prop_assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..70usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let text = base64_encode(&bytes);
            assert_eq!(text.len() % 4, 0);
            assert_eq!(base64_decode(&text).unwrap(), bytes, "{text}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
    }
}
