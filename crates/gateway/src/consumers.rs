//! REST Proxy v2 consumer instances, so existing REST-proxy clients can read: each
//! instance is one librdkafka consumer in a consumer group, created with
//! `POST /consumers/{group}` and addressed as `/consumers/{group}/instances/{name}`:
//! `subscription` (topics or a pattern), `assignments` (manual), `positions`
//! (seek, `/beginning`, `/end`), `records` (poll), `offsets` (commit, committed),
//! `DELETE` (close). Semantics follow Confluent's REST Proxy: a committed offset is
//! the given offset + 1 (the next one to read); an empty commit commits everything
//! returned so far; an instance unused for `consumer_instance_timeout_ms` is closed.
//!
//! librdkafka calls block, so every operation runs on the blocking pool with the
//! instance's own lock; requests to one instance are served one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::rest_proxy::{v2_json, Embedded};
use crate::Gateway;

pub fn routes() -> Router<Arc<Gateway>> {
    let base = "/consumers/{group}/instances/{name}";
    Router::new()
        .route("/consumers/{group}", post(create))
        .route(base, axum::routing::delete(delete))
        .route(
            &format!("{base}/subscription"),
            post(subscribe).get(subscription).delete(unsubscribe),
        )
        .route(
            &format!("{base}/assignments"),
            post(assign).get(assignments),
        )
        .route(&format!("{base}/positions"), post(seek))
        .route(&format!("{base}/positions/beginning"), post(seek_beginning))
        .route(&format!("{base}/positions/end"), post(seek_end))
        .route(&format!("{base}/records"), get(records))
        .route(&format!("{base}/offsets"), post(commit).get(committed))
}

/// The open instances, by (group, name).
pub struct Instances {
    map: Mutex<HashMap<(String, String), Arc<Instance>>>,
    max: usize,
    timeout: Duration,
    client: ClientConfig,
}

struct Instance {
    format: Embedded,
    consumer: Mutex<BaseConsumer>,
    last_used: Mutex<Instant>,
}

impl Instances {
    pub fn new(config: &GatewayConfig) -> Instances {
        let client = config.client();
        Instances {
            map: Mutex::new(HashMap::new()),
            max: config.max_consumer_instances,
            timeout: Duration::from_millis(config.consumer_instance_timeout_ms),
            client,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Instance>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn get(&self, group: &str, name: &str) -> Result<Arc<Instance>, ApiError> {
        let instance = self
            .lock()
            .get(&(group.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(3, "Consumer instance not found."))?;
        *instance.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Ok(instance)
    }

    /// Closes the instances nobody used for `consumer_instance_timeout_ms`.
    async fn expire(&self) {
        let expired: Vec<Arc<Instance>> = {
            let mut map = self.lock();
            let keys: Vec<_> = map
                .iter()
                .filter(|(_, i)| {
                    i.last_used
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .elapsed()
                        > self.timeout
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for instance in expired {
            tracing::info!("closing an expired REST consumer instance");
            close(instance).await;
        }
    }

    pub async fn close_all(&self) {
        let all: Vec<Arc<Instance>> = self.lock().drain().map(|(_, i)| i).collect();
        for instance in all {
            close(instance).await;
        }
    }
}

/// Leaves the group (the consumer's drop does it) on the blocking pool.
async fn close(instance: Arc<Instance>) {
    let _ = tokio::task::spawn_blocking(move || {
        let consumer = instance.consumer.lock().unwrap_or_else(|e| e.into_inner());
        consumer.unsubscribe();
        drop(consumer);
        drop(instance);
    })
    .await;
}

pub fn spawn_reaper(gateway: Arc<Gateway>) {
    let mut stop = gateway.shutting_down.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => gateway.consumers.expire().await,
                _ = stop.changed() => return,
            }
        }
    });
}

/// Runs `f` with the instance's consumer on the blocking pool.
async fn with_consumer<T: Send + 'static>(
    instance: Arc<Instance>,
    f: impl FnOnce(&BaseConsumer, Embedded) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let consumer = instance.consumer.lock().unwrap_or_else(|e| e.into_inner());
        f(&consumer, instance.format)
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))?
}

