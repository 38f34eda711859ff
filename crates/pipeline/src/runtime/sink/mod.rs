//! Sinks (`CREATE SINK ... WITH (connector = 'postgres' | 'sqlite' | 'redis' | 'http' |
//! 'file')`).
//!
//! The queries that `INSERT INTO` a sink write their rows to the sink's topic
//! ([`sink_topic`]); per sink, one thread reads that topic in the sink's consumer
//! group into batches, and a second writes each batch into the table while the
//! next is read (for PostgreSQL, two writers on two connections take the batches in
//! turn, a batch's rows going in while the one before commits; a [`Chain`] keeps
//! their commits in order). A sink whose queries are all stateless and read one source reads
//! that source itself instead (`fused`): the same, with source offsets as
//! positions. Exactly once: each transaction reads
//! the sink's positions from the `freshet_offsets` table *in the same database*
//! (locked), skips what they cover, writes the rows and the new positions, and
//! commits; the Kafka group's offsets are committed after, only to split the work and
//! show lag. So a crash at any instant, a rebalance, or two instances writing at once
//! leave every record of the sink's topic applied once.
//!
//! The sink's topic itself may hold a row twice: the pipeline sends the rows emitted
//! since its last checkpoint again after a crash. Rows of a grouped query are
//! upserts on the sink's primary key, so a repeated row (same values) changes
//! nothing. Rows of a stateless query carry `freshet.origin` (query, source topic,
//! partition and offset) and go to the sink topic's partition of their source
//! partition, in source order however often they are sent; for each sink partition
//! the position keeps the highest origin offset applied per (query, source
//! partition), and a row not above it is a copy and is skipped.
//!
//! A row the database refuses (a constraint, a type) is tried alone, then sent to the
//! dead-letter topic with the database's message in `freshet.error`; the others are
//! written. A database that is down or refuses the connection is retried with
//! backoff, the batch kept: the sink's lag grows and nothing is lost.

mod file;
mod fused;
mod http;
mod postgres;
mod redis;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TrySendError};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};
use sql::plan::{ColumnType, Connector, Sink};

use super::batch::{BatchContext, Batches};

use super::{group_id, Error, Shared};

/// The header a stateless query's row carries into a sink's topic:
/// `query/topic/partition/offset` of the source record.
pub(super) const ORIGIN_HEADER: &str = "freshet.origin";

/// The topic the rows for sink `sink` of pipeline `name` go through; `hash` is the
/// compiled plan's: a changed definition starts a new topic and new positions (the
/// topic's name is the sink's id in `freshet_offsets`).
pub fn sink_topic(name: &str, hash: u64, sink: &str) -> String {
    format!("_freshet.pipeline.{name}.{:08x}.sink.{sink}", hash as u32)
}

/// The text of a pipeline file with the passwords of its sinks' URLs hidden
/// (`postgres://user:***@host/db`, `password=***`): what `describe` and logs show.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // user:password@ in URLs
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '\'' || c == '"' || c.is_whitespace() || c == '/')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon + 1]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    // password=... in key-value connection strings
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.to_ascii_lowercase().find("password=") {
        let (head, tail) = rest.split_at(i + "password=".len());
        redacted.push_str(head);
        redacted.push_str("***");
        let end = tail
            .find(|c: char| c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    redacted.push_str(rest);
    redacted
}

/// What a sink has applied of one partition of its topic, stored with the rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Position {
    /// The next offset of the sink's topic to apply.
    pub next: i64,
    /// Per `query/topic/partition` of a stateless query's source: the highest source
    /// offset applied.
    pub origins: BTreeMap<String, i64>,
}

impl Position {
    pub fn origins_json(&self) -> String {
        serde_json::to_string(&self.origins).unwrap_or_else(|_| "{}".into())
    }

    pub fn from_stored(next: i64, origins: &str) -> Position {
        Position {
            next,
            origins: serde_json::from_str(origins).unwrap_or_default(),
        }
    }
}

/// Why a database call failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection or the server: retried with backoff, the batch kept.
    Unavailable(String),
    /// The rows: the database refused their values (a constraint, a type).
    Rejected(String),
    /// The definition: the table or its columns do not fit; the pipeline stops.
    Config(String),
}

/// The columns a sink writes, and their static types where known.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    /// `None`: `SELECT *`, the table's own columns are written.
    pub query: Option<Vec<(String, ColumnType)>>,
    pub primary_key: Vec<String>,
}

