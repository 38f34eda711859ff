//! The web console: `GET /` and `/console/*`, a page and its script built into the
//! binary (no CDN, no npm, nothing fetched at run time), and the JSON it reads under
//! `/console/api/` besides the gateway's own routes (`/metrics/history` for charts,
//! `/topics/{topic}/stream` for the live tail, `/ingest/{topic}` for the produce form,
//! `/pipelines`). Like the rest of the gateway it is a Kafka client of the cluster, so
//! it works against any Kafka-compatible cluster for what the Kafka protocol shows.
//!
//! Lists are paged (`offset`, `limit`, at most [`MAX_PAGE`]): a page never asks the
//! cluster about more topics than it shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::ingest::check_topic_name;
use crate::Gateway;

/// Topics one page of the topic list shows at most.
pub const MAX_PAGE: usize = 200;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/console/api/overview", get(overview))
        .route("/console/api/topics", get(topics).post(create_topic))
        .route(
            "/console/api/topics/{topic}",
            get(topic).delete(delete_topic),
        )
        .route(
            "/console/api/topics/{topic}/configs",
            get(topic_configs).put(alter_topic_configs),
        )
        .route("/console/api/topics/{topic}/records", get(records))
        .route("/console/api/groups", get(groups))
        .route("/console/api/groups/{group}", get(group))
        .route(
            "/console/api/groups/{group}/reset",
            axum::routing::post(reset_group),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// When the gateway started (first called at its start), for the overview's uptime.
pub(crate) fn started() -> Instant {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// Runs blocking cluster work (metadata, watermarks) off the runtime.
async fn blocking<T: Send + 'static>(
    gateway: &Arc<Gateway>,
    work: impl FnOnce(&Gateway) -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    let gateway = gateway.clone();
    tokio::task::spawn_blocking(move || work(&gateway))
        .await
        .map_err(|e| ApiError::busy(e.to_string()))?
        .map_err(|e| ApiError::busy(format!("cluster unavailable: {e}")))
}

/// Whether a topic is the gateway's or the cluster's own (not listed by default).
fn internal(gateway: &Gateway, name: &str) -> bool {
    name.starts_with("__")
        || name.starts_with("_freshet")
        || name == gateway.config.schema_topic
        || name == gateway.config.idempotency_topic
        || name == gateway.config.pipeline_topic
}

async fn overview(State(gateway): State<Arc<Gateway>>) -> Result<Response, ApiError> {
    let (brokers, topics, sizes) = blocking(&gateway, |g| {
        let (brokers, topics) = g
            .producer
            .cluster_metadata(None)
            .map_err(|e| e.to_string())?;
        let sizes = log_dir_sizes(&brokers, None);
        Ok((brokers, topics, sizes))
    })
    .await?;
    let user: Vec<_> = topics
        .iter()
        .filter(|t| !internal(&gateway, &t.name))
        .collect();
    Ok(Json(json!({
        "uptime_s": started().elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
        "brokers": brokers.iter().map(|(id, host, port)| json!({"id": id, "host": host, "port": port})).collect::<Vec<_>>(),
        "topics": user.len(),
        "partitions": user.iter().map(|t| t.partitions.len()).sum::<usize>(),
        "internal_topics": topics.len() - user.len(),
        "size_bytes": sizes.map(|s| s.values().sum::<i64>()),
        "pipelines": gateway.pipelines.count(),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
    /// Only the topics whose name contains this.
    #[serde(default)]
    search: String,
    /// Include the cluster's and Freshet's own topics.
    #[serde(default)]
    internal: bool,
}

/// `GET /console/api/topics?offset=&limit=&search=&internal=`: a page of topics by
/// name, each with its partition count and record count (end minus start offsets).
async fn topics(
    State(gateway): State<Arc<Gateway>>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let (total, rows) = blocking(&gateway, move |g| {
        let (brokers, mut topics) = g
            .producer
            .cluster_metadata(None)
            .map_err(|e| e.to_string())?;
        topics.retain(|t| {
            (page.internal || !internal(g, &t.name)) && t.name.contains(page.search.as_str())
        });
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let total = topics.len();
        let shown: Vec<_> = topics.into_iter().skip(page.offset).take(limit).collect();
        let asked: Vec<(String, Vec<i32>)> = shown
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.partitions.iter().map(|(p, ..)| *p).collect(),
                )
            })
            .collect();
        let sizes = log_dir_sizes(&brokers, Some(&asked));
        let mut rows = Vec::new();
        for t in shown {
            let (mut records, mut end) = (0i64, 0i64);
            for (p, ..) in &t.partitions {
                let (low, high) = g
                    .producer
                    .watermarks(&t.name, *p)
                    .map_err(|e| e.to_string())?;
                records += (high - low).max(0);
                end += high.max(0);
            }
            let size = sizes.as_ref().map(|s| s.get(&t.name).copied().unwrap_or(0));
            rows.push(
                json!({"name": t.name, "partitions": t.partitions.len(), "records": records,
                             "end_offsets": end, "size_bytes": size}),
            );
        }
        Ok((total, rows))
    })
    .await?;
    // Retention of the page's topics, in one DescribeConfigs.
    let mut rows = rows;
    if let Ok(admin) = admin(&gateway) {
        use rdkafka::admin::ResourceSpecifier;
        let names: Vec<String> = rows
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect();
        let resources: Vec<_> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
        if let Ok(results) = admin.describe_configs(&resources, &admin_options()).await {
            for (row, result) in rows.iter_mut().zip(results) {
                let retention = result
                    .ok()
                    .and_then(|r| r.get("retention.ms").and_then(|e| e.value.clone()));
                row["retention_ms"] = json!(retention.and_then(|v| v.parse::<i64>().ok()));
            }
        }
    }
    Ok(
        Json(json!({"total": total, "offset": page.offset, "limit": limit, "topics": rows}))
            .into_response(),
    )
}

/// `GET /console/api/topics/{topic}`: its partitions with their leader and start and
/// end offsets, and its JSON Schema (`null`: none).
async fn topic(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_topic_name(&name)?;
    let wanted = name.clone();
    let found = blocking(&gateway, move |g| {
        let Some(t) = g
            .producer
            .topics_metadata(Some(&wanted))
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|t| t.name == wanted)
        else {
            return Ok(None);
        };
        let mut partitions = Vec::new();
        for (p, leader, ..) in &t.partitions {
            let (low, high) = g
                .producer
                .watermarks(&t.name, *p)
                .map_err(|e| e.to_string())?;
            partitions.push(json!({"partition": p, "leader": leader, "start": low, "end": high}));
        }
        Ok(Some(partitions))
    })
    .await?;
    match found {
        Some(partitions) => {
            let schema = gateway.schemas.get(&name).map(|s| s.document.clone());
            Ok(
                Json(json!({"name": name, "partitions": partitions, "schema": schema}))
                    .into_response(),
            )
        }
        None => Err(ApiError::topic_not_found(&name)),
    }
}

/// How long a broker may take to answer DescribeLogDirs; largest answer read.
const LOG_DIRS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LOG_DIRS_ANSWER: usize = 64 << 20;

/// Bytes on disk of each topic (only `topics`, with their partitions, or all), summed
/// over every broker's log directories (replicas included), by DescribeLogDirs v1 to
/// each broker; `None` when no broker answered (a cluster that does not serve it, a
/// TLS listener). A topic no broker holds a byte of is missing from the map.
fn log_dir_sizes(
    brokers: &[crate::producer::BrokerAddress],
    topics: Option<&[(String, Vec<i32>)]>,
) -> Option<std::collections::HashMap<String, i64>> {
    use protocol::kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
    use protocol::kafka_protocol::messages::{DescribeLogDirsRequest, TopicName};
    use protocol::kafka_protocol::protocol::StrBytes;
    if topics.is_some_and(|t| t.is_empty()) {
        return Some(Default::default());
    }
    let request = DescribeLogDirsRequest::default().with_topics(topics.map(|names| {
        names
            .iter()
            .map(|(name, partitions)| {
                DescribableLogDirTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(name.clone())))
                    .with_partitions(partitions.clone())
            })
            .collect()
    }));
    let mut sizes: Option<std::collections::HashMap<String, i64>> = None;
    for (_, host, port) in brokers {
        let answer = protocol::client::connect(&format!("{host}:{port}"), LOG_DIRS_TIMEOUT)
            .and_then(|mut stream| {
                protocol::client::call(
                    &mut stream,
                    &request,
                    1,
                    1,
                    "freshet-console",
                    MAX_LOG_DIRS_ANSWER,
                )
            });
        let Ok(answer) = answer else { continue };
        if answer.error_code != 0 {
            continue;
        }
        let sizes = sizes.get_or_insert_with(Default::default);
        for dir in answer.results.iter().filter(|d| d.error_code == 0) {
            for topic in &dir.topics {
                let bytes: i64 = topic
                    .partitions
                    .iter()
                    .map(|p| p.partition_size.max(0))
                    .sum();
                *sizes.entry(topic.name.0.to_string()).or_default() += bytes;
            }
        }
    }
    sizes
}

