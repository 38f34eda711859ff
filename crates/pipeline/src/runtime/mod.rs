//! Runs one pipeline as a Kafka client: reads its sources, feeds each record to the
//! operators of the queries that read it, writes their rows to the output topics (and
//! late and bad records to the late and dead-letter topics), and checkpoints the
//! operators' state with the offsets it reflects.
//!
//! Two stages ([`route`] and [`tasks`]), so that several instances of one pipeline
//! split the work through consumer groups and each group key's state lives in one
//! task, wherever the source put the record.
//!
//! Exactly-once results, at-least-once rows: a checkpoint is written only after every
//! row emitted before it is acknowledged (acks=all), and a task resumes from its last
//! checkpoint's state *and* offsets, dropping records the first stage sent twice, so
//! every input record is counted exactly once in the state. Rows emitted after the
//! last checkpoint are emitted again after a crash or a move, with the same values
//! for final rows.
//!
//! [`run`] blocks until `stop` is set or an error ends it.

mod batch;
pub mod catalog;
pub mod checkpoint;
mod json;
mod leave;
mod route;
pub mod sink;
mod tasks;
#[cfg(test)]
mod test_broker;
mod txn;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::Message;
use serde::Serialize;
use sql::plan::Exchange;

use crate::ops::Row;

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
    /// A consumer hit a fatal error, e.g. another process joined with the same static
    /// instance id and fenced this one: retrying would fence the other in turn.
    #[error("{0}")]
    Fatal(String),
    /// A checkpoint in the state topic cannot be read back (its chunks do not match
    /// its commit record, or it does not decode): retrying reads the same bytes, so
    /// the pipeline stops. Deleting the state topic starts it afresh.
    #[error("{0}")]
    Corrupt(String),
    /// Another instance claimed a task this one still ran (its group membership
    /// lapsed without it noticing): its checkpoint was refused. Retrying rejoins the
    /// group and takes whatever tasks it is given now.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A sink's table does not fit its query (missing, a column missing or of the
    /// wrong type): fix the table or the file.
    #[error("{0}")]
    Sink(String),
}

impl Error {
    /// Whether retrying the same definition may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Cluster(_) | Error::Fenced(_))
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

/// This machine's name: what tells a pipeline's instances apart when nothing else
/// does (its static instance id, its stage-1 transactional id).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
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
    /// Per sink: records of its topic applied to the target, and its lag (records of
    /// its topic not applied yet, over the partitions this instance holds).
    pub sinks: Mutex<std::collections::BTreeMap<String, SinkStats>>,
    pub checkpoints: AtomicU64,
    pub state_bytes: AtomicU64,
    /// Sum over the source partitions stage 1 holds of (end offset - next offset to
    /// read), at its last commit; -1 before the first.
    pub lag: AtomicI64,
    /// The same over the sources tasks here read directly.
    pub task_lag: AtomicI64,
    /// The lowest watermark over the windowed queries, epoch ms (`i64::MIN`: none).
    pub watermark: AtomicI64,
    pub status: Mutex<Status>,
    pub last_error: Mutex<Option<String>>,
    /// The topics the queries write (outputs and sinks' topics), once running.
    pub outputs: Mutex<Vec<String>>,
}

