//! `POST /ingest/{topic}`: one record per request from a web form or a JSON client.
//! The body is `application/json` (stored as sent) or
//! `application/x-www-form-urlencoded` (stored as a JSON object; a repeated field
//! becomes an array). `?key=` sets the record key, `?partition=` pins a partition.
//! Every record carries `freshet-received-at` (ms since the epoch) and
//! `freshet-request-id` headers. An `Idempotency-Key` makes a retried request return
//! the first answer instead of storing the record again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::error::ApiError;
use crate::producer::{Outcome, Record, SendError};
use crate::Gateway;

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new().route("/ingest/{topic}", post(ingest))
}

#[derive(Deserialize)]
struct IngestQuery {
    key: Option<String>,
    partition: Option<i32>,
}

async fn ingest(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    Query(query): Query<IngestQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = crate::request_id();
    let answer = match headers.get("idempotency-key") {
        None => accept(&gateway, &topic, &query, &headers, &body, &request_id, None)
            .await
            .map(|answer| (answer, false)),
        Some(key) => {
            let Ok(key) = key.to_str() else {
                return ApiError::bad_request("Idempotency-Key must be visible ASCII")
                    .into_response();
            };
            let fingerprint = fingerprint(&topic, query.key.as_deref(), query.partition, &body);
            // In outage mode the topic cannot be read: an unknown key is decided from
            // what this gateway knows (its own keys and those it has read), and the
            // record is held in the spool until reconciliation (see `Reconciler`).
            if !gateway.idempotency.knows(&topic, key) && !gateway.producer.in_outage() {
                // Another gateway may have answered this key: it recorded the answer in
                // the cluster before its client got it, so reading to the end finds it.
                if !gateway
                    .idempotency_topic
                    .sync_to_end(IDEMPOTENCY_SYNC)
                    .await
                {
                    tracing::debug!("the idempotency topic could not be read to its end; answering from what is known");
                }
            }
            gateway
                .idempotency
                .once(&topic, key, fingerprint, || async {
                    let answer = accept(
                        &gateway,
                        &topic,
                        &query,
                        &headers,
                        &body,
                        &request_id,
                        Some(key),
                    )
                    .await?;
                    remember(&gateway, &topic, key, fingerprint, &answer).await;
                    Ok(answer)
                })
                .await
        }
    };
    match answer {
        Ok((answer, replayed)) => {
            let mut response = (StatusCode::ACCEPTED, Json(answer.body)).into_response();
            if let Ok(id) = HeaderValue::from_str(&answer.request_id) {
                response.headers_mut().insert("x-request-id", id);
            }
            if replayed {
                gateway.metrics.idempotent_replays.inc();
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            response
        }
        Err(err) => err.into_response(),
    }
}

/// How long a request with an unknown `Idempotency-Key` waits to read the
/// idempotency topic to its end.
const IDEMPOTENCY_SYNC: std::time::Duration = std::time::Duration::from_millis(500);

/// The first answer to a request, kept for its retries.
#[derive(Clone, serde::Serialize, Deserialize)]
pub(crate) struct Answer {
    request_id: String,
    body: Value,
}

/// What the idempotency topic holds per key (`topic\0Idempotency-Key`).
#[derive(serde::Serialize, Deserialize)]
struct Remembered {
    fingerprint: u64,
    answer: Answer,
}

/// Writes the answer to the idempotency topic (through the durable producer, so it
/// is spooled with the record when the cluster is away), for every gateway in front
/// of the cluster and for this one after a restart. A failure only weakens retries
/// through other gateways, so it is logged, not answered.
async fn remember(gateway: &Gateway, topic: &str, key: &str, fingerprint: u64, answer: &Answer) {
    let value = serde_json::to_vec(&Remembered {
        fingerprint,
        answer: answer.clone(),
    })
    .expect("an answer serializes");
    let record = Record {
        topic: gateway.config.idempotency_topic.clone(),
        partition: Some(0),
        key: Some(format!("{topic}\0{key}").into_bytes()),
        value: Some(value),
        headers: Vec::new(),
        timestamp_ms: crate::now_ms(),
    };
    if let Err(err) = gateway.producer.send(record).await {
        tracing::warn!(error = %err, "cannot record an Idempotency-Key answer in the cluster; only this gateway knows it");
    }
}

async fn accept(
    gateway: &Gateway,
    topic: &str,
    query: &IngestQuery,
    headers: &HeaderMap,
    body: &Bytes,
    request_id: &str,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    check_topic_name(topic)?;
    let (value, document) = decode_body(headers, body)?;
    if value.len() > gateway.config.max_record_bytes {
        return Err(ApiError::too_large(format!(
            "record of {} bytes is larger than max_record_bytes ({})",
            value.len(),
            gateway.config.max_record_bytes
        )));
    }
    let violations = gateway.schemas.validate(topic, &document);
    if !violations.is_empty() {
        gateway.metrics.validation_failures.inc();
        let mut err = ApiError::unprocessable(format!(
            "record does not match the schema of topic '{topic}' ({} violation{})",
            violations.len(),
            if violations.len() == 1 { "" } else { "s" }
        ));
        err.violations = Some(violations);
        return Err(err);
    }
    check_target(gateway, topic, query.partition).await?;
    let timestamp_ms = crate::now_ms();
    let mut record_headers = vec![
        (
            "freshet-received-at".to_string(),
            timestamp_ms.to_string().into_bytes(),
        ),
        (
            "freshet-request-id".to_string(),
            request_id.as_bytes().to_vec(),
        ),
    ];
    if let Some(key) = idempotency_key {
        record_headers.push((
            "freshet-idempotency-key".to_string(),
            key.as_bytes().to_vec(),
        ));
    }
    let record = Record {
        topic: topic.to_string(),
        partition: query.partition,
        key: query.key.as_ref().map(|k| k.as_bytes().to_vec()),
        value: Some(value),
        headers: record_headers,
        timestamp_ms,
    };
    let outcome = gateway
        .producer
        .send(record)
        .await
        .map_err(|err| send_error(topic, err))?;
    let body = match outcome {
        Outcome::Delivered { partition, offset } => json!({
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "spooled": false,
            "request_id": request_id,
        }),
        Outcome::Spooled => json!({
            "topic": topic,
            "partition": null,
            "offset": null,
            "spooled": true,
            "request_id": request_id,
        }),
    };
    Ok(Answer {
        request_id: request_id.to_string(),
        body,
    })
}

/// Refuses a record for a topic (or partition) the cluster says does not exist. A
/// cluster that does not answer is no reason to refuse: the record is spooled.
pub(crate) async fn check_target(
    gateway: &Gateway,
    topic: &str,
    partition: Option<i32>,
) -> Result<(), ApiError> {
    match gateway.producer.partitions(topic).await {
        Ok(None) => Err(ApiError::topic_not_found(topic)),
        Ok(Some(count)) => match partition {
            Some(p) if p < 0 || p >= count => Err(ApiError::partition_not_found(topic, p)),
            _ => Ok(()),
        },
        Err(()) => Ok(()),
    }
}

/// The HTTP answer for a record that could not be made durable.
pub(crate) fn send_error(topic: &str, err: SendError) -> ApiError {
    match err {
        SendError::Rejected { name, .. } if name.starts_with("UNKNOWN_TOPIC") => {
            ApiError::topic_not_found(topic)
        }
        SendError::Rejected { name, message }
            if name.contains("SIZE_TOO_LARGE") || name.contains("TOO_LARGE") =>
        {
            ApiError::too_large(format!("{name}: {message}"))
        }
        SendError::Rejected { name, message } => {
            ApiError::unprocessable(format!("the cluster refused the record: {name}: {message}"))
        }
        err @ SendError::Full { .. } => ApiError::busy(err.to_string()),
        SendError::Storage(why) => {
            ApiError::busy(format!("the record could not be made durable: {why}"))
        }
    }
}

/// Kafka's rule: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(crate) fn check_topic_name(topic: &str) -> Result<(), ApiError> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid topic name '{topic}': 1 to 249 characters of [a-zA-Z0-9._-], not '.' or '..'"
        )))
    }
}