#[derive(Deserialize)]
struct NewTopicBody {
    name: String,
    #[serde(default = "one")]
    partitions: i32,
}

fn one() -> i32 {
    1
}

fn admin(gateway: &Gateway) -> Result<AdminClient<DefaultClientContext>, ApiError> {
    gateway
        .config
        .client()
        .create()
        .map_err(|e| ApiError::busy(format!("cannot reach the cluster: {e}")))
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// `POST /console/api/topics` `{"name", "partitions"}`: creates a topic.
async fn create_topic(
    State(gateway): State<Arc<Gateway>>,
    Json(body): Json<NewTopicBody>,
) -> Result<Response, ApiError> {
    check_topic_name(&body.name)?;
    if !(1..=10_000).contains(&body.partitions) {
        return Err(ApiError::bad_request(
            "partitions must be between 1 and 10000",
        ));
    }
    let admin = admin(&gateway)?;
    let new = NewTopic::new(&body.name, body.partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &admin_options())
        .await
        .map_err(|e| ApiError::busy(e.to_string()))?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                0,
                format!("cannot create topic '{topic}': {code}"),
            ));
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": body.name, "partitions": body.partitions})),
    )
        .into_response())
}

/// `DELETE /console/api/topics/{topic}`: deletes a topic.
async fn delete_topic(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_topic_name(&name)?;
    let admin = admin(&gateway)?;
    let results = admin
        .delete_topics(&[&name], &admin_options())
        .await
        .map_err(|e| ApiError::busy(e.to_string()))?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(match code {
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition => {
                    ApiError::topic_not_found(&topic)
                }
                code => ApiError::new(
                    StatusCode::CONFLICT,
                    0,
                    format!("cannot delete topic '{topic}': {code}"),
                ),
            });
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How long a group lookup waits for each answer of the cluster.
const GROUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A consumer that looks at `group` without joining it (it never subscribes), and
/// creates no topic.
fn group_client(gateway: &Gateway, group: &str) -> Result<rdkafka::consumer::BaseConsumer, String> {
    gateway
        .config
        .client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| e.to_string())
}