/// A database a sink writes to: one connection, used from the sink's thread.
pub(crate) trait Target: Send {
    /// The sink's primary key (empty: plain inserts).
    fn primary_key(&self) -> &[String];
    /// Connects (again), creates the table and `freshet_offsets` if asked and
    /// missing, and checks the query's columns against the table's. Returns the
    /// columns rows are written to.
    fn open(&mut self) -> Result<Vec<String>, Failure>;
    fn begin(&mut self) -> Result<(), Failure>;
    /// The stored positions of `partitions` of sink `id`, locked until commit.
    fn positions(
        &mut self,
        id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure>;
    /// Writes rows (JSON objects; upserts when the sink has a primary key).
    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure>;
    fn savepoint(&mut self) -> Result<(), Failure>;
    fn rollback_to_savepoint(&mut self) -> Result<(), Failure>;
    fn store(&mut self, id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure>;
    fn commit(&mut self) -> Result<(), Failure>;
    fn rollback(&mut self);
    /// How many batches may be in flight at once, each on a connection of its own
    /// (a target of its own per writer, see [`Chain`]): 1 unless the database lets
    /// transactions overlap.
    fn in_flight(&self) -> usize {
        1
    }
}

/// The positions of an at-least-once target (http, file), kept in memory: copies
/// are skipped while the process lives; after a restart the sink resumes from its
/// group's committed offsets, so a batch may be delivered again.
#[derive(Default)]
pub(crate) struct Remembered {
    applied: HashMap<i32, Position>,
    /// Stored in the current batch, applied at its commit.
    staged: Vec<(i32, Position)>,
}

impl Remembered {
    pub fn positions(&self, partitions: &[i32]) -> HashMap<i32, Position> {
        partitions
            .iter()
            .filter_map(|p| Some((*p, self.applied.get(p)?.clone())))
            .collect()
    }

    pub fn stage(&mut self, positions: &[(i32, &Position)]) {
        self.staged = positions
            .iter()
            .map(|(p, pos)| (*p, (*pos).clone()))
            .collect();
    }

    /// The batch was delivered: its positions hold.
    pub fn committed(&mut self) {
        self.applied.extend(self.staged.drain(..));
    }

    pub fn discard(&mut self) {
        self.staged.clear();
    }
}

/// A row's columns by name: a JSON object read from the sink's topic, or the values
/// a fused sink's query made (no object built for them).
#[derive(Clone, Copy)]
pub(crate) enum Fields<'a> {
    Object(&'a serde_json::Map<String, serde_json::Value>),
    Columns(&'a [String], &'a [serde_json::Value]),
}

impl<'a> Fields<'a> {
    pub fn get(&self, name: &str) -> Option<&'a serde_json::Value> {
        match *self {
            Fields::Object(map) => map.get(name),
            Fields::Columns(names, values) => {
                names.iter().position(|n| n == name).map(|i| &values[i])
            }
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = (&'a str, &'a serde_json::Value)> + 'a> {
        match *self {
            Fields::Object(map) => Box::new(map.iter().map(|(k, v)| (k.as_str(), v))),
            Fields::Columns(names, values) => {
                Box::new(names.iter().map(String::as_str).zip(values.iter()))
            }
        }
    }
}

/// As a JSON object.
impl serde::Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Fields::Object(map) => map.serialize(s),
            Fields::Columns(..) => s.collect_map(self.iter()),
        }
    }
}

/// A row to write, and where in the sink's input it was.
pub(crate) struct Out<'a> {
    pub row: Fields<'a>,
    pub partition: i32,
    pub offset: i64,
}

/// `"ident"`, quotes doubled: an identifier as PostgreSQL and SQLite read it.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl Columns {
    /// `CREATE TABLE IF NOT EXISTS table (...)` from the query's columns, each typed
    /// by `sql_type`, with the primary key.
    pub fn create_table(
        &self,
        table: &str,
        query: &[(String, ColumnType)],
        sql_type: fn(ColumnType) -> &'static str,
    ) -> String {
        let mut ddl: Vec<String> = query
            .iter()
            .map(|(n, t)| {
                format!("{} {}", quote(n), sql_type(*t))
                    .trim_end()
                    .to_string()
            })
            .collect();
        if !self.primary_key.is_empty() {
            let key: Vec<String> = self.primary_key.iter().map(|k| quote(k)).collect();
            ddl.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        format!("CREATE TABLE IF NOT EXISTS {table} ({})", ddl.join(", "))
    }

    /// What follows an `INSERT` of `written` columns: with a primary key, an upsert
    /// (`ON CONFLICT (key) DO UPDATE SET` the other columns); without, nothing.
    pub fn on_conflict<'a>(&self, written: impl Iterator<Item = &'a String>) -> String {
        if self.primary_key.is_empty() {
            return String::new();
        }
        let key: Vec<String> = self.primary_key.iter().map(|k| quote(k)).collect();
        let update: Vec<String> = written
            .filter(|n| !self.primary_key.contains(n))
            .map(|n| format!("{0} = excluded.{0}", quote(n)))
            .collect();
        if update.is_empty() {
            format!(" ON CONFLICT ({}) DO NOTHING", key.join(", "))
        } else {
            format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                key.join(", "),
                update.join(", ")
            )
        }
    }
}

/// One record of the sink's input, read: a row of the sink's topic, or a row a
/// fused sink's query made of a source record.
struct Record {
    /// Where in the sink's input (its topic, or a fused sink's source) it was.
    partition: i32,
    offset: i64,
    /// The rows one fused source record gave are numbered from 0 (a record of the
    /// sink's topic is one row: 0).
    part: u32,
    body: Body,
    /// The record of the sink's topic: what goes to the dead-letter topic if the
    /// database refuses its row. None for a fused query's row (its values go, with
    /// the source record's key and timestamp).
    message: Option<OwnedMessage>,
    key: Option<Vec<u8>>,
    timestamp: i64,
    origin: Option<(String, i64)>,
}

enum Body {
    Row(serde_json::Map<String, serde_json::Value>),
    /// A fused query's row: its columns' names (shared by its rows) and values.
    Columns(std::sync::Arc<[String]>, Vec<serde_json::Value>),
    /// Not a JSON object: dead-lettered.
    NotObject,
    /// Nothing to write (filtered out, or sent to the dead-letter topic when read):
    /// only the position moves past it; `dead_lettered` says a copy was queued, so
    /// the producer is flushed before the position is stored.
    Skip {
        dead_lettered: bool,
    },
}

impl Body {
    fn of(value: &[u8]) -> Body {
        match serde_json::from_slice::<serde_json::Value>(value) {
            Ok(serde_json::Value::Object(map)) => Body::Row(map),
            _ => Body::NotObject,
        }
    }
}

fn read(message: &impl Message) -> Record {
    let origin = message.headers().and_then(|h| {
        let v = h.iter().find(|h| h.key == ORIGIN_HEADER)?.value?;
        let v = std::str::from_utf8(v).ok()?;
        let (source, offset) = v.rsplit_once('/')?;
        Some((source.to_string(), offset.parse().ok()?))
    });
    Record {
        partition: message.partition(),
        offset: message.offset(),
        part: 0,
        body: Body::of(message.payload().unwrap_or_default()),
        message: Some(super::batch::detach(message)),
        key: None,
        timestamp: 0,
        origin,
    }
}