fn kafka_error(err: KafkaError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        0,
        format!("Kafka error: {err}"),
    )
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            1,
            format!("invalid request body: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct CreateRequest {
    name: Option<String>,
    format: Option<String>,
    #[serde(rename = "auto.offset.reset")]
    auto_offset_reset: Option<String>,
    #[serde(rename = "auto.commit.enable")]
    auto_commit_enable: Option<Value>,
    #[serde(rename = "fetch.min.bytes")]
    fetch_min_bytes: Option<Value>,
    #[serde(rename = "consumer.request.timeout.ms")]
    _request_timeout_ms: Option<Value>,
}

/// A JSON string or number as the text librdkafka takes.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

async fn create(
    State(gateway): State<Arc<Gateway>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CreateRequest = if body.is_empty() {
        parse(b"{}")?
    } else {
        parse(&body)?
    };
    let format = match request.format.as_deref().unwrap_or("binary") {
        "binary" => Embedded::Binary,
        "json" => Embedded::Json,
        other => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                1,
                format!("format '{other}' is not supported: use binary or json"),
            ))
        }
    };
    let name = request
        .name
        .unwrap_or_else(|| format!("rest-consumer-{}", uuid::Uuid::new_v4()));
    if name.is_empty() || name.contains('/') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            1,
            "invalid consumer name",
        ));
    }
    let mut client = gateway.consumers.client.clone();
    client
        .set("group.id", &group)
        .set("client.id", &name)
        .set("enable.auto.offset.store", "true");
    if let Some(reset) = &request.auto_offset_reset {
        match reset.as_str() {
            "earliest" | "latest" | "smallest" | "largest" | "none" => {
                client.set("auto.offset.reset", reset.as_str());
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    1,
                    format!("auto.offset.reset '{other}' is not one of earliest, latest, none"),
                ))
            }
        }
    }
    if let Some(v) = request.auto_commit_enable.as_ref().and_then(text) {
        client.set("enable.auto.commit", v);
    }
    if let Some(v) = request.fetch_min_bytes.as_ref().and_then(text) {
        client.set("fetch.min.bytes", v);
    }
    let key = (group.clone(), name.clone());
    {
        let map = gateway.consumers.lock();
        if map.contains_key(&key) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                2,
                "Consumer with specified consumer ID already exists in the specified consumer group.",
            ));
        }
        if map.len() >= gateway.consumers.max {
            return Err(ApiError::busy("too many consumer instances"));
        }
    }
    let consumer: BaseConsumer = client.create().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            1,
            format!("invalid consumer configuration: {e}"),
        )
    })?;
    let instance = Arc::new(Instance {
        format,
        consumer: Mutex::new(consumer),
        last_used: Mutex::new(Instant::now()),
    });
    {
        let mut map = gateway.consumers.lock();
        if map.contains_key(&key) {
            return Err(ApiError::new(StatusCode::CONFLICT, 2, "Consumer with specified consumer ID already exists in the specified consumer group."));
        }
        map.insert(key, instance);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| gateway.config.listen.clone());
    Ok(v2_json(
        StatusCode::OK,
        &json!({
            "instance_id": name,
            "base_uri": format!("http://{host}/consumers/{group}/instances/{name}"),
        }),
    ))
}

async fn delete(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
) -> Response {
    let removed = gateway.consumers.lock().remove(&(group, name));
    match removed {
        Some(instance) => {
            close(instance).await;
            StatusCode::NO_CONTENT.into_response()
        }
        None => ApiError::not_found(3, "Consumer instance not found.").into_response(),
    }
}

#[derive(Deserialize)]
struct SubscribeRequest {
    topics: Option<Vec<String>>,
    topic_pattern: Option<String>,
}