fn lookup(e: crate::groups::LookupError) -> String {
    format!("{}{}", e.error, e.what)
}

/// `GET /console/api/groups?offset=&limit=&search=`: a page of the cluster's consumer
/// groups by name, with their state, member count and assignor. Only the page's groups
/// are described: ListGroups names them all, DescribeGroups asks for the page alone.
async fn groups(
    State(gateway): State<Arc<Gateway>>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let (total, rows) = blocking(&gateway, move |g| {
        let client: AdminClient<DefaultClientContext> =
            g.config.client().create().map_err(|e| e.to_string())?;
        let mut all = crate::admin::list_consumer_groups(client.inner())?;
        all.retain(|l| l.name.contains(page.search.as_str()));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let total = all.len();
        let shown: Vec<_> = all.into_iter().skip(page.offset).take(limit).collect();
        let names: Vec<&str> = shown.iter().map(|l| l.name.as_str()).collect();
        let described = crate::admin::describe_consumer_groups(client.inner(), &names)?;
        let rows = shown
            .iter()
            .map(|listing| {
                let description = described.iter().find(|d| d.name == listing.name);
                json!({
                    "name": listing.name,
                    "state": description.map_or(listing.state.as_str(), |d| d.state.as_str()),
                    "type": if listing.simple { "simple" } else { "consumer" },
                    "members": description.map(|d| d.members),
                    "assignor": description.map(|d| d.assignor.as_str()),
                    "error": description.and_then(|d| d.error.as_deref()),
                })
            })
            .collect::<Vec<_>>();
        Ok((total, rows))
    })
    .await?;
    Ok(
        Json(json!({"total": total, "offset": page.offset, "limit": limit, "groups": rows}))
            .into_response(),
    )
}