/// The sink's consumer group.
pub fn sink_group_id(name: &str, plan: &sql::Pipeline, sink: &str) -> String {
    format!("{}-sink-{sink}", group_id(name, plan))
}

fn target(sink: &Sink, columns: Columns) -> Box<dyn Target + Send> {
    match &sink.connector {
        Connector::Postgres { url } => Box::new(postgres::Postgres::new(url, sink, columns)),
        Connector::Sqlite { path } => Box::new(sqlite::Sqlite::new(path, sink, columns)),
        Connector::Redis { url, score } => {
            Box::new(redis::Redis::new(url, score.clone(), sink, columns))
        }
        Connector::Http {
            url,
            timeout_ms,
            ca,
        } => Box::new(http::Http::new(url, *timeout_ms, ca.clone(), columns)),
        Connector::File {
            path,
            roll_bytes,
            roll_interval_ms,
        } => Box::new(file::File::new(
            path,
            &sink.name,
            *roll_bytes,
            *roll_interval_ms,
            columns,
        )),
    }
}

/// Runs sink `index` of the plan until `stopping()`: reads its topic and writes each
/// batch in one transaction with its positions.
pub(super) fn run(
    shared: &Shared<'_>,
    index: usize,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<(), Error> {
    let prepared = shared.prepared;
    let plan = &prepared.plan;
    let sink = &plan.sinks[index];
    let name = &prepared.name;
    // `prepare` pointed the queries into this sink at its topic.
    let Some(topic) = plan
        .queries
        .iter()
        .find(|q| q.sink == Some(index))
        .map(|q| q.output.clone())
    else {
        return Ok(()); // created but written by no query
    };
    // A fused sink reads its source, and its positions are the source's offsets,
    // under an id of their own.
    let mut fused = fused::Fused::new(shared, index);
    let (read_topic, id) = match &fused {
        Some(f) => (f.topic().to_string(), format!("{topic}.source")),
        None => (topic.clone(), topic.clone()),
    };
    let source = fused.as_ref().map(|f| f.topic().to_string());
    let upgraded_from = source.as_deref().map(|source| Upgrade {
        id: topic.as_str(),
        source,
    });
    let id = id.as_str();
    let columns = {
        let mut query = Some(Vec::new());
        for q in plan.queries.iter().filter(|q| q.sink == Some(index)) {
            match (q.columns(), &mut query) {
                (Some(cs), Some(all)) => {
                    for c in cs {
                        if !all.iter().any(|(n, _)| *n == c.0) {
                            all.push(c);
                        }
                    }
                }
                _ => query = None,
            }
        }
        Columns {
            query,
            primary_key: sink.primary_key.clone(),
        }
    };
    let mut target = target(sink, columns.clone());
    let mut backoff = Backoff::new();
    // Open the table first: a definition that does not fit stops here.
    loop {
        match target.open() {
            Ok(_) => break,
            Err(Failure::Config(e)) => {
                return Err(Error::Sink(format!("sink '{}': {e}", sink.name)))
            }
            Err(Failure::Unavailable(e) | Failure::Rejected(e)) => {
                note_retry(shared, &sink.name, &e);
                if backoff.wait(stopping) {
                    return Ok(());
                }
            }
        }
    }
    let consumer: BaseConsumer<BatchContext> = shared.consumer(
        sink_group_id(name, plan, &sink.name),
        BatchContext::default(),
    )?;
    let topic = read_topic.as_str();
    let mut reader = Batches::new(&consumer);
    consumer
        .subscribe(&[topic])
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let mut messages = Vec::new();

    // Batches and the lag are timed by the coarse clock (read per record).
    let interval_ms = sink.batch_interval_ms.max(1);
    let mut batch: Vec<Record> = Vec::new();
    let mut first_ms = 0;
    // The next offset applied per partition, for the lag `describe` shows.
    let mut applied: HashMap<i32, i64> = HashMap::new();
    let mut last_lag = super::coarse_ms();
    let show = |rows: u64, lag: Option<i64>| {
        let mut sinks = shared.stats.sinks.lock().unwrap_or_else(|e| e.into_inner());
        let entry = sinks
            .entry(sink.name.clone())
            .or_insert(super::SinkStats { rows: 0, lag: -1 });
        entry.rows += rows;
        if let Some(lag) = lag {
            entry.lag = lag;
        }
    };
    show(0, None);
    // Every second: the records of the assigned partitions not applied yet (during
    // an outage too, so the lag shows it growing).
    let lag = |last: &mut i64, now: i64, applied: &HashMap<i32, i64>| {
        if now - *last < 1000 {
            return;
        }
        *last = now;
        if let Ok(assignment) = consumer.assignment() {
            // Before its first batch here, a partition counts from where it is read.
            let position = consumer.position().ok();
            let lag = assignment
                .elements()
                .iter()
                .filter_map(|e| {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, e.partition(), Duration::from_secs(1))
                        .ok()?;
                    let read = position
                        .as_ref()
                        .and_then(|p| p.find_partition(topic, e.partition()))
                        .and_then(|p| p.offset().to_raw())
                        .filter(|o| *o >= 0);
                    let next = applied.get(&e.partition()).copied().or(read).unwrap_or(low);
                    Some((high - next).max(0))
                })
                .sum();
            show(0, Some(lag));
        }
    };
    // A batch written: its rows counted, and the group's offsets follow the
    // database's (lag tools, and where a new owner starts reading before it skips
    // what the positions cover).
    let done = |written: Written, applied: &mut HashMap<i32, i64>| {
        show(written.rows as u64, None);
        drop(written.batch); // here, in the thread that allocated it
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in written.next {
            applied.insert(partition, next);
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
        }
        let _ = consumer.commit(&tpl, CommitMode::Async);
    };
    // The next batch is read while one is written: a writer thread owns the target;
    // where the database lets transactions overlap, several writers (a target each)
    // take the batches in turn, ordered by a `Chain`.
    let mut targets = vec![target];
    while targets.len() < targets[0].in_flight() {
        targets.push(self::target(sink, columns.clone()));
    }
    let chain = (targets.len() > 1).then(Chain::new);
    let retrying = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), Error> {
        let (written_tx, written) = std::sync::mpsc::channel::<Written>();
        let of = targets.len();
        let mut to_writers = Vec::new();
        let mut writers = Vec::new();
        for (k, mut target) in targets.into_iter().enumerate() {
            let (to_writer, batches) = std::sync::mpsc::sync_channel::<Vec<Record>>(1);
            to_writers.push(to_writer);
            let (retrying, sink_name) = (&retrying, sink.name.as_str());
            let (written_tx, upgraded_from) = (written_tx.clone(), upgraded_from.as_ref());
            let turn = chain.as_ref().map(|c| (c, k as u64, of));
            let writer = std::thread::Builder::new()
                .name(format!("sink-writer-{k}"))
                .spawn_scoped(scope, move || {
                    let result = write_batches(
                        shared,
                        target.as_mut(),
                        id,
                        upgraded_from,
                        sink_name,
                        turn,
                        batches,
                        written_tx,
                        retrying,
                        stopping,
                    );
                    if let Some((chain, ..)) = turn {
                        chain.stop();
                    }
                    result
                });
            writers.push(writer.map_err(|e| Error::Sink(format!("sink '{}': {e}", sink.name)))?);
        }
        drop(written_tx);
        // The batches handed over, so the next goes to writer `sent % of`.
        let mut sent = 0usize;
        // While the writer retries, nothing more is read (paused only then: a pause
        // drops what librdkafka fetched ahead).
        let mut paused: Option<TopicPartitionList> = None;
        // A full batch the writer has no room for yet.
        let mut pending: Option<Vec<Record>> = None;
        loop {
            while let Ok(w) = written.try_recv() {
                done(w, &mut applied);
            }
            if writers.iter().any(|w| w.is_finished()) {
                break; // a definition error (its result below), or the run stops
            }
            match (retrying.load(Ordering::Relaxed), &paused) {
                (true, None) => {
                    paused = consumer.assignment().ok();
                    if let Some(a) = &paused {
                        let _ = consumer.pause(a);
                    }
                }
                (false, Some(a)) => {
                    let _ = consumer.resume(a);
                    paused = None;
                }
                _ => {}
            }
            let now = super::coarse_ms();
            lag(&mut last_lag, now, &applied);
            if stopping() {
                break;
            }
            if let Some(full) = pending.take() {
                match to_writers[sent % of].try_send(full) {
                    Ok(()) => sent += 1,
                    Err(TrySendError::Disconnected(_)) => break,
                    Err(TrySendError::Full(back)) => {
                        pending = Some(back);
                        // Until the writer is done with a batch.
                        match written.recv_timeout(super::TICK) {
                            Ok(w) => done(w, &mut applied),
                            Err(RecvTimeoutError::Disconnected) => break,
                            Err(RecvTimeoutError::Timeout) => {}
                        }
                        continue;
                    }
                }
            }
            let wait = if batch.is_empty() {
                super::TICK
            } else {
                Duration::from_millis((first_ms + interval_ms - now).max(0) as u64)
            };
            let room = (sink.batch_rows as usize).saturating_sub(batch.len());
            let error = reader.read(wait, room, &mut messages)?;
            for message in messages.drain(..) {
                sink_read(shared, &mut fused, &message, &mut batch, &mut first_ms)?;
            }
            if let Some(e) = error {
                tracing::debug!(pipeline = %name, sink = %sink.name, error = %e, "sink consumer");
                super::check_fatal(&consumer, &shared.prepared.client)?;
            }
            let full = batch.len() >= sink.batch_rows as usize;
            if !batch.is_empty() && (full || super::coarse_ms() - first_ms >= interval_ms) {
                pending = Some(std::mem::take(&mut batch));
            }
        }
        drop(to_writers);
        let mut result = Ok(());
        for writer in writers {
            let r = writer.join().unwrap_or_else(|_| {
                Err(Error::Sink(format!(
                    "sink '{}': its writer panicked",
                    sink.name
                )))
            });
            if result.is_ok() {
                result = r;
            }
        }
        while let Ok(w) = written.try_recv() {
            done(w, &mut applied);
        }
        if let Some(a) = &paused {
            let _ = consumer.resume(a);
        }
        result
    })
}