/// What `describe` shows of one sink.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SinkStats {
    pub rows: u64,
    /// -1 until known.
    pub lag: i64,
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
    /// Defined and not running, by a user's pause: its groups have no member here,
    /// and a resume goes on from its checkpoints and committed offsets.
    Paused,
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        let stats = Stats::default();
        stats.lag.store(-1, Ordering::Relaxed);
        stats.task_lag.store(-1, Ordering::Relaxed);
        stats.watermark.store(i64::MIN, Ordering::Relaxed);
        Arc::new(stats)
    }

    pub fn set_status(&self, status: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Counts a source record read. The run's first is logged: `bench/pipeline` times
    /// a run "once running" from that line.
    pub fn record_in(&self) {
        if self.records_in.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!("the first source record is read");
        }
    }

    pub fn set_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// The JSON `describe` shows.
    pub fn describe(&self) -> serde_json::Value {
        let watermark = self.watermark.load(Ordering::Relaxed);
        let lag = match (
            self.lag.load(Ordering::Relaxed),
            self.task_lag.load(Ordering::Relaxed),
        ) {
            (-1, -1) => -1,
            (a, b) => a.max(0) + b.max(0),
        };
        serde_json::json!({
            "status": *self.status.lock().unwrap_or_else(|e| e.into_inner()),
            "records_in": self.records_in.load(Ordering::Relaxed),
            "records_out": self.records_out.load(Ordering::Relaxed),
            "late": self.late.load(Ordering::Relaxed),
            "dead_lettered": self.dead_lettered.load(Ordering::Relaxed),
            "sinks": serde_json::to_value(&*self.sinks.lock().unwrap_or_else(|e| e.into_inner()))
                .unwrap_or_default(),
            "checkpoints": self.checkpoints.load(Ordering::Relaxed),
            "state_bytes": self.state_bytes.load(Ordering::Relaxed),
            "source_lag": (lag >= 0).then_some(lag),
            "watermark": (watermark != i64::MIN).then_some(watermark),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
            "outputs": *self.outputs.lock().unwrap_or_else(|e| e.into_inner()),
        })
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
    let mut plan = sql::compile(sql_text, &catalog)?;
    // The rows for a sink go through a topic of its own (`sink` module).
    let hash = plan_hash(&plan);
    for query in &mut plan.queries {
        if let Some(i) = query.sink {
            query.output = sink::sink_topic(name, hash, &plan.sinks[i].name);
        }
    }
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
    close_later(catalog);
    let mut client = client.clone();
    if client.get("enable.sparse.connections").is_none() {
        // librdkafka's default connects to a broker only once a request needs it,
        // after a reconnect back-off: the group coordinator's connection came 50 ms
        // after its address, in every start of a pipeline's consumers (a run's first
        // record read 110 ms after its start, 60 ms with this).
        client.set("enable.sparse.connections", "false");
    }
    Ok(Prepared {
        name: name.to_string(),
        plan,
        sources,
        client,
    })
}

/// Drops a Kafka client on a thread of its own: librdkafka's destroy takes about
/// 100 ms (its threads wind down), which a pipeline's start-up need not wait for
/// (it dropped two, 200 of the 520 ms before the first record was read).
fn close_later<T: Send + 'static>(client: T) {
    let dropped = std::thread::Builder::new()
        .name("kafka-client-close".into())
        .spawn(move || drop(client));
    if let Err(e) = dropped {
        tracing::debug!(error = %e, "closing a Kafka client in the background");
    }
}

/// Creates the topics a pipeline writes if missing: outputs (and sinks' topics) with
/// the partition count of their query's source (the largest, for a topic several
/// queries write), the late and dead-letter topics with one, the repartition topic
/// with one partition per routed task, the state topic with one per task. Done when
/// a pipeline is defined, so its results can be opened before its first row, and
/// again when it runs.
pub fn create_topics_of(prepared: &Prepared, rt: &tokio::runtime::Runtime) -> Result<(), Error> {
    let name = &prepared.name;
    let plan = &prepared.plan;
    let mut topics: Vec<(String, i32)> = Vec::new();
    for query in &plan.queries {
        let partitions = prepared
            .sources
            .iter()
            .find(|(t, _)| *t == query.source.topic)
            .map_or(1, |(_, p)| *p);
        match topics.iter_mut().find(|(t, _)| *t == query.output) {
            Some((_, p)) => *p = (*p).max(partitions),
            None => topics.push((query.output.clone(), partitions)),
        }
    }
    topics.push((late_topic(name, plan), 1));
    topics.push((dead_letter_topic(name, plan), 1));
    let layout = Layout::new(prepared, &repartition_topic(name));
    let mut internal = Vec::new();
    if layout.routed_tasks > 0 {
        internal.push((repartition_topic(name), layout.routed_tasks));
    }
    if layout.state_partitions > 0 {
        internal.push((state_topic(name), layout.state_partitions));
    }
    create_topics(rt, &prepared.client, &topics, &internal).map_err(Error::Cluster)
}

/// Version of the identity [`plan_hash`] gives a definition.
///
/// A definition's identity names its consumer groups and marks its checkpoints (a
/// checkpoint of another identity is not restored), so it must not change when
/// Freshet is upgraded: every pipeline would start afresh and ignore its state.
/// Version 1, the only one: FNV-1a (64 bits) of the plan's JSON. The rule that keeps
/// it: a field added to the plan is left out of that JSON at its default value
/// (`skip_serializing_if`), so a definition that does not use it keeps its identity;
/// `tests::identities_do_not_change` pins the identity of definitions of every kind.
/// A change that must move identities bumps this version and keeps computing the
/// old one for definitions that existed before it.
pub const PLAN_IDENTITY_VERSION: u32 = 1;

/// A definition's identity ([`PLAN_IDENTITY_VERSION`]): a checkpoint of a different
/// plan is not restored.
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