async fn subscribe(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: SubscribeRequest = parse(&body)?;
    let topics: Vec<String> = match (request.topics, request.topic_pattern) {
        (Some(topics), None) if !topics.is_empty() => topics,
        // librdkafka takes a regex as a topic name starting with '^'.
        (None, Some(pattern)) => vec![if pattern.starts_with('^') {
            pattern
        } else {
            format!("^{pattern}")
        }],
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                1,
                "give either a non-empty topics list or a topic_pattern",
            ))
        }
    };
    with_consumer(instance, move |consumer, _| {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(kafka_error)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn subscription(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let topics = with_consumer(instance, |consumer, _| {
        let list = consumer.subscription().map_err(kafka_error)?;
        Ok(list
            .elements()
            .iter()
            .map(|e| e.topic().to_string())
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(v2_json(StatusCode::OK, &json!({ "topics": topics })))
}

async fn unsubscribe(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    with_consumer(instance, |consumer, _| {
        consumer.unsubscribe();
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct PartitionRef {
    topic: String,
    partition: i32,
}

#[derive(Deserialize)]
struct PartitionsRequest {
    partitions: Vec<PartitionRef>,
}

#[derive(Deserialize)]
struct OffsetRef {
    topic: String,
    partition: i32,
    offset: i64,
    metadata: Option<String>,
}

#[derive(Deserialize)]
struct OffsetsRequest {
    offsets: Vec<OffsetRef>,
}

fn partition_list(
    partitions: &[PartitionRef],
    offset: Offset,
) -> Result<TopicPartitionList, ApiError> {
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition_offset(&p.topic, p.partition, offset)
            .map_err(kafka_error)?;
    }
    Ok(list)
}

async fn assign(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: PartitionsRequest = parse(&body)?;
    let list = partition_list(&request.partitions, Offset::Stored)?;
    with_consumer(instance, move |consumer, _| {
        consumer.assign(&list).map_err(kafka_error)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn assignments(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let partitions = with_consumer(instance, |consumer, _| {
        let list = consumer.assignment().map_err(kafka_error)?;
        Ok(list
            .elements()
            .iter()
            .map(|e| json!({"topic": e.topic(), "partition": e.partition()}))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(v2_json(
        StatusCode::OK,
        &json!({ "partitions": partitions }),
    ))
}

async fn seek(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: OffsetsRequest = parse(&body)?;
    let mut list = TopicPartitionList::new();
    for o in &request.offsets {
        list.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.offset))
            .map_err(kafka_error)?;
    }
    seek_list(instance, list).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn seek_to(
    gateway: Arc<Gateway>,
    group: String,
    name: String,
    body: Bytes,
    offset: Offset,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: PartitionsRequest = parse(&body)?;
    seek_list(instance, partition_list(&request.partitions, offset)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn seek_beginning(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    seek_to(gateway, group, name, body, Offset::Beginning).await
}

async fn seek_end(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    seek_to(gateway, group, name, body, Offset::End).await
}

/// Seeks assigned partitions. Right after an assignment librdkafka refuses a seek
/// (`__STATE`) until it has started the partition, where Kafka's consumer just sets
/// the position: retry for a while before answering that the partition is not
/// assigned.
async fn seek_list(instance: Arc<Instance>, list: TopicPartitionList) -> Result<(), ApiError> {
    with_consumer(instance, move |consumer, _| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let result = consumer
                .seek_partitions(list.clone(), Duration::from_secs(5))
                .map_err(kafka_error)?;
            let failed = result.elements().into_iter().find_map(|e| match e.error() {
                Err(err) => Some((e.topic().to_string(), e.partition(), err)),
                Ok(()) => None,
            });
            let Some((topic, partition, err)) = failed else {
                return Ok(());
            };
            let starting = matches!(err, KafkaError::Seek(_))
                || err.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::State);
            if starting && Instant::now() < deadline {
                // librdkafka's own threads start the partition; no poll here, which
                // would take records away from the next `records` request.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                1,
                format!("cannot seek {topic}-{partition}: {err} (is the partition assigned to this instance?)"),
            ));
        }
    })
    .await
}

#[derive(Deserialize)]
struct RecordsQuery {
    timeout: Option<u64>,
    max_bytes: Option<usize>,
}

async fn records(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    Query(query): Query<RecordsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*")
        .to_ascii_lowercase();
    let wanted = match instance.format {
        Embedded::Binary => "application/vnd.kafka.binary.v2+json",
        Embedded::Json => "application/vnd.kafka.json.v2+json",
    };
    let acceptable = accept
        .split(',')
        .map(|a| a.split(';').next().unwrap_or("").trim())
        .any(|a| {
            a == wanted
                || a == "*/*"
                || a == "application/*"
                || a == "application/json"
                || a == "application/vnd.kafka.v2+json"
        });
    if !acceptable {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            1,
            format!("this instance's format answers {wanted}, not '{accept}'"),
        ));
    }
    let timeout = Duration::from_millis(
        query
            .timeout
            .unwrap_or(1000)
            .min(gateway.config.consumer_request_timeout_ms),
    );
    let max_bytes = query
        .max_bytes
        .unwrap_or(gateway.config.consumer_request_max_bytes)
        .min(gateway.config.consumer_request_max_bytes);
    let records = with_consumer(instance, move |consumer, format| {
        poll_records(consumer, format, timeout, max_bytes)
    })
    .await?;
    let mut response = v2_json(StatusCode::OK, &Value::Array(records));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(wanted),
    );
    Ok(response)
}

/// Waits up to `timeout` for the first record, then takes what is already fetched, up
/// to `max_bytes` of keys and values (at least one record).
fn poll_records(
    consumer: &BaseConsumer,
    format: Embedded,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Vec<Value>, ApiError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    loop {
        let wait = if out.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        match consumer.poll(wait) {
            None => break,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(err)) => {
                if out.is_empty() {
                    return Err(kafka_error(err));
                }
                break;
            }
            Some(Ok(message)) => {
                let size = message.key_len() + message.payload_len();
                out.push(json!({
                    "topic": message.topic(),
                    "key": format.encode(message.key()),
                    "value": format.encode(message.payload()),
                    "partition": message.partition(),
                    "offset": message.offset(),
                }));
                bytes += size;
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        if out.is_empty() && Instant::now() >= deadline {
            break;
        }
    }
    Ok(out)
}

async fn commit(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: Option<OffsetsRequest> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(parse(&body)?)
    };
    with_consumer(instance, move |consumer, _| match request {
        None => match consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing consumed since the last commit: nothing to do.
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => Ok(()),
            other => other.map_err(kafka_error),
        },
        Some(request) => {
            let mut list = TopicPartitionList::new();
            for o in &request.offsets {
                // The REST Proxy commits the offset after the one given.
                let mut elem = list.add_partition(&o.topic, o.partition);
                elem.set_offset(Offset::Offset(o.offset + 1))
                    .map_err(kafka_error)?;
                if let Some(metadata) = &o.metadata {
                    elem.set_metadata(metadata.as_str());
                }
            }
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(kafka_error)
        }
    })
    .await?;
    Ok(v2_json(StatusCode::OK, &json!({})))
}

async fn committed(
    State(gateway): State<Arc<Gateway>>,
    Path((group, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let instance = gateway.consumers.get(&group, &name)?;
    let request: PartitionsRequest = parse(&body)?;
    let list = partition_list(&request.partitions, Offset::Invalid)?;
    let offsets = with_consumer(instance, move |consumer, _| {
        let found = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .map_err(kafka_error)?;
        Ok(found
            .elements()
            .iter()
            .filter_map(|e| {
                e.offset().to_raw().filter(|o| *o >= 0).map(|offset| {
                    json!({"topic": e.topic(), "partition": e.partition(), "offset": offset, "metadata": e.metadata()})
                })
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(v2_json(StatusCode::OK, &json!({ "offsets": offsets })))
}