/// `GET /console/api/groups/{group}`: its state, members with their assignments, and
/// per partition it committed or is assigned: the committed offset, the log end, the
/// lag in records and in seconds (the age of the oldest record not consumed).
async fn group(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let wanted = name.clone();
    let answer = blocking(&gateway, move |g| {
        use rdkafka::consumer::Consumer;
        let client = group_client(g, &wanted)?;
        // ListGroups waits for metadata first (see groups::fetch_groups).
        client
            .fetch_metadata(None, GROUP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let summary = crate::groups::fetch_groups(&client, Some(&wanted), GROUP_TIMEOUT)
            .map_err(lookup)?
            .into_iter()
            .find(|s| s.name == wanted);
        let Some(summary) = summary else {
            return Ok(None);
        };
        let lags = crate::groups::committed_lags(&client, &summary, GROUP_TIMEOUT)
            .map_err(lookup)?;
        let behind: Vec<(String, i32, i64)> = lags
            .iter()
            .filter_map(|l| l.committed.filter(|c| *c < l.log_end).map(|c| (l.topic.clone(), l.partition, c)))
            .take(MAX_PAGE)
            .collect();
        let ages = oldest_unconsumed_ages(g, &behind);
        let members: Vec<_> = summary
            .members
            .iter()
            .map(|m| {
                let assignment: Vec<_> = match &m.assignment {
                    Some(Ok(a)) => a.iter().map(|(t, ps)| json!({"topic": t, "partitions": ps})).collect(),
                    _ => Vec::new(),
                };
                json!({"id": m.id, "client_id": m.client_id, "host": m.host, "assignment": assignment})
            })
            .collect();
        let partitions: Vec<_> = lags
            .iter()
            .map(|l| {
                let lag = l.committed.map(|c| (l.log_end - c).max(0));
                let seconds = match lag {
                    Some(0) => Some(0.0),
                    _ => ages.get(&(l.topic.clone(), l.partition)).copied(),
                };
                json!({"topic": l.topic, "partition": l.partition, "committed": l.committed,
                       "log_end": l.log_end, "lag": lag, "lag_seconds": seconds})
            })
            .collect();
        Ok(Some(json!({"name": summary.name, "state": summary.state, "protocol_type": summary.protocol_type,
                       "protocol": summary.protocol, "members": members, "partitions": partitions})))
    })
    .await?;
    match answer {
        Some(body) => Ok(Json(body).into_response()),
        None => Err(ApiError::not_found(
            4,
            format!("Consumer group '{name}' not found."),
        )),
    }
}

/// Per (topic, partition, offset): seconds since the timestamp of the record at that
/// offset, read by one consumer assigned to all of them (no group); a partition that
/// gives nothing within a second has no age.
fn oldest_unconsumed_ages(
    gateway: &Gateway,
    at: &[(String, i32, i64)],
) -> std::collections::HashMap<(String, i32), f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let mut ages = std::collections::HashMap::new();
    if at.is_empty() {
        return ages;
    }
    let Ok(reader) = gateway
        .config
        .client()
        .set("group.id", "freshet-console-lag")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "1048576")
        .set("max.partition.fetch.bytes", "65536")
        .create::<BaseConsumer>()
    else {
        return ages;
    };
    let mut assignment = rdkafka::TopicPartitionList::new();
    for (topic, partition, offset) in at {
        let _ =
            assignment.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset));
    }
    if reader.assign(&assignment).is_err() {
        return ages;
    }
    let now = crate::now_ms();
    let deadline = Instant::now() + Duration::from_secs(1);
    while ages.len() < at.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            let key = (m.topic().to_string(), m.partition());
            if let (false, Some(ts)) = (ages.contains_key(&key), m.timestamp().to_millis()) {
                ages.insert(key, (now - ts).max(0) as f64 / 1000.0);
            }
        }
    }
    ages
}