/// A run loop's wall clock, read once per [`Clock::EVERY`] records and whenever the
/// input pauses: reading it for each record costs more than some records do.
struct Clock {
    now: i64,
    unread: u32,
}

impl Clock {
    const EVERY: u32 = 64;

    fn new() -> Clock {
        Clock {
            now: now_ms(),
            unread: 0,
        }
    }

    /// After a read of `records` records: whether the clock was read now (time to
    /// look at the intervals and at `stop`).
    fn after_read(&mut self, records: usize) -> bool {
        self.unread = self.unread.saturating_add(records.max(1) as u32);
        if records > 0 && self.unread < Clock::EVERY {
            return false;
        }
        self.unread = 0;
        self.now = now_ms();
        true
    }
}

/// Milliseconds of the coarse monotonic clock (the kernel's last tick: a few ms
/// behind at most, and a fraction of a precise read's cost, which a loop that reads
/// it per record pays a million times a second).
fn coarse_ms() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC_COARSE always exists
    // on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    t.tv_sec * 1000 + t.tv_nsec / 1_000_000
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

/// Counts failed deliveries; for a task's transactional producer (`txn.rs`) also
/// keeps the offset of the last record delivered to each partition of the state
/// topic (where its checkpoint's commit record names its first chunk).
struct DeliveryContext(Arc<Delivery>, Option<Arc<txn::StateOffsets>>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Err((err, message)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.0.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| {
                    format!("cannot write to topic '{}': {err}", message.topic())
                });
            }
            Ok(message) => {
                if let Some(state) = &self.1 {
                    state.delivered(message.topic(), message.partition(), message.offset());
                }
            }
        }
    }
}

/// The consumer group of a pipeline's first stage (its source offsets, for lag tools
/// and for the instances to split the source partitions). The plan's hash is part of
/// it: a changed definition starts afresh, as ksqlDB does with a new query id.
pub fn group_id(name: &str, plan: &sql::Pipeline) -> String {
    format!("freshet-pipeline-{name}-{:08x}", plan_hash(plan) as u32)
}

/// The consumer group of a pipeline's second stage (the tasks).
pub fn tasks_group_id(name: &str, plan: &sql::Pipeline) -> String {
    format!("{}-tasks", group_id(name, plan))
}

pub fn repartition_topic(name: &str) -> String {
    format!("_freshet.pipeline.{name}.repartition")
}

/// Where the records of each query go, and which topics the tasks read.
///
/// The plan says where each query's records must be ([`Exchange`]); a grouped query
/// whose records are already there reads its source directly, one task per source
/// partition: `Exchange::InPlace` (grouped by `_key` alone), or a source of one
/// partition (a repartition would only copy the records). The others are routed
/// through the repartition topic, which has as many partitions as the largest of
/// their sources (Kafka Streams' rules).
struct Layout {
    /// Per query: run or routed by stage 1 (stateless, or grouped over several
    /// partitions).
    in_stage1: Vec<bool>,
    /// Per query: a grouped query read directly by its task.
    direct: Vec<bool>,
    /// Per sink: the source it reads itself, when every query into it is stateless
    /// and reads that one source (its rows then go from the source record straight
    /// into the database, not through the sink's topic).
    fused: Vec<Option<usize>>,
    /// Per source: whether stage 1 reads it.
    stage1_reads: Vec<bool>,
    /// Partitions of the repartition topic (0: nothing is routed).
    routed_tasks: i32,
    /// What the tasks read: (topic, first state partition), the repartition topic
    /// first if any, then each directly read source (a task per partition).
    inputs: Vec<(String, i32)>,
    /// Partitions of the state topic: one per task.
    state_partitions: i32,
}