/// One record of the sink's input into `batch` (`first_ms`: when the batch began).
fn sink_read(
    shared: &Shared<'_>,
    fused: &mut Option<fused::Fused>,
    message: &impl Message,
    batch: &mut Vec<Record>,
    first_ms: &mut i64,
) -> Result<(), Error> {
    if batch.is_empty() {
        *first_ms = super::coarse_ms();
    }
    match fused {
        // All the rows of one source record go into one batch.
        Some(f) => f.read(shared, message, batch),
        None => {
            batch.push(read(message));
            Ok(())
        }
    }
}

/// What the writer tells the reader of a batch it wrote.
struct Written {
    rows: usize,
    /// The batch itself, handed back so that the reader, whose thread allocated its
    /// records, frees them: freed by the writer, every free contended for the
    /// reader's malloc arena (glibc), a sixth of the reader's waits.
    batch: Vec<Record>,
    /// The next offset per partition.
    next: Vec<(i32, i64)>,
}

/// A writer thread of a sink: writes each batch handed over, retrying while the
/// database is away (`retrying` set meanwhile); stops at a definition error (the
/// table does not fit), or when the reader hangs up or the run stops. With `turn`
/// (the chain, this writer's index k, the number of writers), it is one of several
/// and its batches are numbered k+1, k+1+of, ...
#[allow(clippy::too_many_arguments)]
fn write_batches(
    shared: &Shared<'_>,
    target: &mut dyn Target,
    id: &str,
    upgraded_from: Option<&Upgrade<'_>>,
    sink: &str,
    turn: Option<(&Chain, u64, usize)>,
    batches: std::sync::mpsc::Receiver<Vec<Record>>,
    written: std::sync::mpsc::Sender<Written>,
    retrying: &AtomicBool,
    stopping: &(dyn Fn() -> bool + Sync),
) -> Result<(), Error> {
    for (i, batch) in batches.into_iter().enumerate() {
        let mut backoff = Backoff::new();
        let n = turn.map(|(chain, k, of)| (chain, 1 + k + (i * of) as u64));
        let next = loop {
            let result = match n {
                Some((chain, n)) => write_in_turn(
                    shared,
                    target,
                    id,
                    upgraded_from,
                    sink,
                    &batch,
                    n,
                    chain,
                    stopping,
                ),
                None => write(shared, target, id, upgraded_from, sink, &batch, &|_| {}),
            };
            match result {
                Ok(next) => break next,
                Err(Failure::Config(e)) => return Err(Error::Sink(format!("sink '{sink}': {e}"))),
                Err(_) if n.is_some_and(|(chain, _)| chain.stopped()) => return Ok(()),
                Err(Failure::Unavailable(e) | Failure::Rejected(e)) => {
                    note_retry(shared, sink, &e);
                    retrying.store(true, Ordering::Relaxed);
                    if backoff.wait(stopping) {
                        return Ok(());
                    }
                    // Reconnect before the next try.
                    if let Err(Failure::Config(e)) = target.open() {
                        return Err(Error::Sink(format!("sink '{sink}': {e}")));
                    }
                }
            }
        };
        retrying.store(false, Ordering::Relaxed);
        let rows = batch
            .iter()
            .filter(|r| !matches!(r.body, Body::Skip { .. }))
            .count();
        // Told before the next batch may commit: the reader hears of them in order.
        if written.send(Written { rows, next, batch }).is_err() {
            return Ok(());
        }
        if let Some((chain, n)) = n {
            chain.committed(n);
        }
    }
    Ok(())
}

