//! The second stage of a run: the tasks. Task N owns repartition partition N, the
//! state of the groups whose keys hash to it, and state-topic partition N, where its
//! checkpoints go. The instances of a pipeline split the tasks through a second
//! consumer group; when a task is assigned here, its partition is assigned paused,
//! the task is claimed in its state partition and its last checkpoint read on a
//! loader thread (a rebalance callback returns at once, however large the state),
//! and the partition resumes at the offset that checkpoint reflects, so no record is
//! counted twice or lost across a move. A revocation waits for the claims in flight,
//! so that none lands after the next owner's. An instance that lost a task without
//! noticing has its next checkpoint refused ([`Error::Fenced`]) and trims nothing.
//!
//! A task drops a routed record whose source offset is not above the highest one it
//! applied for that (query, source partition): the first stage sends a record again
//! after a crash or a rebalance, always in source order, and commits a source offset
//! only after everything before it is acknowledged, so the first copy to arrive is
//! the one applied and every later copy is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Headers;
use rdkafka::producer::ThreadedProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Message, Offset, TopicPartitionList};
use sql::expr::{Input, Json};
use sql::plan::Body;

use super::batch::{BatchQueue, Batched, Batches};
use super::checkpoint::{Checkpoint, Claim, StateTopic};
use super::json;
use super::txn::Txn;
use super::{
    cached_high, dead_letter_input, input_headers, read_json, send_copy, send_rows, state_topic,
    tasks_group_id, Clock, DeliveryContext, Error, Origin, Route, Shared, CLUSTER_TIMEOUT,
    ROUTE_HEADER, TICK,
};
use crate::ops::encode::Reader;
use crate::ops::{self, Fate, QueryOperator, Row};

/// A task: (index of its input in `Layout::inputs`, partition of that input).
type TaskId = (usize, i32);

/// What the rebalance callback tells the loop.
enum Event {
    /// Every task went away (the eager protocol revokes all).
    Revoked,
    Failed(Error),
}

struct TaskContext {
    /// `Layout::inputs`: (topic, first state partition).
    inputs: Vec<(String, i32)>,
    events: Mutex<Vec<Event>>,
    loader: Loader,
    /// The assigned partitions forward to the batch reader.
    batches: BatchQueue,
}

/// Claims tasks and reads their checkpoints on a thread of its own.
struct Loader {
    jobs: mpsc::Sender<Job>,
    gate: Arc<Gate>,
}

/// The assignment's generation (each revocation starts a new one: results of an
/// older one are dropped, its jobs not started are skipped) and the claims being
/// written.
#[derive(Default)]
struct Gate {
    state: Mutex<(u64, usize)>,
    done: Condvar,
}

struct Job {
    generation: u64,
    task: TaskId,
    /// The task's input topic.
    input: String,
    state_partition: i32,
}

/// A task claimed, with its last checkpoint, if any, and the first offset of its
/// input partition (where a task without a checkpoint starts: a seek to librdkafka's
/// logical "beginning" waited 500 ms for its offset lookup, the better part of a new
/// pipeline's start-up).
struct Loaded {
    generation: u64,
    task: TaskId,
    result: Result<Taken, Error>,
}

/// What the loader took for a task: its claim, its last checkpoint, the first
/// offset of its input, and (exactly-once) its transactional producer.
struct Taken {
    claim: Claim,
    checkpoint: Option<Checkpoint>,
    first: Option<i64>,
    txn: Option<Txn>,
}