impl Layout {
    fn new(prepared: &Prepared, repartition: &str) -> Layout {
        let partitions = |topic: &str| {
            prepared
                .sources
                .iter()
                .find(|(t, _)| t == topic)
                .map_or(1, |(_, p)| *p)
        };
        let queries = &prepared.plan.queries;
        let grouped: Vec<bool> = queries
            .iter()
            .map(|q| q.exchange() != Exchange::None)
            .collect();
        let direct: Vec<bool> = queries
            .iter()
            .map(|q| match q.exchange() {
                Exchange::None => false,
                Exchange::InPlace => true,
                Exchange::ByGroupKey => partitions(&q.source.topic) == 1,
            })
            .collect();
        let fused: Vec<Option<usize>> = (0..prepared.plan.sinks.len())
            .map(|i| {
                let into: Vec<&sql::plan::Query> =
                    queries.iter().filter(|q| q.sink == Some(i)).collect();
                let topic = &into.first()?.source.topic;
                if into
                    .iter()
                    .any(|q| q.exchange() != Exchange::None || q.source.topic != *topic)
                {
                    return None;
                }
                prepared.sources.iter().position(|(t, _)| t == topic)
            })
            .collect();
        let in_stage1: Vec<bool> = queries
            .iter()
            .zip(&direct)
            .map(|(q, d)| !d && q.sink.is_none_or(|i| fused[i].is_none()))
            .collect();
        let routed_tasks = queries
            .iter()
            .enumerate()
            .filter(|&(i, _)| grouped[i] && !direct[i])
            .map(|(_, q)| partitions(&q.source.topic))
            .max()
            .unwrap_or(0);
        let mut inputs = Vec::new();
        if routed_tasks > 0 {
            inputs.push((repartition.to_string(), 0));
        }
        let mut next = routed_tasks;
        for (i, q) in queries.iter().enumerate() {
            if direct[i] && !inputs.iter().any(|(t, _)| *t == q.source.topic) {
                inputs.push((q.source.topic.clone(), next));
                next += partitions(&q.source.topic);
            }
        }
        let stage1_reads = prepared
            .sources
            .iter()
            .map(|(t, _)| (0..queries.len()).any(|i| in_stage1[i] && queries[i].source.topic == *t))
            .collect();
        Layout {
            in_stage1,
            direct,
            fused,
            stage1_reads,
            routed_tasks,
            inputs,
            state_partitions: next,
        }
    }
}

/// The header that a record or a watermark marker carries on the repartition topic:
/// where it came from, so that the task drops copies and keeps each source
/// partition's watermark.
const ROUTE_HEADER: &str = "freshet.route";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    /// A marker carries only `high`: the highest event time its source partition
    /// has delivered.
    marker: bool,
    /// An idle marker: the source partition delivered nothing for the idle timeout
    /// (stage 1 decides; the tasks follow what their input says, so a replay decides
    /// the same). Only with `marker`.
    idle: bool,
    plan: u64,
    query: u32,
    source: u32,
    partition: i32,
    offset: i64,
    /// Records: the highest event time of the source partition before this record.
    high: Option<i64>,
}

impl Route {
    const LEN: usize = 37;

    fn encode(&self) -> [u8; Route::LEN] {
        let mut out = [0u8; Route::LEN];
        out[0] = match (self.marker, self.idle) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        out[1..9].copy_from_slice(&self.plan.to_be_bytes());
        out[9..13].copy_from_slice(&self.query.to_be_bytes());
        out[13..17].copy_from_slice(&self.source.to_be_bytes());
        out[17..21].copy_from_slice(&self.partition.to_be_bytes());
        out[21..29].copy_from_slice(&self.offset.to_be_bytes());
        out[29..37].copy_from_slice(&self.high.unwrap_or(i64::MIN).to_be_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<Route> {
        if b.len() != Route::LEN || b[0] > 2 {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let i64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            i64::from_be_bytes(a)
        };
        let high = i64_at(29);
        Some(Route {
            marker: b[0] >= 1,
            idle: b[0] == 2,
            plan: i64_at(1) as u64,
            query: u32_at(9),
            source: u32_at(13),
            partition: u32_at(17) as i32,
            offset: i64_at(21),
            high: (high != i64::MIN).then_some(high),
        })
    }
}

/// What both stages of a run share.
struct Shared<'a> {
    prepared: &'a Prepared,
    stats: &'a Stats,
    hash: u64,
    late: String,
    dead: String,
    repartition: String,
    layout: Layout,
    /// Per source: the top-level JSON fields its queries read.
    json_fields: Vec<json::Wanted>,
    /// Whether any query reads a header: a record's headers are parsed only then.
    reads_headers: bool,
    producer: ThreadedProducer<DeliveryContext>,
    delivery: Arc<Delivery>,
}

impl Shared<'_> {
    /// Waits until every record queued so far is acknowledged; fails if any was not.
    fn flush(&self) -> Result<(), Error> {
        flush(&self.producer, &self.delivery)
    }

    /// A consumer of one of the pipeline's groups (the two stages', the sinks').
    fn consumer<C: rdkafka::consumer::ConsumerContext>(
        &self,
        group: String,
        context: C,
    ) -> Result<BaseConsumer<C>, Error> {
        self.prepared
            .client
            .clone()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .set("max.partition.fetch.bytes", "8388608")
            // librdkafka's default (1 s) idles a reader whose queue filled up: one
            // 8 MiB fetch is over `queued.min.messages`, so a second of every
            // fetch's worth went by asleep (bench/pipeline, query B: 3x).
            .set("fetch.queue.backoff.ms", "10")
            // The rebalance callbacks assume the eager protocol (all revoked, then
            // all assigned).
            .set("partition.assignment.strategy", "range")
            .create_with_context(context)
            .map_err(|e| Error::Cluster(e.to_string()))
    }
}