fn note_retry(shared: &Shared<'_>, sink: &str, error: &str) {
    let message = redact(&format!("sink '{sink}': {error} (retrying)"));
    tracing::warn!("{message}");
    shared.stats.set_error(&message);
}

/// Exponential backoff from 100 ms to 5 s, waiting in steps so a stop is seen.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(100))
    }

    /// Waits the next delay; true when the run is stopping.
    fn wait(&mut self, stopping: &dyn Fn() -> bool) -> bool {
        let until = Instant::now() + self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        while Instant::now() < until {
            if stopping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
        stopping()
    }
}

/// One transaction: the batch's records not yet applied, written with their new
/// positions (handed to `selected` once the rows are written). Returns the next
/// offset per partition.
fn write(
    shared: &Shared<'_>,
    target: &mut dyn Target,
    id: &str,
    upgraded_from: Option<&Upgrade<'_>>,
    sink: &str,
    batch: &[Record],
    selected: &dyn Fn(&HashMap<i32, Position>),
) -> Result<Vec<(i32, i64)>, Failure> {
    target.begin()?;
    let result = (|| {
        let partitions = partitions_of(batch);
        let mut positions = target.positions(id, &partitions)?;
        if let Some(old) = upgraded_from {
            upgrade(target, old, &partitions, &mut positions)?;
        }
        let (fresh, flush) = select(batch, &mut positions);
        let rejected = insert_all(target, &fresh)?;
        selected(&positions);
        finish(
            shared,
            target,
            id,
            upgraded_from,
            sink,
            &partitions,
            &positions,
            flush,
            rejected,
        )
    })();
    if result.is_err() {
        target.rollback();
    }
    result
}

/// The order of batches written by several writers at once (a target whose
/// `in_flight()` is above 1, each writer with a connection of its own). The reader
/// hands the batches, numbered from 1, to the writers in turn. Batch n:
/// - takes the positions batch n-1 stores (`known`) as soon as that batch has
///   written its rows, selects its own records by them and writes them, so its
///   `COPY` overlaps batch n-1's commit. Not before: batch n may then wait for row
///   locks batch n-1 holds (an upsert of the same key, a unique value), never batch
///   n-1 for batch n's, which would wait for batch n-1's commit: a deadlock that
///   PostgreSQL cannot see;
/// - waits until batch n-1 is committed, then locks and reads the stored positions:
///   if they are the ones it selected by, it stores its own and commits; if not (a
///   batch before it failed, another instance wrote), it rolls back and writes again
///   the plain way ([`write`]), which also starts only after batch n-1 is committed.
///   When batch n-1 is written again instead of committed (its attempt failed, or its
///   positions were not the expected ones), batch n rolls back at once: its locks
///   may be in batch n-1's way.
///
/// So batches commit in their order, each over what the one before stored, as with
/// one writer: a batch never moves a position past records of an earlier batch
/// that is not committed.
struct Chain {
    state: Mutex<ChainState>,
    changed: Condvar,
}

#[derive(Default)]
struct ChainState {
    /// Batches 1..=committed are committed.
    committed: u64,
    /// The batch whose positions `positions` ends with.
    known: u64,
    /// Per partition a batch has touched, the positions the latest batch stores.
    positions: HashMap<i32, Position>,
    /// The latest batch to be written again (its attempt failed or was rolled
    /// back): the batch after it, if it wrote ahead, rolls back too.
    again: u64,
    /// A writer stopped: the others stop too.
    stopped: bool,
}