/// Opens a task's transactional producer (exactly-once output), fencing the one of
/// any earlier owner.
type MakeTxn = Box<dyn Fn(TaskId) -> Result<Txn, Error> + Send>;

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Loader {
    /// Starts the thread; results come out of the receiver.
    fn start(
        state: Arc<StateTopic>,
        make_txn: Option<MakeTxn>,
    ) -> (Loader, mpsc::Receiver<Loaded>) {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done, results) = mpsc::channel();
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        std::thread::Builder::new()
            .name("pipeline-loader".into())
            .spawn(move || {
                for job in rx {
                    {
                        let mut s = g.lock();
                        if s.0 != job.generation {
                            continue;
                        }
                        s.1 += 1;
                    }
                    // Exactly-once: fence the task's earlier owner (its open
                    // transaction aborted) before the claim and the read.
                    let txn = make_txn.as_ref().map(|make| make(job.task)).transpose();
                    let claim = txn
                        .and_then(|txn| state.claim(job.state_partition).map(|claim| (claim, txn)));
                    {
                        g.lock().1 -= 1;
                        g.done.notify_all();
                    }
                    let result = claim.and_then(|(c, txn)| {
                        let last = state.last_before(job.state_partition, &c)?;
                        let first = state.first_offset(&job.input, job.task.1);
                        Ok(Taken {
                            claim: c,
                            checkpoint: last,
                            first,
                            txn,
                        })
                    });
                    let loaded = Loaded {
                        generation: job.generation,
                        task: job.task,
                        result,
                    };
                    if done.send(loaded).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the loader thread");
        (Loader { jobs, gate }, results)
    }

    fn generation(&self) -> u64 {
        self.gate.lock().0
    }

    /// Starts a new generation once the claims being written are acknowledged.
    fn revoke(&self) {
        let mut s = self.gate.lock();
        s.0 += 1;
        while s.1 > 0 {
            s = self.gate.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl ClientContext for TaskContext {}

impl Batched for TaskContext {
    fn batch_queue(&self) -> &BatchQueue {
        &self.batches
    }
}

impl ConsumerContext for TaskContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            self.batches.revoke();
            self.loader.revoke();
            events.push(Event::Revoked);
            let _ = consumer.unassign();
            return;
        }
        self.batches.assign(consumer, tpl);
        // Paused until the loader has read where each task starts.
        if let Err(e) = consumer.assign(tpl).and_then(|()| consumer.pause(tpl)) {
            events.push(Event::Failed(Error::Cluster(format!(
                "cannot take the tasks assigned: {e}"
            ))));
            return;
        }
        let generation = self.loader.generation();
        for e in tpl.elements() {
            let Some(input) = self.inputs.iter().position(|(t, _)| t == e.topic()) else {
                continue;
            };
            let _ = self.loader.jobs.send(Job {
                generation,
                task: (input, e.partition()),
                input: e.topic().to_string(),
                state_partition: self.inputs[input].1 + e.partition(),
            });
        }
    }
}

/// One task: the operators of the grouped queries that read its input (for the
/// repartition topic, for the keys that hash to its partition).
struct Task {
    /// Whether its input is the repartition topic (or a source, read directly).
    routed: bool,
    /// The source it reads directly: its index in `Prepared::sources`.
    source: usize,
    /// Its partition of the state topic, and its claim there.
    state_partition: i32,
    claim: Claim,
    ops: Vec<(usize, QueryOperator)>,
    /// Per (query, source, source partition): the highest source offset applied.
    applied: HashMap<(u32, u32, i32), i64>,
    /// The next repartition offset to read.
    next: i64,
    /// Whether it read anything (or, exactly-once, sent a row) since its last
    /// checkpoint.
    dirty: bool,
    /// Exactly-once: its transactional producer, for its rows and checkpoints.
    txn: Option<Txn>,
}

impl Task {
    fn new(
        shared: &Shared<'_>,
        (input, partition): TaskId,
        claim: Claim,
        checkpoint: Option<Checkpoint>,
        txn: Option<Txn>,
    ) -> Result<Task, Error> {
        let plan = &shared.prepared.plan;
        let layout = &shared.layout;
        let (topic, first) = &layout.inputs[input];
        let routed = *topic == shared.repartition;
        let source = (shared.prepared.sources.iter())
            .position(|(t, _)| t == topic)
            .unwrap_or(0);
        let mut task = Task {
            routed,
            source,
            state_partition: first + partition,
            claim,
            ops: plan
                .queries
                .iter()
                .enumerate()
                .filter(|(i, q)| {
                    matches!(q.body, Body::Aggregate(_))
                        && if routed {
                            !layout.direct[*i]
                        } else {
                            layout.direct[*i] && q.source.topic == *topic
                        }
                })
                .map(|(i, q)| (i, QueryOperator::new(q, &plan.settings)))
                .collect(),
            applied: HashMap::new(),
            next: -1,
            dirty: false,
            txn,
        };
        if let Some(c) = checkpoint {
            let bad = |e: String| {
                Error::Corrupt(format!(
                    "cannot restore the checkpoint of state partition {}: {e}; delete the pipeline and its state topic to start afresh",
                    task.state_partition
                ))
            };
            if c.operators.len() != task.ops.len() + 1 {
                return Err(bad("it does not have one snapshot per query".into()));
            }
            for ((_, op), bytes) in task.ops.iter_mut().zip(&c.operators) {
                op.restore(bytes).map_err(bad)?;
            }
            task.applied = decode_applied(&c.operators[task.ops.len()]).map_err(bad)?;
            task.next = c.offsets.first().map_or(-1, |o| o.2);
        }
        for (q, op) in &mut task.ops {
            let source = &plan.queries[*q].source.topic;
            let partitions = shared
                .prepared
                .sources
                .iter()
                .find(|(t, _)| t == source)
                .map_or(1, |(_, p)| *p);
            // A task reading a source partition directly sees only that one: its
            // watermark follows it alone.
            let fed: Vec<i32> = if routed {
                (0..partitions).collect()
            } else {
                vec![partition]
            };
            op.assign(&fed);
        }
        Ok(task)
    }

    fn checkpoint(&self, shared: &Shared<'_>, (input, partition): TaskId) -> Checkpoint {
        let mut operators: Vec<Vec<u8>> = self.ops.iter().map(|(_, op)| op.snapshot()).collect();
        operators.push(encode_applied(&self.applied));
        Checkpoint {
            plan_hash: shared.hash,
            offsets: vec![(shared.layout.inputs[input].0.clone(), partition, self.next)],
            operators,
        }
    }
}

fn encode_applied(applied: &HashMap<(u32, u32, i32), i64>) -> Vec<u8> {
    let mut entries: Vec<_> = applied.iter().collect();
    entries.sort();
    let mut out = Vec::with_capacity(4 + entries.len() * 20);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for ((q, s, p), offset) in entries {
        out.extend_from_slice(&q.to_be_bytes());
        out.extend_from_slice(&s.to_be_bytes());
        out.extend_from_slice(&p.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out
}

fn decode_applied(bytes: &[u8]) -> Result<HashMap<(u32, u32, i32), i64>, String> {
    let mut r = Reader::new(bytes);
    let n = r.count()?;
    let mut out = HashMap::with_capacity(n.min(4096));
    for _ in 0..n {
        let key = (r.u32()?, r.u32()?, r.u32()? as i32);
        out.insert(key, r.i64()?);
    }
    if !r.done() {
        return Err("trailing bytes after the applied offsets".into());
    }
    Ok(out)
}

pub(super) fn run(shared: &Shared<'_>, stopping: &dyn Fn() -> bool) -> Result<(), Error> {
    let prepared = shared.prepared;
    let plan = &prepared.plan;
    let name = &prepared.name;
    let stats = shared.stats;
    let cluster = |e: String| Error::Cluster(e);
    let state = Arc::new(
        StateTopic::open(&prepared.client, &state_topic(name), CLUSTER_TIMEOUT).map_err(cluster)?,
    );
    let make_txn: Option<MakeTxn> = plan.settings.exactly_once.then(|| {
        let client = prepared.client.clone();
        let prefix = tasks_group_id(name, plan);
        let inputs = shared.layout.inputs.clone();
        let state_name = state.name.clone();
        Box::new(move |(input, partition): TaskId| {
            let id = format!("{prefix}-{}-{partition}", inputs[input].0);
            Txn::start(&client, &id, &state_name)
        }) as MakeTxn
    });
    let (loader, loaded) = Loader::start(state.clone(), make_txn);
    let context = TaskContext {
        inputs: shared.layout.inputs.clone(),
        events: Mutex::new(Vec::new()),
        loader,
        batches: BatchQueue::default(),
    };
    let consumer = shared.consumer(tasks_group_id(name, plan), context)?;
    let inputs: Vec<&str> = shared
        .layout
        .inputs
        .iter()
        .map(|(t, _)| t.as_str())
        .collect();
    let mut reader = Batches::new(&consumer);
    consumer
        .subscribe(&inputs)
        .map_err(|e| Error::Cluster(e.to_string()))?;
    let mut messages = Vec::new();

    let mut tasks: BTreeMap<TaskId, Task> = BTreeMap::new();
    let checkpoint_every =
        Duration::from_millis(plan.settings.checkpoint_interval_ms.max(10) as u64);
    let mut last_tick = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut checkpoint_after = checkpoint_every;
    let mut rows: Vec<Row> = Vec::new();
    // The JSON fields of the record at hand (`json::parse`), reused.
    let mut fields: Vec<serde_json::Value> = Vec::new();
    let mut out_count = 0u64;
    let mut clock = Clock::new();
    loop {
        let error = reader.read(TICK, Clock::EVERY as usize, &mut messages)?;
        let read = clock.after_read(messages.len());
        let now = clock.now;
        take_events(shared, &consumer, &loaded, &mut tasks)?;
        for message in messages.drain(..) {
            let input = match inputs.len() {
                1 => Some(0), // not the topic's name compared per record
                _ => inputs.iter().position(|t| *t == message.topic()),
            };
            // A record below the task's next offset is one its checkpoint covers:
            // the fetch of a task assigned paused may start from the group's
            // committed offset (librdkafka looks it up on assignment, and that
            // can land after the seek to the checkpoint's offset), which is never
            // above the checkpoint's.
            let task = input
                .and_then(|i| tasks.get_mut(&(i, message.partition())))
                .filter(|task| message.offset() >= task.next);
            if let Some(task) = task {
                task.next = message.offset() + 1;
                task.dirty = true;
                out_count += if task.routed {
                    routed(shared, task, &message, &mut fields, &mut rows)?
                } else {
                    direct(shared, task, &message, &mut fields, &mut rows)?
                };
            }
        }
        if let Some(err) = error {
            tracing::debug!(pipeline = %name, error = %err, "pipeline: tasks consumer");
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
            out_count += tick(shared, &mut tasks, now, &mut rows)?;
            stats
                .records_out
                .fetch_add(std::mem::take(&mut out_count), Ordering::Relaxed);
        }
        if last_checkpoint.elapsed() >= checkpoint_after {
            let started = Instant::now();
            checkpoint(shared, &state, &consumer, &mut tasks)?;
            // A checkpoint takes time in proportion to the state: the next one waits
            // at least nine times as long, so that checkpoints never take more than
            // a tenth of the run (a crash then replays more; results are the same).
            checkpoint_after = checkpoint_every.max(started.elapsed() * 9);
            last_checkpoint = Instant::now();
        }
    }
    stats.records_out.fetch_add(out_count, Ordering::Relaxed);
    checkpoint(shared, &state, &consumer, &mut tasks)
}

/// Takes the tasks the last rebalance took, then those the loader has claimed: each
/// resumes at the offset its checkpoint reflects.
fn take_events(
    shared: &Shared<'_>,
    consumer: &BaseConsumer<TaskContext>,
    loaded: &mpsc::Receiver<Loaded>,
    tasks: &mut BTreeMap<TaskId, Task>,
) -> Result<(), Error> {
    let context = consumer.context();
    let events = std::mem::take(&mut *context.events.lock().unwrap_or_else(|e| e.into_inner()));
    for event in events {
        match event {
            Event::Revoked => {
                // A transaction left open is aborted by the next owner.
                for (_, task) in std::mem::take(tasks) {
                    if let Some(txn) = task.txn {
                        super::close_later(txn);
                    }
                }
            }
            Event::Failed(e) => return Err(e),
        }
    }
    while let Ok(Loaded {
        generation,
        task: id,
        result,
    }) = loaded.try_recv()
    {
        if generation != context.loader.generation() {
            continue; // revoked since
        }
        let Taken {
            claim,
            checkpoint,
            first,
            txn,
        } = result?;
        let topic = &shared.layout.inputs[id.0].0;
        let checkpoint = checkpoint.filter(|c| c.plan_hash == shared.hash);
        let beginning = first.map_or(Offset::Beginning, Offset::Offset);
        let offset = checkpoint
            .as_ref()
            .and_then(|c| c.offsets.iter().find(|(t, p, _)| t == topic && *p == id.1))
            .map_or(beginning, |(_, _, next)| Offset::Offset(*next));
        tasks.insert(id, Task::new(shared, id, claim, checkpoint, txn)?);
        let mut resume = TopicPartitionList::new();
        resume.add_partition(topic, id.1);
        consumer
            .seek(topic, id.1, offset, Duration::ZERO)
            .and_then(|()| consumer.resume(&resume))
            .map_err(|e| Error::Cluster(format!("cannot start task {topic}/{}: {e}", id.1)))?;
    }
    Ok(())
}

/// One record or marker of a task's repartition partition; returns how many rows it
/// sent.
fn routed(
    shared: &Shared<'_>,
    task: &mut Task,
    message: &impl Message,
    fields: &mut Vec<serde_json::Value>,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let plan = &shared.prepared.plan;
    let route = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == ROUTE_HEADER))
        .and_then(|h| h.value)
        .and_then(Route::decode);
    let Some(route) = route.filter(|r| r.plan == shared.hash) else {
        // Written for another definition of the pipeline.
        return Ok(0);
    };
    let producer = task.txn.as_ref().map_or(&shared.producer, |t| &t.producer);
    let Some((q, op)) = task.ops.iter_mut().find(|(q, _)| *q as u32 == route.query) else {
        return Ok(0);
    };
    let query = &plan.queries[*q];
    if route.marker {
        if route.idle {
            op.idle(route.partition, rows);
        } else if let Some(high) = route.high {
            op.observe(route.partition, high, rows);
        }
        return send_rows(shared, producer, &query.output, rows, None);
    }
    let applied = task
        .applied
        .entry((route.query, route.source, route.partition))
        .or_insert(-1);
    if route.offset <= *applied {
        return Ok(0);
    }
    *applied = route.offset;
    if let Some(high) = route.high {
        op.observe(route.partition, high, rows);
    }
    let source_topic = shared
        .prepared
        .sources
        .get(route.source as usize)
        .map_or("?", |(t, _)| t.as_str());
    let source = Origin {
        topic: source_topic,
        partition: route.partition,
        offset: route.offset,
    };
    // Stage 1 read it as JSON already (and dead-lettered it if it was not).
    let wanted = shared
        .json_fields
        .get(route.source as usize)
        .filter(|_| query.source.json);
    let json = match wanted {
        Some(w) if json::parse(message.payload().unwrap_or_default(), w, fields).is_ok() => {
            w.json(fields)
        }
        _ => Json::NULL,
    };
    let headers = input_headers(shared, message);
    let input = Input {
        json,
        raw: message.payload().unwrap_or_default(),
        key: message.key(),
        timestamp: message.timestamp().to_millis().unwrap_or(0),
        partition: route.partition,
        offset: route.offset,
        headers: &headers,
    };
    let out = send_rows(shared, producer, &query.output, rows, None)?;
    Ok(out + apply(shared, producer, *q, op, &input, message, &source, rows)?)
}

/// One record of a source a task reads directly; returns how many rows it sent.
fn direct(
    shared: &Shared<'_>,
    task: &mut Task,
    message: &impl Message,
    fields: &mut Vec<serde_json::Value>,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let plan = &shared.prepared.plan;
    let stats = shared.stats;
    let s = task.source;
    let source = Origin {
        topic: &shared.prepared.sources[s].0,
        partition: message.partition(),
        offset: message.offset(),
    };
    if !shared.layout.stage1_reads[s] {
        stats.record_in();
    }
    let needs_json = task.ops.iter().any(|(q, _)| plan.queries[*q].source.json);
    // Stage 1 dead-letters what is not JSON when it reads this source too.
    let dead_letter = !shared.layout.stage1_reads[s];
    let producer = task.txn.as_ref().map_or(&shared.producer, |t| &t.producer);
    if needs_json && !read_json(shared, producer, message, &source, s, dead_letter, fields)? {
        return Ok(0);
    }
    let json = match needs_json {
        true => shared.json_fields[s].json(fields),
        false => Json::NULL,
    };
    let headers = input_headers(shared, message);
    let input = Input {
        json,
        raw: message.payload().unwrap_or_default(),
        key: message.key(),
        timestamp: message.timestamp().to_millis().unwrap_or(0),
        partition: message.partition(),
        offset: message.offset(),
        headers: &headers,
    };
    let mut out = 0;
    for (q, op) in &mut task.ops {
        out += apply(shared, producer, *q, op, &input, message, &source, rows)?;
    }
    Ok(out)
}

/// Runs one record through query `q`'s operator: late and rejected records are
/// copied to their topics; returns how many rows it sent.
#[allow(clippy::too_many_arguments)]
fn apply(
    shared: &Shared<'_>,
    producer: &ThreadedProducer<DeliveryContext>,
    q: usize,
    op: &mut QueryOperator,
    input: &Input<'_>,
    message: &impl Message,
    source: &Origin<'_>,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let stats = shared.stats;
    let output = shared.prepared.plan.queries[q].output.as_str();
    let extra = ("freshet.query", output);
    match op.process(input, rows) {
        Ok(Fate::Done) => {}
        Ok(Fate::Late) => {
            send_copy(producer, &shared.late, message, source, &[extra])?;
            stats.late.fetch_add(1, Ordering::Relaxed);
        }
        Err(ops::Error::Rejected(reason)) => {
            dead_letter_input(shared, producer, message, source, &reason, Some(output))?;
        }
        Err(ops::Error::StateLimit { used, limit }) => {
            stats.state_bytes.store(used, Ordering::Relaxed);
            return Err(Error::StateLimit { used, limit });
        }
    }
    send_rows(shared, producer, output, rows, None)
}

/// Ticks every operator; checks the state limit over all the tasks held here.
fn tick(
    shared: &Shared<'_>,
    tasks: &mut BTreeMap<TaskId, Task>,
    now: i64,
    rows: &mut Vec<Row>,
) -> Result<u64, Error> {
    let plan = &shared.prepared.plan;
    let mut out = 0;
    let mut watermark: Option<i64> = None;
    let mut used = 0u64;
    for task in tasks.values_mut() {
        let producer = task.txn.as_ref().map_or(&shared.producer, |t| &t.producer);
        for (q, op) in &mut task.ops {
            op.tick(now, rows);
            let sent = send_rows(shared, producer, &plan.queries[*q].output, rows, None)?;
            // Exactly-once: rows wait in the task's transaction for its next
            // checkpoint, which must come.
            task.dirty |= sent > 0 && task.txn.is_some();
            out += sent;
            if matches!(&plan.queries[*q].body, Body::Aggregate(a) if a.window.is_some()) {
                if let Some(w) = op.watermark() {
                    watermark = Some(watermark.map_or(w, |m| m.min(w)));
                }
            }
            used += op.state_bytes();
        }
    }
    let stats = shared.stats;
    if let Some(w) = watermark {
        stats.watermark.store(w, Ordering::Relaxed);
    }
    stats.state_bytes.store(used, Ordering::Relaxed);
    let limit = plan.settings.max_state_bytes;
    if used > limit {
        return Err(Error::StateLimit { used, limit });
    }
    Ok(out)
}

/// Flushes the rows emitted so far (every one acknowledged, or the run fails), then
/// writes each task's state with the repartition offset it reflects (exactly-once:
/// and commits the task's transaction, its rows with it), trims what the tasks will
/// never read again, and commits those offsets for lag tools.
fn checkpoint(
    shared: &Shared<'_>,
    state: &StateTopic,
    consumer: &BaseConsumer<TaskContext>,
    tasks: &mut BTreeMap<TaskId, Task>,
) -> Result<(), Error> {
    shared.flush()?;
    let mut offsets = TopicPartitionList::new();
    let mut trim = Vec::new();
    let mut lag = None;
    for (&id, task) in tasks.iter_mut() {
        if !task.routed {
            let topic = &shared.layout.inputs[id.0].0;
            if let Some(high) = cached_high(consumer, topic, id.1) {
                *lag.get_or_insert(0) += (high - task.next.max(0)).max(0);
            }
        }
        if !task.dirty {
            continue;
        }
        let checkpoint = task.checkpoint(shared, id);
        match &task.txn {
            // Exactly-once: the checkpoint and the rows since the last one, in one
            // transaction; what came before it is never read again.
            Some(txn) => {
                let first =
                    txn.commit_checkpoint(state, task.state_partition, &checkpoint, &task.claim)?;
                state.trim(&state.name, &[(task.state_partition, first)]);
            }
            None => state.write(task.state_partition, &checkpoint, &mut task.claim)?,
        }
        task.dirty = false;
        shared.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        let topic = &shared.layout.inputs[id.0].0;
        let _ = offsets.add_partition_offset(topic, id.1, Offset::Offset(task.next));
        if task.routed {
            trim.push((id.1, task.next));
        }
    }
    if let Some(lag) = lag {
        shared.stats.task_lag.store(lag, Ordering::Relaxed);
    }
    if !trim.is_empty() {
        state.trim(&shared.repartition, &trim);
    }
    if offsets.count() > 0 {
        if let Err(err) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::debug!(error = %err, "pipeline: committing task offsets");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn applied_offsets_read_back(entries in proptest::collection::hash_map((any::<u32>(), any::<u32>(), any::<i32>()), any::<i64>(), 0..20)) {
            prop_assert_eq!(decode_applied(&encode_applied(&entries)).unwrap(), entries);
        }

        #[test]
        fn garbage_applied_offsets_are_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode_applied(&bytes);
        }
    }

    /// The loader claims a task and reads its checkpoint on its own thread; after a
    /// revocation, a job of the generation before is skipped: it writes no claim,
    /// which could land after the next owner's and fence it.
    #[test]
    fn the_loader_claims_and_reads_and_skips_what_a_revocation_made_stale() {
        use super::super::test_broker::Broker;
        let broker = Broker::start();
        let name = "loader.state";
        broker.create_topic(name, 2);
        let timeout = Duration::from_secs(10);
        let state = Arc::new(StateTopic::open(&broker.client(), name, timeout).unwrap());
        let saved = Checkpoint {
            plan_hash: 7,
            offsets: vec![("in".into(), 1, 42)],
            operators: vec![vec![1, 2, 3]],
        };
        let mut before = state.claim(1).unwrap();
        state.write(1, &saved, &mut before).unwrap();
        let high = |partition| {
            let c: BaseConsumer = broker.client().create().unwrap();
            c.fetch_watermarks(name, partition, timeout).unwrap().1
        };

        let (loader, loaded) = Loader::start(state.clone(), None);
        let first = loader.generation();
        let job = |generation, p| Job {
            generation,
            task: (0, p),
            input: name.to_string(),
            state_partition: p,
        };
        loader.jobs.send(job(first, 1)).unwrap();
        let got = loaded.recv_timeout(timeout).unwrap();
        assert_eq!((got.generation, got.task), (first, (0, 1)));
        let Taken {
            claim,
            checkpoint,
            first: start,
            ..
        } = got.result.unwrap();
        assert!(claim.epoch > before.epoch);
        assert_eq!(checkpoint, Some(saved));
        let low = {
            let c: BaseConsumer = broker.client().create().unwrap();
            c.fetch_watermarks(name, 1, timeout).unwrap().0
        };
        assert_eq!(start, Some(low), "the input partition's first offset");

        let claims_on_0 = high(0);
        loader.revoke();
        assert_eq!(loader.generation(), first + 1);
        loader.jobs.send(job(first, 0)).unwrap();
        loader.jobs.send(job(first + 1, 0)).unwrap();
        let got = loaded.recv_timeout(timeout).unwrap();
        assert_eq!(got.generation, first + 1, "the stale job gave nothing");
        assert_eq!(got.result.unwrap().checkpoint, None);
        assert_eq!(
            high(0),
            claims_on_0 + 1,
            "one claim: the stale job wrote none"
        );
    }
}
