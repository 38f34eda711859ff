//! The first stage of a run: reads the source partitions this instance holds in the
//! pipeline's consumer group, runs the stateless queries, and sends each record that
//! a grouped query counts to the repartition partition of its group key, with a
//! route header (source partition and offset, and the partition's highest event time
//! before it). Every tick it also sends a watermark marker per source partition that
//! delivered, to every repartition partition, so that a task whose keys a partition
//! rarely carries still sees that partition's event time move; and an idle marker for
//! a partition held here that delivered nothing for the idle timeout. Idleness is
//! decided here, once, and reaches the tasks in their input: a task replaying its
//! repartition partition after a crash makes the same decisions.
//!
//! At least once: the source offsets are committed only after everything sent for
//! the records before them is acknowledged; a record sent twice (after a crash or a
//! rebalance) is dropped by its task, which keeps the highest source offset it
//! applied per source partition.
//!
//! Exactly once (`delivery-guarantee`): the stateless queries' rows and the dead
//! letters go through a transactional producer of this instance, committed with the
//! source offsets every checkpoint interval (`txn.rs`); a rebalance aborts what is
//! open (the partitions' next owner reads those records again from the committed
//! offsets). Routed records and markers stay outside it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sql::expr::{Input, Json};
use sql::plan::Body;

use super::batch::{start_offsets, BatchQueue, Batched, Batches};
use super::txn::Txn;
use super::{
    cached_high, copy, dead_letter_input, group_id, host_name, input_headers, read_json, send,
    send_rows, Clock, DeliveryContext, Error, Origin, Route, Shared, CLUSTER_TIMEOUT, ROUTE_HEADER,
    TICK,
};
use crate::ops::{self, Fate, QueryOperator, Row};

/// What stage 1 does for one query.
enum Stage {
    /// A stateless query, run here.
    Map(QueryOperator),
    /// A grouped query: routing only; its state lives in the tasks.
    Route(QueryOperator),
    /// A grouped query its task reads directly.
    None,
}

/// Per (grouped query, source partition held here): the highest event time
/// delivered, whether a record came since the last marker, when one last came (or
/// the partition was assigned), and whether the tasks were told it is idle.
#[derive(Clone, Copy)]
struct Progress {
    high: Option<i64>,
    delivered: bool,
    offset: i64,
    last_ms: i64,
    idle: bool,
}

impl Progress {
    fn new(now: i64) -> Progress {
        Progress {
            high: None,
            delivered: false,
            offset: -1,
            last_ms: now,
            idle: false,
        }
    }
}

/// Counts the source partitions' revocations, which happen inside `poll`; points
/// the partitions assigned at the batch reader.
#[derive(Default)]
struct RouteContext {
    revocations: std::sync::atomic::AtomicU64,
    batches: BatchQueue,
}

impl ClientContext for RouteContext {}

impl ConsumerContext for RouteContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                start_offsets(consumer, tpl, CLUSTER_TIMEOUT);
                self.batches.assign(consumer, tpl)
            }
            Rebalance::Revoke(_) => {
                self.batches.revoke();
                self.revocations.fetch_add(1, Ordering::Relaxed);
            }
            Rebalance::Error(_) => {}
        }
    }
}

impl Batched for RouteContext {
    fn batch_queue(&self) -> &BatchQueue {
        &self.batches
    }
}

