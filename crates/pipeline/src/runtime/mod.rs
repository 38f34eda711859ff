//! Runs one pipeline as a Kafka client: reads its sources, feeds each record to the
//! operators of the queries that read it, writes their rows to the output topics (and
//! late and bad records to the late and dead-letter topics), and checkpoints the
//! operators' state with the source offsets it reflects.
//!
//! Exactly-once results, at-least-once rows: a checkpoint is written only after every
//! row emitted before it is acknowledged (acks=all), and a restart resumes from the
//! last checkpoint's state *and* offsets, so every input record is counted exactly
//! once in the state. Rows emitted after the last checkpoint are emitted again after a
//! crash, with the same values for final rows.
//!
//! One thread per pipeline: [`run`] blocks until `stop` is set or an error ends it.

pub mod catalog;
pub mod checkpoint;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use sql::expr::Input;
use sql::plan::Body;

use crate::ops::{self, Fate, QueryOperator, Row};
use checkpoint::{Checkpoint, Counters, StateTopic};

/// How long a request to the cluster may take before the run gives up.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often operators are ticked (idle partitions, EMIT CHANGES) while input flows
/// or not.
const TICK: Duration = Duration::from_millis(50);

/// Why a pipeline could not be created or stopped running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file was refused: fix it and create the pipeline again.
    #[error("{0}")]
    Sql(#[from] sql::SqlError),
    /// The name is not usable as a pipeline name.
    #[error("{0}")]
    Name(String),
    /// The state grew past `max-state-bytes`: the pipeline stopped.
    #[error("state limit: {used} bytes of state, more than max-state-bytes = {limit}; raise it (SET 'max-state-bytes' = '...') or shorten windows")]
    StateLimit { used: u64, limit: u64 },
    /// The cluster did not answer or refused a request: worth a retry.
    #[error("{0}")]
    Cluster(String),
}

impl Error {
    /// Whether retrying the same definition may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Cluster(_))
    }
}

/// The topics a pipeline writes besides its outputs.
pub fn late_topic(name: &str, plan: &sql::Pipeline) -> String {
    plan.settings
        .late_topic
        .clone()
        .unwrap_or_else(|| format!("{name}.late"))
}

pub fn dead_letter_topic(name: &str, plan: &sql::Pipeline) -> String {
    plan.settings
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{name}.dead-letter"))
}

pub fn state_topic(name: &str) -> String {
    format!("_freshet.pipeline.{name}.state")
}

/// The consumer group a pipeline commits its checkpointed offsets under (for lag
/// tools; restarts use the checkpoint's own offsets).
pub fn group_id(name: &str) -> String {
    format!("freshet-pipeline-{name}")
}

/// A pipeline name: what a topic name allows (it names the pipeline's own topics).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Name(format!(
            "pipeline name '{name}': use 1 to 200 of the characters a-z A-Z 0-9 . _ -"
        )))
    }
}