/// `GET /console/api/topics/{topic}/configs`: every config of the topic (DescribeConfigs)
/// with its value and whether it is the default, read-only or sensitive (no value).
async fn topic_configs(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    use rdkafka::admin::ResourceSpecifier;
    check_topic_name(&name)?;
    let admin = admin(&gateway)?;
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(&name)], &admin_options())
        .await
        .map_err(|e| ApiError::busy(e.to_string()))?;
    let Some(result) = results.into_iter().next() else {
        return Err(ApiError::busy("the cluster gave no answer"));
    };
    let resource = result.map_err(|code| match code {
        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition => {
            ApiError::topic_not_found(&name)
        }
        code => ApiError::busy(format!("cannot describe topic '{name}': {code}")),
    })?;
    let mut entries: Vec<_> = resource
        .entries
        .iter()
        .map(|e| {
            json!({"name": e.name, "value": if e.is_sensitive { None } else { e.value.clone() },
                   "default": e.is_default, "read_only": e.is_read_only, "sensitive": e.is_sensitive})
        })
        .collect();
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(json!({"name": name, "configs": entries})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigChanges {
    /// Keys to set, with their new values.
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    /// Keys to return to the cluster's default.
    #[serde(default)]
    delete: Vec<String>,
}

/// `PUT /console/api/topics/{topic}/configs` `{"set": {KEY: VALUE}, "delete": [KEY]}`:
/// IncrementalAlterConfigs, so only the named keys change (as `freshet topic
/// alter-config` does). The cluster's refusal comes back as a 400 with its message.
async fn alter_topic_configs(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Json(changes): Json<ConfigChanges>,
) -> Result<Response, ApiError> {
    use crate::admin::ConfigChange;
    check_topic_name(&name)?;
    if changes.set.is_empty() && changes.delete.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to change: give \"set\" or \"delete\"",
        ));
    }
    let topic = name.clone();
    let outcome = blocking(&gateway, move |g| {
        let client: AdminClient<DefaultClientContext> =
            g.config.client().create().map_err(|e| e.to_string())?;
        let list: Vec<ConfigChange<'_>> = changes
            .set
            .iter()
            .map(|(key, value)| ConfigChange::Set(key, value))
            .chain(changes.delete.iter().map(|key| ConfigChange::Delete(key)))
            .collect();
        // The cluster's answer is the outcome; only a client that cannot be made is
        // the blocking call's error.
        Ok(crate::admin::incremental_alter_topic_configs(
            client.inner(),
            &topic,
            &list,
        ))
    })
    .await?;
    match outcome {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(line) if line.starts_with("UNKNOWN_TOPIC_OR_PARTITION") => {
            Err(ApiError::topic_not_found(&name))
        }
        // librdkafka's own errors (`_TRANSPORT`, `_TIMED_OUT`) are the cluster away.
        Err(line) if line.starts_with('_') => Err(ApiError::busy(line)),
        Err(line) => Err(ApiError::bad_request(line)),
    }
}

/// Records one search returns at most.
const MAX_SEARCH_RECORDS: usize = 100;

#[derive(Deserialize)]
struct Search {
    partition: i32,
    /// From this offset...
    offset: Option<i64>,
    /// ... or from the first record at or after this time (epoch ms).
    timestamp: Option<i64>,
    limit: Option<usize>,
}

/// `GET /console/api/topics/{topic}/records?partition=P&offset=O|timestamp=T&limit=N`:
/// up to `limit` (at most 100) records of one partition from an offset or a time.
async fn records(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(search): Query<Search>,
) -> Result<Response, ApiError> {
    check_topic_name(&name)?;
    let limit = search.limit.unwrap_or(20).clamp(1, MAX_SEARCH_RECORDS);
    let topic = name.clone();
    let found = blocking(&gateway, move |g| {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        use rdkafka::{Offset, TopicPartitionList};
        let (low, high) = g
            .producer
            .watermarks(&topic, search.partition)
            .map_err(|e| e.to_string())?;
        let reader: BaseConsumer = g
            .config
            .client()
            .set("group.id", "freshet-console-search")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(|e| e.to_string())?;
        let start = match (search.offset, search.timestamp) {
            (Some(offset), _) => offset.clamp(low, high),
            (None, Some(ts)) => {
                let mut at = TopicPartitionList::new();
                at.add_partition_offset(&topic, search.partition, Offset::Offset(ts))
                    .map_err(|e| e.to_string())?;
                let found = reader
                    .offsets_for_times(at, GROUP_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                match found.elements().first().map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= 0 => o,
                    _ => high, // no record at or after that time
                }
            }
            (None, None) => low,
        };
        let mut out = Vec::new();
        if start < high {
            let mut at = TopicPartitionList::new();
            at.add_partition_offset(&topic, search.partition, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
            reader.assign(&at).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + GROUP_TIMEOUT;
            while out.len() < limit && Instant::now() < deadline {
                match reader.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
                        out.push(json!({"partition": m.partition(), "offset": m.offset(),
                            "timestamp": m.timestamp().to_millis(), "key": text(m.key()), "value": text(m.payload())}));
                        if m.offset() + 1 >= high {
                            break;
                        }
                    }
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(e.to_string()),
                    None => {}
                }
            }
        }
        Ok(json!({"topic": topic, "partition": search.partition, "start": start, "records": out}))
    })
    .await?;
    Ok(Json(found).into_response())
}