pub(super) fn run(shared: &Shared<'_>, stopping: &dyn Fn() -> bool) -> Result<(), Error> {
    let prepared = shared.prepared;
    let plan = &prepared.plan;
    let stats = shared.stats;
    let name = &prepared.name;
    let layout = &shared.layout;
    let mut stages: Vec<(Stage, &str, usize)> = plan
        .queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let op = QueryOperator::new(q, &plan.settings);
            let s = prepared
                .sources
                .iter()
                .position(|(t, _)| *t == q.source.topic)
                .unwrap_or(0);
            let stage = match q.body {
                _ if !layout.in_stage1[i] => Stage::None,
                Body::Aggregate(_) => Stage::Route(op),
                Body::Map(_) => Stage::Map(op),
            };
            (stage, q.output.as_str(), s)
        })
        .collect();
    // Which queries read each source, and whether any of them reads JSON.
    let readers: Vec<Vec<usize>> = (0..prepared.sources.len())
        .map(|s| {
            (0..stages.len())
                .filter(|&i| stages[i].2 == s && layout.in_stage1[i])
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

    let group = group_id(name, plan);
    // Exactly once: this instance's transactional producer (its id names the
    // instance, so a restarted instance fences the one it replaces).
    let txn = match plan.settings.exactly_once {
        true => {
            let client = &prepared.client;
            let instance = client
                .get("group.instance.id")
                .map_or_else(host_name, str::to_string);
            Some(Txn::start(client, &format!("{group}-{instance}"), "")?)
        }
        false => None,
    };
    let out = txn.as_ref().map_or(&shared.producer, |t| &t.producer);
    let consumer: BaseConsumer<RouteContext> = shared.consumer(group, RouteContext::default())?;
    let mut revocations = 0u64;
    let topics: Vec<&str> = prepared
        .sources
        .iter()
        .zip(&layout.stage1_reads)
        .filter(|(_, reads)| **reads)
        .map(|((t, _), _)| t.as_str())
        .collect();
    let mut reader = Batches::new(&consumer);
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let mut messages = Vec::new();

    // Next offset to read per (source, partition) of what this instance read.
    let mut positions: HashMap<(usize, i32), i64> = HashMap::new();
    let mut progress: HashMap<(usize, i32), Progress> = HashMap::new();
    let checkpoint_every =
        Duration::from_millis(plan.settings.checkpoint_interval_ms.max(10) as u64);
    let mut last_tick = Instant::now();
    let mut last_commit = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut out_count = 0u64;
    let mut clock = Clock::new();
    let mut read_since_commit = false;
    loop {
        let error = reader.read(TICK, Clock::EVERY as usize, &mut messages)?;
        // Partitions were revoked (all of them: the eager protocol) inside that poll:
        // what this instance knew of them is stale. A position kept for one that comes
        // back later would be committed over its new owner's progress.
        let revoked = consumer.context().revocations.load(Ordering::Relaxed);
        if revoked != revocations {
            revocations = revoked;
            positions.clear();
            progress.clear();
            // The rows of those records are not committed: whoever reads the
            // partitions next reads the records again from the committed offsets.
            if let Some(txn) = &txn {
                txn.abort()?;
            }
        }
        let read = clock.after_read(messages.len());
        let now = clock.now;
        for message in messages.drain(..) {
            if let Some(&s) = source_index.get(message.topic()) {
                positions.insert((s, message.partition()), message.offset() + 1);
                read_since_commit = true;
                stats.record_in();
                out_count += one(
                    shared,
                    out,
                    &mut stages,
                    &readers[s],
                    needs_json[s],
                    s,
                    &message,
                    &mut progress,
                    now,
                    &mut rows,
                )?;
            }
        }
        if let Some(err) = error {
            tracing::debug!(pipeline = %name, error = %err, "pipeline: source consumer");
            super::check_fatal(&consumer, &shared.prepared.client)?;
        }
        if !read {
            continue;
        }
        if stopping() {
            break;
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            hold(&consumer, &stages, &source_index, &mut progress, now);
            send_markers(shared, &stages, &mut progress, now)?;
            stats
                .records_out
                .fetch_add(std::mem::take(&mut out_count), Ordering::Relaxed);
        }
        // Exactly once, a commit is a transaction: none while no record comes.
        if last_commit.elapsed() >= checkpoint_every && (txn.is_none() || read_since_commit) {
            commit(
                shared,
                &consumer,
                &positions,
                txn.as_ref(),
                CommitMode::Async,
            )?;
            last_commit = Instant::now();
            read_since_commit = false;
        }
    }
    stats.records_out.fetch_add(out_count, Ordering::Relaxed);
    send_markers(shared, &stages, &mut progress, clock.now)?;
    commit(
        shared,
        &consumer,
        &positions,
        txn.as_ref(),
        CommitMode::Sync,
    )
}

/// Runs one source record through the queries that read it; returns how many rows
/// it sent to outputs.
#[allow(clippy::too_many_arguments)]
fn one(
    shared: &Shared<'_>,
    out_producer: &ThreadedProducer<DeliveryContext>,
    stages: &mut [(Stage, &str, usize)],
    readers: &[usize],
    needs_json: bool,
    s: usize,
    message: &impl Message,
    progress: &mut HashMap<(usize, i32), Progress>,
    now: i64,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let source = Origin {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
    };
    let mut fields = Vec::new();
    if needs_json && !read_json(shared, out_producer, message, &source, s, true, &mut fields)? {
        return Ok(0);
    }
    let json = match needs_json {
        true => shared.json_fields[s].json(&fields),
        false => Json::NULL,
    };
    let headers = input_headers(shared, message);
    let partition = message.partition();
    let input = Input {
        json,
        raw: message.payload().unwrap_or_default(),
        key: message.key(),
        timestamp: message.timestamp().to_millis().unwrap_or(0),
        partition,
        offset: message.offset(),
        headers: &headers,
    };
    let mut out = 0;
    let mut dead_sent = false;
    for &q in readers {
        let (stage, output, _) = &mut stages[q];
        match stage {
            Stage::None => {}
            Stage::Map(op) => match op.process(&input, rows) {
                Ok(Fate::Done | Fate::Late) => {
                    let origin = shared.prepared.plan.queries[q].sink.map(|_| (q, &source));
                    out += send_rows(shared, out_producer, output, rows, origin)?
                }
                Err(ops::Error::Rejected(reason)) => {
                    if !dead_sent {
                        dead_letter_input(
                            shared,
                            out_producer,
                            message,
                            &source,
                            &reason,
                            Some(output),
                        )?;
                        dead_sent = true;
                    }
                }
                Err(ops::Error::StateLimit { used, limit }) => {
                    return Err(Error::StateLimit { used, limit })
                }
            },
            Stage::Route(op) => {
                let routing = op.route(&input);
                let p = progress
                    .entry((q, partition))
                    .or_insert_with(|| Progress::new(now));
                let high = p.high;
                if let Some(t) = routing.time {
                    p.high = Some(high.map_or(t, |h| h.max(t)));
                }
                p.delivered = true;
                p.offset = message.offset();
                if !routing.passes {
                    continue;
                }
                let route = Route {
                    marker: false,
                    idle: false,
                    plan: shared.hash,
                    query: q as u32,
                    source: s as u32,
                    partition,
                    offset: message.offset(),
                    high,
                };
                let task = match routing.key_hash {
                    Some(h) => (h % shared.layout.routed_tasks as u64) as i32,
                    // The task rejects it again: any one will do.
                    None => partition.rem_euclid(shared.layout.routed_tasks),
                };
                forward(shared, message, task, &route)?;
            }
        }
    }
    Ok(out)
}

/// Sends a copy of `message` with `route` to repartition partition `task`.
fn forward(
    shared: &Shared<'_>,
    message: &impl Message,
    task: i32,
    route: &Route,
) -> Result<(), Error> {
    let encoded = route.encode();
    copy(
        &shared.producer,
        &shared.repartition,
        Some(task),
        message,
        &[(ROUTE_HEADER, &encoded[..])],
    )
}

/// Keeps a progress entry for every (grouped query, source partition) assigned here,
/// including those that deliver nothing (so they can be declared idle), and none for
/// the others.
fn hold(
    consumer: &BaseConsumer<RouteContext>,
    stages: &[(Stage, &str, usize)],
    source_index: &HashMap<&str, usize>,
    progress: &mut HashMap<(usize, i32), Progress>,
    now: i64,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let held: Vec<(usize, i32)> = assignment
        .elements()
        .iter()
        .filter_map(|e| Some((*source_index.get(e.topic())?, e.partition())))
        .collect();
    progress.retain(|&(q, partition), _| held.contains(&(stages[q].2, partition)));
    for (s, partition) in held {
        for (q, (stage, _, source)) in stages.iter().enumerate() {
            if matches!(stage, Stage::Route(_)) && *source == s {
                progress
                    .entry((q, partition))
                    .or_insert_with(|| Progress::new(now));
            }
        }
    }
}

/// For every (grouped query, source partition) that delivered since the last tick: a
/// marker with its highest event time to every task; for one held here that
/// delivered nothing for the idle timeout, once, an idle marker.
fn send_markers(
    shared: &Shared<'_>,
    stages: &[(Stage, &str, usize)],
    progress: &mut HashMap<(usize, i32), Progress>,
    now: i64,
) -> Result<(), Error> {
    let idle_after = shared.prepared.plan.settings.idle_timeout_ms;
    for (&(q, partition), p) in progress.iter_mut() {
        let idle = if std::mem::take(&mut p.delivered) {
            p.last_ms = now;
            p.idle = false;
            false
        } else if !p.idle && now - p.last_ms >= idle_after {
            p.idle = true;
            true
        } else {
            continue;
        };
        if !idle && p.high.is_none() {
            continue;
        }
        let route = Route {
            marker: true,
            idle,
            plan: shared.hash,
            query: q as u32,
            source: stages[q].2 as u32,
            partition,
            offset: p.offset,
            high: p.high,
        };
        let encoded = route.encode();
        for task in 0..shared.layout.routed_tasks {
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: ROUTE_HEADER,
                value: Some(&encoded[..]),
            });
            let record = BaseRecord::<[u8], [u8]>::to(&shared.repartition)
                .partition(task)
                .payload(&[][..])
                .headers(headers);
            send(&shared.producer, record)?;
        }
    }
    Ok(())
}