/// Runs `prepared` until `stop` is set (then a last checkpoint is written) or an
/// error ends the run.
///
/// Two stages, each on its own thread, as Kafka Streams does with a repartition: the
/// router reads the sources in the pipeline's consumer group (instances of the same
/// pipeline split the source partitions), runs the stateless queries and sends each
/// record a grouped query counts to the repartition partition of its group key; the
/// tasks (one per repartition partition, and one per source of a single partition
/// that a grouped query reads directly; split among the instances by a second group)
/// hold the groups' state and checkpoint it with the offsets it reflects. A stage
/// with nothing to do does not run.
pub fn run(prepared: &Prepared, stats: &Stats, stop: &AtomicBool) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let name = &prepared.name;
    let plan = &prepared.plan;
    let shared = {
        let delivery = Arc::new(Delivery::default());
        let producer: ThreadedProducer<DeliveryContext> = prepared
            .client
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            // Only failures are reported (`Delivery` counts nothing else); `flush`
            // still waits for every record's acknowledgement. A report per record
            // cost the producer's polling thread a tenth of a grouped query's time.
            .set("delivery.report.only.error", "true")
            .set(
                "message.timeout.ms",
                CLUSTER_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(DeliveryContext(delivery.clone(), None))
            .map_err(|e| Error::Cluster(e.to_string()))?;
        Shared {
            prepared,
            stats,
            hash: plan_hash(plan),
            late: late_topic(name, plan),
            dead: dead_letter_topic(name, plan),
            repartition: repartition_topic(name),
            layout: Layout::new(prepared, &repartition_topic(name)),
            json_fields: prepared
                .sources
                .iter()
                .map(|(topic, _)| {
                    plan.queries
                        .iter()
                        .filter(|q| q.source.topic == *topic)
                        .flat_map(|q| q.json_fields())
                        .collect()
                })
                .collect(),
            reads_headers: plan.queries.iter().any(|q| q.reads_headers()),
            producer,
            delivery,
        }
    };

    create_topics_of(prepared, &rt)?;
    let layout = &shared.layout;
    {
        let mut outputs: Vec<String> = Vec::new();
        for q in &plan.queries {
            if !outputs.contains(&q.output) {
                outputs.push(q.output.clone());
            }
        }
        *stats.outputs.lock().unwrap_or_else(|e| e.into_inner()) = outputs;
    }

    stats.set_status(Status::Running);
    // Any stage failing stops the others.
    let halt = AtomicBool::new(false);
    let stopping = || stop.load(Ordering::Relaxed) || halt.load(Ordering::Relaxed);
    let stage1 = layout.stage1_reads.iter().any(|r| *r);
    let stage2 = !layout.inputs.is_empty();
    // One thread per sink, beside the stages.
    std::thread::scope(|scope| {
        let mut sinks = Vec::new();
        for (i, s) in plan.sinks.iter().enumerate() {
            let (shared, stopping, halt) = (&shared, &stopping, &halt);
            let thread = std::thread::Builder::new()
                .name(format!("pipeline-{name}-sink-{}", s.name))
                .spawn_scoped(scope, move || {
                    let r = sink::run(shared, i, stopping);
                    if r.is_err() {
                        halt.store(true, Ordering::Relaxed);
                    }
                    r
                })
                .map_err(|e| Error::Cluster(format!("cannot start a thread: {e}")));
            sinks.push(thread);
        }
        let stages = run_stages(&shared, stage1, stage2, &stopping, &halt);
        halt.store(true, Ordering::Relaxed);
        for thread in sinks {
            thread?
                .join()
                .unwrap_or_else(|_| Err(Error::Cluster("a sink's thread panicked".into())))?;
        }
        stages
    })?;
    // A clean stop: a static member's partitions go to the other instances now, not
    // after the session timeout.
    if stop.load(Ordering::Relaxed) {
        let mut groups = Vec::new();
        if stage1 {
            groups.push(group_id(name, plan));
        }
        if stage2 {
            groups.push(tasks_group_id(name, plan));
        }
        for s in &plan.sinks {
            groups.push(sink::sink_group_id(name, plan, &s.name));
        }
        leave::leave_static(&prepared.client, &groups);
    }
    stats.set_status(Status::Stopped);
    Ok(())
}