/// The record value to store and the JSON document to validate.
fn decode_body(headers: &HeaderMap, body: &Bytes) -> Result<(Vec<u8>, Value), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parts = content_type.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    for param in parts {
        if let Some((name, value)) = param.split_once('=') {
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
                return Err(ApiError::unsupported_media_type(format!(
                    "charset {value} is not supported: send UTF-8"
                )));
            }
        }
    }
    match media.as_str() {
        "application/json" => {
            let document: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
            Ok((body.to_vec(), document))
        }
        "application/x-www-form-urlencoded" => {
            let document = parse_form(body)?;
            let value = serde_json::to_vec(&document).expect("a JSON value serializes");
            Ok((value, document))
        }
        _ => Err(ApiError::unsupported_media_type(format!(
            "Content-Type '{content_type}' is not supported: use application/json or \
             application/x-www-form-urlencoded"
        ))),
    }
}

/// A form body as a JSON object of strings; a field given more than once becomes an
/// array of its values in order. Bytes that are not UTF-8 after decoding are refused
/// (not replaced).
fn parse_form(body: &[u8]) -> Result<Value, ApiError> {
    let mut object = serde_json::Map::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = form_decode(name)?;
        let value = Value::String(
            form_decode(value)
                .map_err(|e| ApiError::unprocessable(format!("field '{name}': {}", e.message)))?,
        );
        match object.get_mut(&name) {
            None => {
                object.insert(name, value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => {
                let first = first.take();
                object.insert(name, Value::Array(vec![first, value]));
            }
        }
    }
    Ok(Value::Object(object))
}

fn form_decode(raw: &[u8]) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => {
                        return Err(ApiError::bad_request(
                            "malformed percent-escape in form body",
                        ))
                    }
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::unprocessable("form data is not valid UTF-8"))
}