impl Chain {
    fn new() -> Chain {
        Chain {
            state: Mutex::new(ChainState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChainState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` gives a value; None when a writer stopped or the run stops.
    fn wait<T>(
        &self,
        stopping: &dyn Fn() -> bool,
        ready: impl Fn(&ChainState) -> Option<T>,
    ) -> Option<T> {
        let mut state = self.lock();
        loop {
            if state.stopped || stopping() {
                return None;
            }
            if let Some(value) = ready(&state) {
                return Some(value);
            }
            state = self
                .changed
                .wait_timeout(state, super::TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Batch `n` stores `positions` (a batch tried again after the next one took
    /// them changes nothing: the next one's check finds the difference).
    fn selected(&self, n: u64, positions: &HashMap<i32, Position>) {
        let mut state = self.lock();
        if n >= state.known {
            state.known = n;
            state
                .positions
                .extend(positions.iter().map(|(p, pos)| (*p, pos.clone())));
            self.changed.notify_all();
        }
    }

    fn again(&self, n: u64) {
        let mut state = self.lock();
        state.again = state.again.max(n);
        self.changed.notify_all();
    }

    fn committed(&self, n: u64) {
        let mut state = self.lock();
        state.committed = state.committed.max(n);
        self.changed.notify_all();
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.lock().stopped
    }
}

/// Batch `n` of a [`Chain`]: written ahead over the positions batch n-1 stores, and
/// committed after it; or, when those are not the stored ones, the plain way.
#[allow(clippy::too_many_arguments)]
fn write_in_turn(
    shared: &Shared<'_>,
    target: &mut dyn Target,
    id: &str,
    upgraded_from: Option<&Upgrade<'_>>,
    sink: &str,
    batch: &[Record],
    n: u64,
    chain: &Chain,
    stopping: &dyn Fn() -> bool,
) -> Result<Vec<(i32, i64)>, Failure> {
    let stopped = || Failure::Unavailable("the sink's writers stop".into());
    let known = chain
        .wait(stopping, |s| {
            (s.known + 1 >= n).then(|| s.positions.clone())
        })
        .ok_or_else(stopped)?;
    let partitions = partitions_of(batch);
    if partitions.iter().all(|p| known.contains_key(p)) {
        target.begin()?;
        let ahead = (|| {
            let mut positions: HashMap<i32, Position> =
                partitions.iter().map(|p| (*p, known[p].clone())).collect();
            let (fresh, flush) = select(batch, &mut positions);
            let rejected = insert_all(target, &fresh)?;
            // Only now may the next batch write: it may wait for the rows this one
            // locked, never this one for its (which would wait for this commit).
            chain.selected(n, &positions);
            // Batch n-1 written again instead of committed: this one's locks may be
            // in its way, so they go (and this batch is written the plain way).
            let before = chain.wait(stopping, |s| {
                (s.committed + 1 >= n)
                    .then_some(true)
                    .or((s.again + 1 >= n).then_some(false))
            });
            if !before.ok_or_else(stopped)? {
                return Ok(None);
            }
            let stored = target.positions(id, &partitions)?;
            if partitions.iter().any(|p| stored.get(p) != known.get(p)) {
                return Ok(None);
            }
            finish(
                shared,
                target,
                id,
                upgraded_from,
                sink,
                &partitions,
                &positions,
                flush,
                rejected,
            )
            .map(Some)
        })();
        if let Ok(Some(next)) = ahead {
            return Ok(next);
        }
        // Told before this batch's locks go: the next batch, if it wrote ahead over
        // them, rolls back rather than wait for a commit that comes after its own.
        chain.again(n);
        target.rollback();
        ahead?;
    }
    chain
        .wait(stopping, |s| (s.committed + 1 >= n).then_some(()))
        .ok_or_else(stopped)?;
    let written = write(
        shared,
        target,
        id,
        upgraded_from,
        sink,
        batch,
        &|positions| chain.selected(n, positions),
    );
    if written.is_err() {
        chain.again(n);
    }
    written
}

/// The partitions of a batch, sorted.
fn partitions_of(batch: &[Record]) -> Vec<i32> {
    let mut partitions: Vec<i32> = batch.iter().map(|r| r.partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    partitions
}

/// The records of `batch` that `positions` do not cover, moving the positions past
/// the batch; and whether a record skipped at read time was dead-lettered (the
/// producer is flushed before the positions move past it).
fn select<'b>(
    batch: &'b [Record],
    positions: &mut HashMap<i32, Position>,
) -> (Vec<&'b Record>, bool) {
    let mut fresh: Vec<&Record> = Vec::new();
    // The last (offset, part) taken per partition: a record read twice in one
    // batch (the partition revoked and assigned again) is taken once.
    let mut taken: HashMap<i32, (i64, u32)> = HashMap::new();
    let mut flush = false;
    for r in batch {
        let p = positions.entry(r.partition).or_default();
        let last = taken.get(&r.partition).copied();
        if r.offset < p.next && last.is_none_or(|l| (r.offset, r.part) <= l) {
            continue;
        }
        taken.insert(r.partition, (r.offset, r.part));
        p.next = r.offset + 1;
        if let Body::Skip { dead_lettered } = r.body {
            flush |= dead_lettered;
            continue;
        }
        if let Some((source, offset)) = &r.origin {
            let applied = p.origins.entry(source.clone()).or_insert(-1);
            if *offset <= *applied {
                continue;
            }
            *applied = *offset;
        }
        fresh.push(r);
    }
    (fresh, flush)
}

/// The end of a batch's transaction, its rows written: the refused ones to the
/// dead-letter topic, the new positions stored, committed. Returns the next offset
/// per partition.
#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &Shared<'_>,
    target: &mut dyn Target,
    id: &str,
    upgraded_from: Option<&Upgrade<'_>>,
    sink: &str,
    partitions: &[i32],
    positions: &HashMap<i32, Position>,
    flush: bool,
    rejected: Vec<(&Record, String)>,
) -> Result<Vec<(i32, i64)>, Failure> {
    if flush && rejected.is_empty() {
        // Copies the reader queued for the dead-letter topic.
        shared
            .flush()
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
    }
    if !rejected.is_empty() {
        for (r, error) in &rejected {
            dead_letter(shared, sink, upgraded_from.map(|u| u.source), r, error)
                .map_err(|e| Failure::Unavailable(e.to_string()))?;
        }
        // The copies are in the dead-letter topic before the positions move past them.
        shared
            .flush()
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        shared
            .stats
            .dead_lettered
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
    }
    let stored: Vec<(i32, &Position)> = partitions.iter().map(|p| (*p, &positions[p])).collect();
    target.store(id, &stored)?;
    target.commit()?;
    Ok(partitions.iter().map(|p| (*p, positions[p].next)).collect())
}

/// Where a fused sink's positions were kept before sinks read their source
/// themselves: under the sink topic's id, as the highest source offset applied per
/// query and source partition (`Position::origins`).
struct Upgrade<'a> {
    id: &'a str,
    source: &'a str,
}

/// A fused sink's partitions with no position of their own start where the sink's
/// topic left them: past the highest source offset applied (a pipeline defined
/// before an upgrade writes no row twice).
fn upgrade(
    target: &mut dyn Target,
    old: &Upgrade<'_>,
    partitions: &[i32],
    positions: &mut HashMap<i32, Position>,
) -> Result<(), Failure> {
    let missing: Vec<i32> = partitions
        .iter()
        .filter(|p| !positions.contains_key(p))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let before = target.positions(old.id, &missing)?;
    for p in missing {
        let suffix = format!("/{}/{p}", old.source);
        let applied = before.get(&p).and_then(|b| {
            b.origins
                .iter()
                .filter(|(k, _)| k.ends_with(&suffix))
                .map(|(_, v)| *v)
                .max()
        });
        if let Some(applied) = applied {
            positions.insert(
                p,
                Position {
                    next: applied + 1,
                    origins: Default::default(),
                },
            );
        }
    }
    Ok(())
}

/// Writes `records` (compacted by primary key: the last row of a key wins). A batch
/// the database refuses is written again row by row, each in a savepoint; returns the
/// records refused, with the database's message.
fn insert_all<'a>(
    target: &mut dyn Target,
    records: &[&'a Record],
) -> Result<Vec<(&'a Record, String)>, Failure> {
    let mut rejected: Vec<(&Record, String)> = Vec::new();
    let mut rows: Vec<(&Record, Fields<'_>)> = Vec::new();
    for r in records {
        match &r.body {
            Body::Row(row) => rows.push((r, Fields::Object(row))),
            Body::Columns(names, values) => rows.push((r, Fields::Columns(names, values))),
            Body::NotObject => rejected.push((r, "the row is not a JSON object".into())),
            Body::Skip { .. } => {}
        }
    }
    let rows = compact(rows, target.primary_key());
    if rows.is_empty() {
        return Ok(rejected);
    }
    target.savepoint()?;
    let out = |r: &Record, row| Out {
        row,
        partition: r.partition,
        offset: r.offset,
    };
    let values: Vec<Out<'_>> = rows.iter().map(|(r, row)| out(r, *row)).collect();
    match target.insert(&values) {
        Ok(()) => return Ok(rejected),
        Err(Failure::Rejected(_)) => target.rollback_to_savepoint()?,
        Err(other) => return Err(other),
    }
    for (r, row) in rows {
        target.savepoint()?;
        match target.insert(&[out(r, row)]) {
            Ok(()) => {}
            Err(Failure::Rejected(e)) => {
                target.rollback_to_savepoint()?;
                rejected.push((r, e));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(rejected)
}

/// Keeps the last row of each primary key, in the order of those last rows (an
/// `ON CONFLICT` statement may not touch one row twice).
fn compact<'a, T>(rows: Vec<(T, Fields<'a>)>, key: &[String]) -> Vec<(T, Fields<'a>)> {
    if key.is_empty() {
        return rows;
    }
    let key_of = |row: &Fields<'a>| {
        key.iter()
            .map(|k| row.get(k).cloned().unwrap_or(serde_json::Value::Null))
            .collect::<Vec<_>>()
    };
    let mut last: HashMap<Vec<serde_json::Value>, usize> = HashMap::new();
    for (i, (_, row)) in rows.iter().enumerate() {
        last.insert(key_of(row), i);
    }
    rows.into_iter()
        .enumerate()
        .filter(|(i, (_, row))| last.get(&key_of(row)) == Some(i))
        .map(|(_, r)| r)
        .collect()
}

fn dead_letter(
    shared: &Shared<'_>,
    sink: &str,
    source: Option<&str>,
    record: &Record,
    error: &str,
) -> Result<(), Error> {
    let Some(m) = &record.message else {
        // A fused query's row: its values as a JSON object, from its source record.
        let Body::Columns(names, values) = &record.body else {
            return Ok(());
        };
        let payload = serde_json::to_vec(&Fields::Columns(names, values)).unwrap_or_default();
        let from = format!(
            "{}/{}/{}",
            source.unwrap_or_default(),
            record.partition,
            record.offset
        );
        let headers = [
            ("freshet.source", from.as_bytes()),
            ("freshet.error", error.as_bytes()),
            ("freshet.sink", sink.as_bytes()),
        ];
        let mut owned = rdkafka::message::OwnedHeaders::new_with_capacity(3);
        for (key, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key,
                value: Some(value),
            });
        }
        let mut out = rdkafka::producer::BaseRecord::to(&shared.dead)
            .payload(&payload[..])
            .headers(owned)
            .timestamp(record.timestamp);
        if let Some(key) = &record.key {
            out = out.key(&key[..]);
        }
        return super::send(&shared.producer, out);
    };
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            headers.push((h.key, h.value.unwrap_or_default()));
        }
    }
    headers.push(("freshet.error", error.as_bytes()));
    headers.push(("freshet.sink", sink.as_bytes()));
    let mut owned = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(rdkafka::message::Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record = rdkafka::producer::BaseRecord::to(&shared.dead)
        .payload(m.payload().unwrap_or_default())
        .headers(owned);
    if let Some(key) = m.key() {
        record = record.key(key);
    }
    if let Some(ts) = m.timestamp().to_millis() {
        record = record.timestamp(ts);
    }
    super::send(&shared.producer, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("url = 'postgres://freshet:s3cret@127.0.0.1:5432/polls', table = 't'"),
            "url = 'postgres://freshet:***@127.0.0.1:5432/polls', table = 't'"
        );
        assert_eq!(
            redact("url = 'postgres://freshet@h/db'"),
            "url = 'postgres://freshet@h/db'"
        );
        assert_eq!(
            redact("url = 'host=h user=u password=p4ss dbname=d'"),
            "url = 'host=h user=u password=*** dbname=d'"
        );
        assert_eq!(redact("no url here"), "no url here");
    }

    #[test]
    fn table_and_upsert_text() {
        let columns = |key: &[&str]| Columns {
            query: None,
            primary_key: key.iter().map(|k| k.to_string()).collect(),
        };
        let written = ["city".to_string(), "n".to_string()];
        assert_eq!(columns(&[]).on_conflict(written.iter()), "");
        assert_eq!(
            columns(&["city"]).on_conflict(written.iter()),
            r#" ON CONFLICT ("city") DO UPDATE SET "n" = excluded."n""#
        );
        assert_eq!(
            columns(&["city", "n"]).on_conflict(written.iter()),
            r#" ON CONFLICT ("city", "n") DO NOTHING"#
        );
        let query = [
            ("a\"b".to_string(), ColumnType::Int),
            ("j".to_string(), ColumnType::Json),
        ];
        let untyped = |t: ColumnType| if t == ColumnType::Int { "BIGINT" } else { "" };
        assert_eq!(
            columns(&["j"]).create_table("t", &query, untyped),
            r#"CREATE TABLE IF NOT EXISTS t ("a""b" BIGINT, "j", PRIMARY KEY ("j"))"#
        );
    }

    #[test]
    fn a_fused_sink_starts_past_what_its_topic_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let sink = Sink {
            name: "s".into(),
            connector: Connector::Sqlite {
                path: path.to_string_lossy().into_owned(),
            },
            table: "t".into(),
            primary_key: Vec::new(),
            create_table: true,
            batch_rows: 10,
            batch_interval_ms: 10,
        };
        let columns = Columns {
            query: Some(vec![("id".into(), ColumnType::Int)]),
            primary_key: Vec::new(),
        };
        let mut target = target(&sink, columns);
        target.open().unwrap();
        // What the sink's topic path stored: partition 0 applied src/0 up to 41 (two
        // queries), partition 1 only another topic's records.
        let before = |origins: &[(&str, i64)]| Position {
            next: 99,
            origins: origins.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let p0 = before(&[("0/src/0", 41), ("1/src/0", 37), ("0/src2/0", 90)]);
        let p1 = before(&[("0/other/1", 5)]);
        target.begin().unwrap();
        target.store("topic", &[(0, &p0), (1, &p1)]).unwrap();
        target.commit().unwrap();
        let old = Upgrade {
            id: "topic",
            source: "src",
        };
        target.begin().unwrap();
        let mut positions = target.positions("topic.source", &[0, 1, 2]).unwrap();
        assert!(positions.is_empty());
        upgrade(target.as_mut(), &old, &[0, 1, 2], &mut positions).unwrap();
        assert_eq!(positions.len(), 1, "{positions:?}");
        assert_eq!(positions[&0].next, 42);
        // A partition with a position of its own keeps it.
        let own = Position {
            next: 7,
            origins: Default::default(),
        };
        target.store("topic.source", &[(0, &own)]).unwrap();
        target.commit().unwrap();
        target.begin().unwrap();
        let mut positions = target.positions("topic.source", &[0]).unwrap();
        upgrade(target.as_mut(), &old, &[0], &mut positions).unwrap();
        assert_eq!(positions[&0].next, 7);
        target.rollback();
    }

    #[test]
    fn columns_read_and_write_as_their_object() {
        let names: Vec<String> = ["id", "city", "tags"].map(String::from).to_vec();
        let values = vec![
            serde_json::json!(7),
            serde_json::json!("a\tb \"q\""),
            serde_json::json!([1, {"x": null}]),
        ];
        let object: serde_json::Map<String, serde_json::Value> =
            names.iter().cloned().zip(values.iter().cloned()).collect();
        let columns = Fields::Columns(&names, &values);
        let from_columns: serde_json::Value = serde_json::to_value(columns).unwrap();
        assert_eq!(from_columns, serde_json::Value::Object(object.clone()));
        for n in ["id", "city", "tags", "missing"] {
            assert_eq!(columns.get(n), Fields::Object(&object).get(n), "{n}");
        }
        let pairs: Vec<(&str, &serde_json::Value)> = columns.iter().collect();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[1], ("city", &values[1]));
    }

    #[test]
    fn compaction_keeps_the_last_row_of_a_key() {
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = [
            serde_json::json!({"k": 1, "v": "a"}),
            serde_json::json!({"k": 2, "v": "b"}),
            serde_json::json!({"k": 1, "v": "c"}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        let input: Vec<(usize, _)> = rows.iter().map(Fields::Object).enumerate().collect();
        let kept: Vec<usize> = compact(input.clone(), &["k".to_string()])
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(kept, [1, 2]);
        assert_eq!(compact(input, &[]).len(), 3);
    }
}