/// Runs stage 1 and stage 2 (each if it has work), on two threads when both do.
fn run_stages(
    shared: &Shared<'_>,
    stage1: bool,
    stage2: bool,
    stopping: &(dyn Fn() -> bool + Sync),
    halt: &AtomicBool,
) -> Result<(), Error> {
    let name = &shared.prepared.name;
    if !stage1 {
        return if stage2 {
            tasks::run(shared, stopping)
        } else {
            // Only sinks (or nothing) to run: wait for the stop.
            while !stopping() {
                std::thread::sleep(TICK);
            }
            Ok(())
        };
    }
    let (routed, counted) = std::thread::scope(|scope| {
        let task_thread = stage2.then(|| {
            let shared = &shared;
            let stopping = &stopping;
            let halt = &halt;
            std::thread::Builder::new()
                .name(format!("pipeline-{name}-tasks"))
                .spawn_scoped(scope, move || {
                    let r = tasks::run(shared, stopping);
                    if r.is_err() {
                        halt.store(true, Ordering::Relaxed);
                    }
                    r
                })
        });
        let routed = route::run(shared, stopping);
        if routed.is_err() {
            halt.store(true, Ordering::Relaxed);
        }
        let counted = match task_thread {
            None => Ok(()),
            Some(Err(e)) => Err(Error::Cluster(format!("cannot start a thread: {e}"))),
            Some(Ok(handle)) => handle
                .join()
                .unwrap_or_else(|_| Err(Error::Cluster("the tasks' thread panicked".into()))),
        };
        (routed, counted)
    });
    routed?;
    counted
}

/// Queues `rows` for `topic`, with the window headers; returns how many. Rows of
/// stateless query `q` into a sink carry their `origin` (`sink::ORIGIN_HEADER`) and
/// go to the partition of their source record.
fn send_rows(
    shared: &Shared<'_>,
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    rows: &mut Vec<Row>,
    origin: Option<(usize, &Origin<'_>)>,
) -> Result<u64, Error> {
    let n = rows.len() as u64;
    let origin_at = origin;
    let origin = origin.map(|(q, o)| format!("{q}/{o}"));
    let mut failed = 0;
    for row in rows.drain(..) {
        if let Some(error) = &row.error {
            // A grouped row that failed to evaluate: to the dead-letter topic, with the
            // query's output and the error.
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "freshet.error",
                    value: Some(error.as_bytes()),
                })
                .insert(Header {
                    key: "freshet.query",
                    value: Some(topic.as_bytes()),
                });
            let mut record = BaseRecord::to(&shared.dead)
                .payload(&row.value[..])
                .headers(headers);
            if let Some(key) = &row.key {
                record = record.key(&key[..]);
            }
            send(producer, record)?;
            failed += 1;
            continue;
        }
        let mut headers = OwnedHeaders::new_with_capacity(4);
        if let Some(origin) = &origin {
            headers = headers.insert(Header {
                key: sink::ORIGIN_HEADER,
                value: Some(origin.as_bytes()),
            });
        }
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
        if let Some((_, o)) = origin_at {
            // A sink's copy check needs each source partition's rows in one
            // partition, in order, wherever a resend puts them.
            record = record.partition(o.partition);
        }
        if let Some(key) = &row.key {
            record = record.key(&key[..]);
        }
        send(producer, record)?;
    }
    shared
        .stats
        .dead_lettered
        .fetch_add(failed, Ordering::Relaxed);
    Ok(n - failed)
}