/// The same for the same request on every gateway and every version (it travels in
/// the idempotency topic): two CRC-32Cs over length-prefixed parts.
fn fingerprint(topic: &str, key: Option<&str>, partition: Option<i32>, body: &[u8]) -> u64 {
    let mut parts = Vec::with_capacity(topic.len() + body.len() + 32);
    for part in [
        topic.as_bytes(),
        key.unwrap_or("\u{0}none").as_bytes(),
        &partition.unwrap_or(-1).to_le_bytes(),
        body,
    ] {
        parts.extend_from_slice(&(part.len() as u64).to_le_bytes());
        parts.extend_from_slice(part);
    }
    let low = crc32c::crc32c(&parts);
    let high = crc32c::crc32c_append(0x9e37_79b9, &parts);
    (u64::from(high) << 32) | u64::from(low)
}

/// Answers remembered by `Idempotency-Key` (per topic), the oldest forgotten first.
/// Concurrent requests with one key wait for the first; a failed attempt is not
/// remembered, so a retry runs again.
#[allow(clippy::type_complexity)] // a map and its insertion order, under one lock
pub struct IdempotencyCache {
    capacity: usize,
    /// The entries by `topic\0key`, and their ids oldest first.
    entries: Mutex<(HashMap<String, Arc<Entry>>, VecDeque<String>)>,
}

struct Entry {
    fingerprint: u64,
    answer: OnceCell<Answer>,
    /// The first answer for this key (and fingerprint) read from the idempotency
    /// topic: the one that counts when two gateways answered it.
    stored: std::sync::OnceLock<Answer>,
}