#[derive(Deserialize)]
struct ResetBody {
    topic: String,
    /// `"earliest"`, `"latest"` or an offset (clamped to each partition's log).
    to: serde_json::Value,
    /// Only this partition (default: every partition of the topic).
    partition: Option<i32>,
}

/// `POST /console/api/groups/{group}/reset` `{"topic", "to", "partition"}`: sets the
/// group's committed offsets of a topic. Refused (409) while the group has members,
/// as `freshet group reset-offsets` and Kafka's tool refuse it: stop its consumers
/// first.
async fn reset_group(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Json(body): Json<ResetBody>,
) -> Result<Response, ApiError> {
    use crate::groups::Target;
    check_topic_name(&body.topic)?;
    let target = match &body.to {
        serde_json::Value::String(s) if s == "earliest" => Target::Earliest,
        serde_json::Value::String(s) if s == "latest" => Target::Latest,
        v => match v.as_i64() {
            Some(offset) => Target::Offset(offset),
            None => {
                return Err(ApiError::bad_request(
                    "to must be \"earliest\", \"latest\" or an offset",
                ))
            }
        },
    };
    let group = name.clone();
    let outcome = blocking(&gateway, move |g| {
        use rdkafka::consumer::Consumer;
        let client = group_client(g, &group)?;
        let metadata = client
            .fetch_metadata(None, GROUP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let Some(topic) = metadata.topics().iter().find(|t| t.name() == body.topic) else {
            return Ok(Err(ApiError::topic_not_found(&body.topic)));
        };
        let partitions: Vec<i32> = topic
            .partitions()
            .iter()
            .map(|p| p.id())
            .filter(|p| body.partition.is_none_or(|only| only == *p))
            .collect();
        if partitions.is_empty() {
            return Ok(Err(ApiError::bad_request(format!(
                "topic '{}' has no partition {:?}",
                body.topic, body.partition
            ))));
        }
        let mut offsets = Vec::new();
        let mut shown = Vec::new();
        for p in partitions {
            let (low, high) = g
                .producer
                .watermarks(&body.topic, p)
                .map_err(|e| e.to_string())?;
            let (offset, clamped) = crate::groups::new_offset(target, low.max(0), high.max(low.max(0)));
            offsets.push((p, offset));
            shown.push(json!({"partition": p, "offset": offset, "clamped": clamped}));
        }
        // As late as possible before the commit, which the coordinator refuses anyway
        // if a member joined since.
        let active = crate::groups::fetch_groups(&client, Some(&group), GROUP_TIMEOUT)
            .map_err(lookup)?
            .into_iter()
            .find(|s| s.name == group)
            .filter(|s| !crate::groups::INACTIVE_STATES.contains(&s.state.as_str()));
        if let Some(s) = active {
            return Ok(Err(ApiError::new(
                StatusCode::CONFLICT,
                0,
                format!(
                    "group '{group}' is active (state {}, members: {}); offsets can only be reset while it has no members, so stop its consumers first",
                    s.state,
                    s.members.len()
                ),
            )));
        }
        crate::groups::commit_offsets(&client, &body.topic, &offsets, GROUP_TIMEOUT).map_err(
            |e| match e {
                crate::groups::CommitError::Lookup(e) => lookup(e),
                crate::groups::CommitError::Mismatch(m) => m,
            },
        )?;
        Ok(Ok(json!({"group": group, "topic": body.topic, "offsets": shown})))
    })
    .await?;
    outcome.map(|body| Json(body).into_response())
}