/// The headers of a record as a query reads them (`header('x')`): the route header
/// of the repartition topic is not one of them. None when no query reads headers.
fn input_headers(shared: &Shared<'_>, message: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    if !shared.reads_headers {
        return Vec::new();
    }
    message
        .headers()
        .map(|h| {
            h.iter()
                .filter(|h| h.key != ROUTE_HEADER)
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// Queues a copy of an input record (for the late and dead-letter topics), with its
/// key, timestamp and headers (not the route header), plus `freshet.source` (topic /
/// partition / offset of the source record) and `extra` headers.
fn send_copy(
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    message: &impl Message,
    source: &Origin<'_>,
    extra: &[(&str, &str)],
) -> Result<(), Error> {
    let source = source.to_string();
    let mut headers: Vec<(&str, &[u8])> = vec![("freshet.source", source.as_bytes())];
    headers.extend(extra.iter().map(|(k, v)| (*k, v.as_bytes())));
    copy(producer, topic, None, message, &headers)
}

/// Queues `message` (key, value, timestamp, headers but the route header) to `topic`
/// (to `partition`, or where the partitioner puts it), with `extra` headers after its
/// own.
fn copy(
    producer: &ThreadedProducer<DeliveryContext>,
    topic: &str,
    partition: Option<i32>,
    message: &impl Message,
    extra: &[(&str, &[u8])],
) -> Result<(), Error> {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = message.headers() {
        for h in h.iter().filter(|h| h.key != ROUTE_HEADER) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    for (key, value) in extra {
        headers = headers.insert(Header {
            key,
            value: Some(*value),
        });
    }
    let mut record = BaseRecord::to(topic)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(ts) = message.timestamp().to_millis() {
        record = record.timestamp(ts);
    }
    send(producer, record)
}

/// Reads a source record's value as JSON into `fields`: the fields of source `s`
/// that the queries read. One that is not JSON is sent to the dead-letter topic (when
/// `dead_letter`; otherwise the other stage does) and counted: `false`.
fn read_json(
    shared: &Shared<'_>,
    producer: &ThreadedProducer<DeliveryContext>,
    message: &impl Message,
    source: &Origin<'_>,
    s: usize,
    dead_letter: bool,
    fields: &mut Vec<serde_json::Value>,
) -> Result<bool, Error> {
    match json::parse(
        message.payload().unwrap_or_default(),
        &shared.json_fields[s],
        fields,
    ) {
        Ok(()) => Ok(true),
        Err(_) if !dead_letter => Ok(false),
        Err(err) => {
            dead_letter_input(
                shared,
                producer,
                message,
                source,
                &format!("the value is not JSON: {err}"),
                None,
            )?;
            Ok(false)
        }
    }
}

/// Queues a copy of a refused input record to the dead-letter topic, with its error
/// in `freshet.error` (and the output of the query that refused it, if one did, in
/// `freshet.query`), and counts it.
fn dead_letter_input(
    shared: &Shared<'_>,
    producer: &ThreadedProducer<DeliveryContext>,
    message: &impl Message,
    source: &Origin<'_>,
    error: &str,
    query: Option<&str>,
) -> Result<(), Error> {
    let mut extra = vec![("freshet.error", error)];
    extra.extend(query.map(|q| ("freshet.query", q)));
    send_copy(producer, &shared.dead, message, source, &extra)?;
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Where a source record came from (`topic/partition/offset` in `freshet.source`):
/// formatted only for the records that are copied.
struct Origin<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// After a consumer error: `Error::Fatal` if librdkafka has stopped the consumer for
/// good (a fenced static member), else nothing (librdkafka retries on its own).
fn check_fatal<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    client: &ClientConfig,
) -> Result<(), Error> {
    use rdkafka::consumer::Consumer;
    let Some((_, reason)) = consumer.client().fatal_error() else {
        return Ok(());
    };
    let instance = client.get("group.instance.id").unwrap_or("");
    Err(Error::Fatal(format!(
        "the pipeline's consumer stopped: {reason}. If another process runs this pipeline with the same instance id ('{instance}'), give each its own --instance"
    )))
}

/// The high watermark of a partition this consumer reads, as librdkafka last saw it
/// in a fetch response: no request, so it never blocks the loop (the stages' lag,
/// every checkpoint). None before the partition's first fetch answered.
fn cached_high<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`; librdkafka reads the
    // NUL-terminated name and writes the two offsets, nothing else.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Queues one record, waiting while librdkafka's queue is full.
/// Waits until every record `producer` queued so far is acknowledged; fails if any
/// was not.
fn flush(producer: &ThreadedProducer<DeliveryContext>, delivery: &Delivery) -> Result<(), Error> {
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
    Ok(())
}

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

/// Creates `topics` and the `internal` ones (kept forever) if missing; an internal
/// topic that exists must have the partition count asked for.
fn create_topics(
    rt: &tokio::runtime::Runtime,
    client: &ClientConfig,
    topics: &[(String, i32)],
    internal: &[(String, i32)],
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(|e| e.to_string())?;
    let mut new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    for (name, partitions) in internal {
        new.push(
            NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)).set("retention.ms", "-1"),
        );
    }
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
    for (name, partitions) in internal {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), CLUSTER_TIMEOUT)
            .map_err(|e| format!("cannot read the metadata of '{name}': {e}"))?;
        let have = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32);
        if have != *partitions {
            return Err(format!(
                "topic '{name}' has {have} partitions, the pipeline needs {partitions} (one per task, as many as its largest source has): delete the topic, and with it the pipeline's state, to start afresh"
            ));
        }
    }
    close_later(admin);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{plan_hash, Route};
    use proptest::prelude::*;

    struct AnyColumns;

    impl sql::Catalog for AnyColumns {
        fn topic(&self, _: &str) -> Option<sql::TopicInfo> {
            Some(sql::TopicInfo { columns: None })
        }
    }

    /// The identities of definitions of every kind, as this version computes them: a
    /// change to the plan or its serialisation that moves one would restart every
    /// such pipeline from the beginning after an upgrade (see PLAN_IDENTITY_VERSION).
    #[test]
    fn identities_do_not_change() {
        let definitions = [
            "INSERT INTO out SELECT city, amount * 2 AS double FROM tweets WHERE amount > 1",
            "INSERT INTO out SELECT city, window_start, window_end, COUNT(*) AS n, SUM(amount) AS total \
             FROM TUMBLE(tweets, created_at, INTERVAL '10' SECOND) GROUP BY city, window_start, window_end EMIT FINAL",
            "SET 'allowed-lateness' = '2s';\nINSERT INTO out SELECT city, window_start, window_end, \
             COUNT(DISTINCT user_id) AS users FROM HOP(tweets, created_at, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE) \
             GROUP BY city, window_start, window_end",
            "INSERT INTO out SELECT user_id, window_start, window_end, COUNT(*) AS n \
             FROM SESSION(tweets, created_at, INTERVAL '30' SECOND) GROUP BY user_id, window_start, window_end",
            "INSERT INTO out SELECT poll, choice, COUNT(*) AS votes FROM votes GROUP BY poll, choice EMIT CHANGES",
            "CREATE SINK db WITH (connector = 'postgres', url = 'postgres://u@h/d', table = 't', primary_key = 'city');\n\
             INSERT INTO db SELECT city, COUNT(*) AS n FROM tweets GROUP BY city",
        ];
        let got: Vec<u64> = definitions
            .iter()
            .map(|d| {
                plan_hash(&sql::compile(d, &AnyColumns).unwrap_or_else(|e| panic!("{d}: {e}")))
            })
            .collect();
        let pinned: [u64; 6] = [
            0x9da7_922d_bd97_c52b,
            0x1da4_98b4_c6ac_5bc0,
            0x6f73_a6d9_ae00_4ab4,
            0xe9d8_9a56_fd87_1fd9,
            0xc1aa_70d6_ca3c_c847,
            0x137c_786d_5cc1_46af,
        ];
        assert_eq!(got, pinned, "{got:#x?}");
        // Layout, comments and the case of keywords are not part of the identity.
        let same = plan_hash(
            &sql::compile(
                "-- counts\ninsert into out\n  select city, amount*2 as double\n  from tweets\n  where amount>1;",
                &AnyColumns,
            )
            .unwrap(),
        );
        assert_eq!(same, got[0]);
    }

    proptest! {
        #[test]
        fn a_route_header_reads_back(marker: bool, idle: bool, plan: u64, query: u32, source: u32, partition: i32,
                                     offset: i64, high in proptest::option::of(i64::MIN + 1..i64::MAX)) {
            let r = Route { marker, idle: marker && idle, plan, query, source, partition, offset, high };
            prop_assert_eq!(Route::decode(&r.encode()), Some(r));
        }

        #[test]
        fn a_bad_route_header_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..60)) {
            let decoded = Route::decode(&bytes);
            prop_assert_eq!(decoded.is_some(), bytes.len() == Route::LEN && bytes[0] <= 2);
        }
    }

    /// librdkafka's cached high watermark follows the fetches, with no request of
    /// its own: what the stages' lag reads.
    #[test]
    fn the_cached_high_watermark_follows_the_fetches() {
        use super::{cached_high, test_broker};
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use rdkafka::{Message, TopicPartitionList};
        use std::time::Duration;
        let broker = test_broker::Broker::start();
        broker.create_topic("cached", 1);
        let producer: BaseProducer = broker.client().create().unwrap();
        for i in 0..10 {
            producer
                .send(BaseRecord::<[u8], [u8]>::to("cached").payload(&[i][..]))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = broker
            .client()
            .set("group.id", "cached")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        assert_eq!(
            cached_high(&consumer, "cached", 0),
            None,
            "nothing fetched yet"
        );
        let mut list = TopicPartitionList::new();
        list.add_partition_offset("cached", 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let first = loop {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => break m.offset(),
                Some(Err(e)) => panic!("{e}"),
                None => {}
            }
        };
        assert_eq!(first, 0);
        assert_eq!(cached_high(&consumer, "cached", 0), Some(10));
        assert_eq!(
            cached_high(&consumer, "cached", 1),
            None,
            "no such partition"
        );
    }
}