impl IdempotencyCache {
    pub fn new(capacity: usize) -> IdempotencyCache {
        IdempotencyCache {
            capacity: capacity.max(1),
            entries: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// The entry for `id`, created (the oldest forgotten if full) if there is none.
    fn entry(&self, id: &str, fingerprint: u64) -> Arc<Entry> {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *guard;
        if let Some(entry) = map.get(id) {
            return entry.clone();
        }
        while map.len() >= self.capacity {
            match order.pop_front() {
                Some(oldest) => {
                    map.remove(&oldest);
                }
                None => break,
            }
        }
        let entry = Arc::new(Entry {
            fingerprint,
            answer: OnceCell::new(),
            stored: std::sync::OnceLock::new(),
        });
        map.insert(id.to_string(), entry.clone());
        order.push_back(id.to_string());
        entry
    }

    /// Whether an answer for the key is known (or being made) here.
    pub(crate) fn knows(&self, topic: &str, key: &str) -> bool {
        let guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.contains_key(&format!("{topic}\0{key}"))
    }

    /// An answer recorded in the idempotency topic (by any gateway).
    pub(crate) fn learn(&self, id: &str, value: &[u8]) {
        let Ok(remembered) = serde_json::from_slice::<Remembered>(value) else {
            tracing::warn!("ignoring an unreadable record in the idempotency topic");
            return;
        };
        let entry = self.entry(id, remembered.fingerprint);
        if entry.fingerprint == remembered.fingerprint {
            let _ = entry.stored.set(remembered.answer.clone());
            let _ = entry.answer.set(remembered.answer);
        }
    }

    /// The answer the idempotency topic holds for `id` if it is another request's
    /// than `request_id` (another gateway answered the key first). For a data
    /// record, the local answer is replaced by it, so a retry here gets the same
    /// answer as through that gateway.
    fn stored_elsewhere(&self, id: &str, request_id: &str, adopt: bool) -> bool {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = guard.0.get(id) else {
            return false;
        };
        let Some(stored) = entry.stored.get() else {
            return false;
        };
        if stored.request_id == request_id {
            return false;
        }
        if adopt {
            let replaced = Arc::new(Entry {
                fingerprint: entry.fingerprint,
                answer: OnceCell::new_with(Some(stored.clone())),
                stored: std::sync::OnceLock::from(stored.clone()),
            });
            guard.0.insert(id.to_string(), replaced);
        }
        true
    }

    async fn once<F, Fut>(
        &self,
        topic: &str,
        key: &str,
        fingerprint: u64,
        run: F,
    ) -> Result<(Answer, bool), ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Answer, ApiError>>,
    {
        let entry = self.entry(&format!("{topic}\0{key}"), fingerprint);
        if entry.fingerprint != fingerprint {
            return Err(ApiError::unprocessable(
                "Idempotency-Key was already used for a different request",
            ));
        }
        if let Some(answer) = entry.answer.get() {
            return Ok((answer.clone(), true));
        }
        let mut ran = false;
        let answer = entry
            .answer
            .get_or_try_init(|| {
                ran = true;
                run()
            })
            .await?;
        Ok((answer.clone(), !ran))
    }
}

/// Reconciliation after an outage, for the durable producer: before held records are
/// sent, the idempotency topic is read to its end; a held record whose
/// `Idempotency-Key` another gateway answered meanwhile (an answer for the same key
/// and request fingerprint with another request id) is a duplicate, and so is this
/// gateway's own held answer record for it. Both are dropped from the spool.
///
/// What it cannot catch: two gateways both cut off, both accepting the same key, and
/// reconciling at the same moment; each reads the topic before the other's answer is
/// in it, so both records are stored. A retry that reaches a gateway which can read
/// the topic is always decided from it.
pub(crate) struct Reconciler {
    pub cache: Arc<IdempotencyCache>,
    pub topic: Arc<crate::shared::SharedTopic>,
}

impl crate::producer::Reconcile for Reconciler {
    fn catch_up(&self, timeout: std::time::Duration) -> bool {
        self.topic.sync_to_end_blocking(timeout)
    }

    fn is_duplicate(&self, record: &Record) -> bool {
        if record.topic == self.topic.name {
            // This gateway's answer record: key `topic\0key`, value `Remembered`.
            let id = record
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok());
            let remembered = record
                .value
                .as_deref()
                .and_then(|v| serde_json::from_slice::<Remembered>(v).ok());
            return match (id, remembered) {
                (Some(id), Some(remembered)) => {
                    self.cache
                        .stored_elsewhere(id, &remembered.answer.request_id, false)
                }
                _ => false,
            };
        }
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        match (
            header("freshet-idempotency-key"),
            header("freshet-request-id"),
        ) {
            (Some(key), Some(request_id)) => {
                self.cache
                    .stored_elsewhere(&format!("{}\0{key}", record.topic), request_id, true)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_become_a_json_object() {
        let v = parse_form(b"name=Ann+Lee&vote=a%26b&vote=c&empty=&flag").unwrap();
        assert_eq!(
            v,
            json!({"name": "Ann Lee", "vote": ["a&b", "c"], "empty": "", "flag": ""})
        );
    }

    #[test]
    fn form_bytes_that_are_not_utf8_are_refused() {
        let err = parse_form(b"name=%FF%FE").unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(parse_form(b"name=%F").is_err());
        assert!(parse_form(b"name=%zz").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_form_body_decodes_or_is_refused_without_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(v) = parse_form(&body) {
                proptest::prop_assert!(v.is_object());
            }
        }

        #[test]
        fn form_fields_round_trip(fields in proptest::collection::vec(("[a-z]{1,5}", "\\PC{0,12}"), 0..8)) {
            let encoded: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", v.bytes().map(|b| format!("%{b:02X}")).collect::<String>()))
                .collect();
            let v = parse_form(encoded.join("&").as_bytes()).unwrap();
            for (k, value) in &fields {
                let got = &v[k.as_str()];
                proptest::prop_assert!(got == value || got.as_array().is_some_and(|a| a.iter().any(|x| x == value)));
            }
        }
    }

    #[test]
    fn topic_names_follow_kafka() {
        assert!(check_topic_name("votes.2026_a-b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(250)] {
            assert!(check_topic_name(bad).is_err(), "{bad}");
        }
    }
}