/// Commits the source offsets read, once everything sent for the records before them
/// is acknowledged (exactly once: in `txn`, with the rows); updates the source lag.
fn commit(
    shared: &Shared<'_>,
    consumer: &BaseConsumer<RouteContext>,
    positions: &HashMap<(usize, i32), i64>,
    txn: Option<&Txn>,
    mode: CommitMode,
) -> Result<(), Error> {
    shared.flush()?;
    let sources = &shared.prepared.sources;
    let mut offsets = TopicPartitionList::new();
    let mut lag = 0i64;
    let assigned = consumer.assignment().unwrap_or_default();
    for e in assigned.elements() {
        let Some(s) = sources.iter().position(|(t, _)| t == e.topic()) else {
            continue;
        };
        let next = positions.get(&(s, e.partition())).copied();
        if let Some(next) = next {
            let _ = offsets.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
        }
        // Partitions not read from yet are not counted: nothing of them is known
        // without asking the cluster, which this loop does not wait for.
        if let (Some(high), Some(next)) = (cached_high(consumer, e.topic(), e.partition()), next) {
            lag += (high - next).max(0);
        }
    }
    shared.stats.lag.store(lag, Ordering::Relaxed);
    if let Some(txn) = txn {
        // Without offsets (nothing read yet) the rows wait: every row comes from a
        // record read, whose offset is in `positions` until a rebalance aborts it.
        if offsets.count() == 0 {
            return Ok(());
        }
        let group = consumer
            .group_metadata()
            .ok_or_else(|| Error::Cluster("the source consumer has no group metadata".into()))?;
        return txn.commit_offsets(&offsets, &group);
    }
    if offsets.count() > 0 {
        if let Err(err) = consumer.commit(&offsets, mode) {
            // Not fatal: a rebalance may have moved the partitions; what was sent is
            // read again by their new owner and dropped as a copy.
            tracing::debug!(error = %err, "pipeline: committing source offsets");
        }
    }
    Ok(())
}