/// What a run shows while it goes: read by `describe`.
#[derive(Debug, Default)]
pub struct Stats {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    pub late: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub checkpoints: AtomicU64,
    pub state_bytes: AtomicU64,
    /// Sum over source partitions of (end offset - next offset to read), at the last
    /// checkpoint; -1 before the first.
    pub lag: AtomicI64,
    /// The lowest watermark over the windowed queries, epoch ms (`i64::MIN`: none).
    pub watermark: AtomicI64,
    pub status: Mutex<Status>,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Starting,
    Running,
    /// Stopped by an error; `last_error` says which. Retried if transient.
    Failed,
    Stopped,
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        let stats = Stats::default();
        stats.lag.store(-1, Ordering::Relaxed);
        stats.watermark.store(i64::MIN, Ordering::Relaxed);
        Arc::new(stats)
    }

    pub fn set_status(&self, status: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    pub fn set_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// The JSON `describe` shows.
    pub fn describe(&self) -> serde_json::Value {
        let watermark = self.watermark.load(Ordering::Relaxed);
        let lag = self.lag.load(Ordering::Relaxed);
        serde_json::json!({
            "status": *self.status.lock().unwrap_or_else(|e| e.into_inner()),
            "records_in": self.records_in.load(Ordering::Relaxed),
            "records_out": self.records_out.load(Ordering::Relaxed),
            "late": self.late.load(Ordering::Relaxed),
            "dead_lettered": self.dead_lettered.load(Ordering::Relaxed),
            "checkpoints": self.checkpoints.load(Ordering::Relaxed),
            "state_bytes": self.state_bytes.load(Ordering::Relaxed),
            "source_lag": (lag >= 0).then_some(lag),
            "watermark": (watermark != i64::MIN).then_some(watermark),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn counters(&self) -> Counters {
        Counters {
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }

    fn restore(&self, c: &Counters) {
        self.records_in.store(c.records_in, Ordering::Relaxed);
        self.records_out.store(c.records_out, Ordering::Relaxed);
        self.late.store(c.late, Ordering::Relaxed);
        self.dead_lettered.store(c.dead_lettered, Ordering::Relaxed);
    }
}

/// A pipeline compiled against the cluster, ready to run.
pub struct Prepared {
    pub name: String,
    pub plan: sql::Pipeline,
    /// Partition count of each source topic.
    sources: Vec<(String, i32)>,
    client: ClientConfig,
}

/// Checks the name, compiles `sql_text` against the cluster's topics (and their
/// sampled columns): the errors a user must see at creation.
pub fn prepare(name: &str, sql_text: &str, client: &ClientConfig) -> Result<Prepared, Error> {
    check_name(name)?;
    let catalog = catalog::ClusterCatalog::load(client, CLUSTER_TIMEOUT).map_err(Error::Cluster)?;
    let plan = sql::compile(sql_text, &catalog)?;
    let mut sources: Vec<(String, i32)> = Vec::new();
    for query in &plan.queries {
        if !sources.iter().any(|(t, _)| *t == query.source.topic) {
            let partitions = catalog
                .partitions
                .get(&query.source.topic)
                .copied()
                .unwrap_or(1);
            sources.push((query.source.topic.clone(), partitions));
        }
    }
    Ok(Prepared {
        name: name.to_string(),
        plan,
        sources,
        client: client.clone(),
    })
}

/// A stable hash of the plan: a checkpoint of a different plan is not restored.
pub fn plan_hash(plan: &sql::Pipeline) -> u64 {
    let text = serde_json::to_string(plan).unwrap_or_default();
    // FNV-1a, 64 bits: stable across builds and processes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counts what the output producer could not deliver: any failure fails the run
/// before its next checkpoint, so a checkpoint never covers a lost row.
#[derive(Default)]
struct Delivery {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct DeliveryContext(Arc<Delivery>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, message)) = result {
            self.0.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.0.first_error.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| {
                format!("cannot write to topic '{}': {err}", message.topic())
            });
        }
    }
}

/// One query being run.
struct Running {
    operator: QueryOperator,
    output: String,
    windowed: bool,
}

/// Runs `prepared` until `stop` is set (then a last checkpoint is written) or an
/// error ends the run.
pub fn run(prepared: &Prepared, stats: &Stats, stop: &AtomicBool) -> Result<(), Error> {
    let cluster = |e: String| Error::Cluster(e);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let name = &prepared.name;
    let plan = &prepared.plan;
    let late = late_topic(name, plan);
    let dead = dead_letter_topic(name, plan);
    let state_name = state_topic(name);

    // The topics it writes, created if missing: outputs with the partition count of
    // their query's source, the others with one.
    let mut topics: Vec<(String, i32)> = Vec::new();
    for query in &plan.queries {
        let partitions = prepared
            .sources
            .iter()
            .find(|(t, _)| *t == query.source.topic)
            .map_or(1, |(_, p)| *p);
        topics.push((query.output.clone(), partitions));
    }
    topics.push((late.clone(), 1));
    topics.push((dead.clone(), 1));
    create_topics(&rt, &prepared.client, &topics, &state_name).map_err(cluster)?;

    let state =
        StateTopic::open(&prepared.client, &state_name, CLUSTER_TIMEOUT).map_err(cluster)?;
    let hash = plan_hash(plan);
    let mut queries: Vec<Running> = plan
        .queries
        .iter()
        .map(|q| Running {
            operator: QueryOperator::new(q, &plan.settings),
            output: q.output.clone(),
            windowed: matches!(&q.body, Body::Aggregate(a) if a.window.is_some()),
        })
        .collect();
    // Next offset to read per (source index, partition).
    let mut positions: Vec<Vec<i64>> = prepared
        .sources
        .iter()
        .map(|(_, p)| vec![-1; *p as usize])
        .collect();
    match state.read_last().map_err(cluster)? {
        Some(checkpoint)
            if checkpoint.plan_hash == hash && checkpoint.operators.len() == queries.len() =>
        {
            for (query, bytes) in queries.iter_mut().zip(&checkpoint.operators) {
                query
                    .operator
                    .restore(bytes)
                    .map_err(|e| Error::Cluster(format!("cannot restore the checkpoint: {e}")))?;
            }
            for (topic, partition, offset) in &checkpoint.offsets {
                if let Some(s) = prepared.sources.iter().position(|(t, _)| t == topic) {
                    if let Some(p) = positions[s].get_mut(*partition as usize) {
                        *p = *offset;
                    }
                }
            }
            stats.restore(&checkpoint.counters);
            tracing::info!(pipeline = %name, "resuming from the last checkpoint");
        }
        Some(_) => {
            tracing::warn!(pipeline = %name, "the last checkpoint is of another definition: starting afresh")
        }
        None => {}
    }

    // Which queries read each source.
    let readers: Vec<Vec<usize>> = prepared
        .sources
        .iter()
        .map(|(topic, _)| {
            (0..queries.len())
                .filter(|&i| plan.queries[i].source.topic == *topic)
                .collect()
        })
        .collect();
    let needs_json: Vec<bool> = readers
        .iter()
        .map(|qs| qs.iter().any(|&i| plan.queries[i].source.json))
        .collect();
    let source_index: HashMap<&str, usize> = prepared
        .sources
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (t.as_str(), i))
        .collect();

    let consumer: BaseConsumer = prepared
        .client
        .clone()
        .set("group.id", group_id(name))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let mut assignment = TopicPartitionList::new();
    for (s, (topic, partitions)) in prepared.sources.iter().enumerate() {
        for p in 0..*partitions {
            let offset = match positions[s][p as usize] {
                o if o >= 0 => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            assignment
                .add_partition_offset(topic, p, offset)
                .map_err(|e| Error::Cluster(e.to_string()))?;
        }
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let now = now_ms();
    for (s, (_, partitions)) in prepared.sources.iter().enumerate() {
        let parts: Vec<i32> = (0..*partitions).collect();
        for &q in &readers[s] {
            queries[q].operator.assign(&parts, now);
        }
    }

    let delivery = Arc::new(Delivery::default());
    let producer: ThreadedProducer<DeliveryContext> = prepared
        .client
        .clone()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set(
            "message.timeout.ms",
            CLUSTER_TIMEOUT.as_millis().to_string(),
        )
        .create_with_context(DeliveryContext(delivery.clone()))
        .map_err(|e| Error::Cluster(e.to_string()))?;

    stats.set_status(Status::Running);
    let checkpoint_every =
        Duration::from_millis(plan.settings.checkpoint_interval_ms.max(10) as u64);
    let mut last_tick = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut out_count = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let polled = consumer.poll(TICK);
        let now = now_ms();
        match polled {
            Some(Ok(message)) => {
                let Some(&s) = source_index.get(message.topic()) else {
                    continue;
                };
                let partition = message.partition();
                if let Some(p) = positions[s].get_mut(partition as usize) {
                    *p = message.offset() + 1;
                }
                stats.records_in.fetch_add(1, Ordering::Relaxed);
                let json = if needs_json[s] {
                    match serde_json::from_slice::<serde_json::Value>(
                        message.payload().unwrap_or_default(),
                    ) {
                        Ok(json) => json,
                        Err(err) => {
                            send_copy(
                                &producer,
                                &dead,
                                &message,
                                &[("freshet.error", &format!("the value is not JSON: {err}"))],
                            )?;
                            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    serde_json::Value::Null
                };
                let headers: Vec<(String, Option<Vec<u8>>)> = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                let input = Input {
                    json: &json,
                    raw: message.payload().unwrap_or_default(),
                    key: message.key(),
                    timestamp: message.timestamp().to_millis().unwrap_or(0),
                    partition,
                    offset: message.offset(),
                    headers: &headers,
                };
                let mut late_sent = false;
                let mut dead_sent = false;
                for &q in &readers[s] {
                    let query = &mut queries[q];
                    match query.operator.process(&input, now, &mut rows) {
                        Ok(Fate::Done) => {}
                        Ok(Fate::Late) => {
                            if !late_sent {
                                send_copy(&producer, &late, &message, &[])?;
                                stats.late.fetch_add(1, Ordering::Relaxed);
                                late_sent = true;
                            }
                        }
                        Err(ops::Error::Rejected(reason)) => {
                            if !dead_sent {
                                send_copy(
                                    &producer,
                                    &dead,
                                    &message,
                                    &[("freshet.error", &reason)],
                                )?;
                                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                                dead_sent = true;
                            }
                        }
                        Err(ops::Error::StateLimit { used, limit }) => {
                            stats.state_bytes.store(used, Ordering::Relaxed);
                            return Err(Error::StateLimit { used, limit });
                        }
                    }
                    out_count += send_rows(&producer, &query.output, &mut rows)?;
                }
            }
            Some(Err(err)) => {
                tracing::debug!(pipeline = %name, error = %err, "pipeline: consumer");
            }
            None => {}
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            let mut watermark: Option<i64> = None;
            for query in &mut queries {
                query.operator.tick(now, &mut rows);
                out_count += send_rows(&producer, &query.output, &mut rows)?;
                if query.windowed {
                    if let Some(w) = query.operator.watermark() {
                        watermark = Some(watermark.map_or(w, |m: i64| m.min(w)));
                    }
                }
            }
            if let Some(w) = watermark {
                stats.watermark.store(w, Ordering::Relaxed);
            }
            stats
                .records_out
                .fetch_add(std::mem::take(&mut out_count), Ordering::Relaxed);
        }
        if last_checkpoint.elapsed() >= checkpoint_every {
            take_checkpoint(
                &rt, prepared, &state, &producer, &delivery, &consumer, &queries, &positions,
                stats, hash,
            )?;
            last_checkpoint = Instant::now();
        }
    }
    stats.records_out.fetch_add(out_count, Ordering::Relaxed);
    take_checkpoint(
        &rt, prepared, &state, &producer, &delivery, &consumer, &queries, &positions, stats, hash,
    )?;
    stats.set_status(Status::Stopped);
    Ok(())
}

/// Flushes the rows emitted so far (every one acknowledged, or the run fails), then
/// writes the state and the offsets it reflects, then commits those offsets to the
/// pipeline's group for lag tools.
#[allow(clippy::too_many_arguments)]
fn take_checkpoint(
    rt: &tokio::runtime::Runtime,
    prepared: &Prepared,
    state: &StateTopic,
    producer: &ThreadedProducer<DeliveryContext>,
    delivery: &Delivery,
    consumer: &BaseConsumer,
    queries: &[Running],
    positions: &[Vec<i64>],
    stats: &Stats,
    hash: u64,
) -> Result<(), Error> {
    producer
        .flush(CLUSTER_TIMEOUT)
        .map_err(|e| Error::Cluster(format!("cannot deliver the pipeline's rows: {e}")))?;
    if delivery.failed.load(Ordering::Relaxed) > 0 {
        let first = delivery
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        return Err(Error::Cluster(
            first.unwrap_or_else(|| "a row could not be delivered".into()),
        ));
    }
    let mut offsets = Vec::new();
    let mut commit = TopicPartitionList::new();
    let mut lag = 0i64;
    for (s, (topic, _)) in prepared.sources.iter().enumerate() {
        for (p, &next) in positions[s].iter().enumerate() {
            if next >= 0 {
                offsets.push((topic.clone(), p as i32, next));
                let _ = commit.add_partition_offset(topic, p as i32, Offset::Offset(next));
            }
            if let Ok((low, high)) =
                consumer.fetch_watermarks(topic, p as i32, Duration::from_millis(500))
            {
                lag += (high - next.max(low)).max(0);
            }
        }
    }
    let checkpoint = Checkpoint {
        plan_hash: hash,
        offsets,
        counters: stats.counters(),
        operators: queries.iter().map(|q| q.operator.snapshot()).collect(),
    };
    state.write(rt, &checkpoint).map_err(Error::Cluster)?;
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    stats.state_bytes.store(
        queries.iter().map(|q| q.operator.state_bytes()).sum(),
        Ordering::Relaxed,
    );
    stats.lag.store(lag, Ordering::Relaxed);
    if commit.count() > 0 {
        let _ = consumer.commit(&commit, CommitMode::Async);
    }
    Ok(())
}

/// Queues `rows` for `topic`, with the window headers; returns how many.
fn send_rows(
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let n = rows.len() as u64;
    for row in rows.drain(..) {
        let mut headers = OwnedHeaders::new_with_capacity(3);
        let bounds;
        if let Some((start, end)) = row.window {
            bounds = (start.to_string(), end.to_string());
            headers = headers
                .insert(Header {
                    key: "freshet.window_start",
                    value: Some(bounds.0.as_bytes()),
                })
                .insert(Header {
                    key: "freshet.window_end",
                    value: Some(bounds.1.as_bytes()),
                });
        }
        headers = headers.insert(Header {
            key: "freshet.final",
            value: Some(if row.is_final {
                &b"true"[..]
            } else {
                &b"false"[..]
            }),
        });
        let mut record = BaseRecord::to(topic)
            .payload(&row.value[..])
            .headers(headers);
        if let Some(key) = &row.key {
            record = record.key(&key[..]);
        }
        send(producer, record)?;
    }
    Ok(n)
}

/// Queues a copy of an input record (for the late and dead-letter topics), with its
/// key, timestamp and headers, plus `extra` headers.
fn send_copy(
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    message: &BorrowedMessage<'_>,
    extra: &[(&str, &str)],
) -> Result<(), Error> {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = message.headers() {
        for h in h.iter() {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let source = format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    headers = headers.insert(Header {
        key: "freshet.source",
        value: Some(source.as_bytes()),
    });
    for (key, value) in extra {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let mut record = BaseRecord::to(topic)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(ts) = message.timestamp().to_millis() {
        record = record.timestamp(ts);
    }
    send(producer, record)
}

/// Queues one record, waiting while librdkafka's queue is full.
fn send<'a>(
    producer: &ThreadedProducer<DeliveryContext>,
    mut record: BaseRecord<'a, [u8], [u8]>,
) -> Result<(), Error> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                // Let deliveries drain the queue.
                let _ = producer.flush(Duration::from_millis(10));
            }
            Err((err, _)) => return Err(Error::Cluster(format!("cannot queue a row: {err}"))),
        }
    }
}

fn create_topics(
    rt: &tokio::runtime::Runtime,
    client: &ClientConfig,
    topics: &[(String, i32)],
    state: &str,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(|e| e.to_string())?;
    let mut new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    new.push(NewTopic::new(state, 1, TopicReplication::Fixed(-1)).set("retention.ms", "-1"));
    let opts = AdminOptions::new().operation_timeout(Some(CLUSTER_TIMEOUT));
    let results = rt
        .block_on(admin.create_topics(&new, &opts))
        .map_err(|e| format!("cannot create the pipeline's topics: {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("cannot create topic '{topic}': {code}")),
        }
    }
    Ok(())
}
