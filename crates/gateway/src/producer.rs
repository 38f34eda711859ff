//! The one way records leave the gateway: [`DurableProducer`], an idempotent
//! librdkafka producer with acks=all in front of the [`Spool`].
//!
//! `send` answers `Delivered` when the cluster acknowledged the record within
//! `spool_after_ms`, and `Spooled` once the record is fsync'd in the spool otherwise;
//! either way the record is durable and the caller may answer `2xx`. A spooled record
//! that is queued in librdkafka stays there: librdkafka keeps retrying it (the message
//! timeout is infinite) with the same producer id and sequence numbers, so the cluster
//! stores it once and in order per partition, and its spool entry is marked done when
//! the acknowledgement comes. While anything spooled is undelivered, new records are
//! spooled before they are queued.
//!
//! **Outage mode.** Once the producer knows the cluster is unreachable (librdkafka
//! reports all brokers down, a record was not acknowledged within `spool_after_ms`,
//! or librdkafka gave up on a record), new records are spooled and *held*: fsync'd and
//! answered, but not handed to librdkafka. A supervisor thread probes the cluster
//! (a metadata request, every `outage_probe_interval_ms`); when it answers, the
//! [`Reconcile`] hook catches up with what other gateways stored meanwhile (the
//! `Idempotency-Key` answers), every held record it names a duplicate is dropped from
//! the spool (marked done, counted in `reconciled`), and the rest are queued, in seq
//! order, before the mode switches back. Holding them is what makes the check
//! possible: a record already in librdkafka's queue cannot be taken back.
//!
//! **A fatal producer error** (fencing, epoch exhaustion: librdkafka's idempotent
//! producer cannot continue) is recovered in-process: new records are held, a new
//! librdkafka producer is created, the old one is dropped (its undelivered records
//! come back as "gave up" and are held, spooled), and every held record is queued
//! into the new one in seq order (counted in `recoveries`). A record the old producer
//! sent but whose acknowledgement was lost is sent again: at least once, as after a
//! crash.
//!
//! Ordering: records are handed to librdkafka in seq order, by every path (submit,
//! outage resume, recovery, start-up), and spooled in seq order; so a message key's
//! records reach the cluster in the order they were accepted. At start-up the entries
//! of an earlier run that were never marked done are held (in outage mode), so they are
//! reconciled and queued first, before any record accepted since.
//!
//! Memory and disk are bounded by `spool_max_bytes`: the bytes of every record
//! accepted and not yet acknowledged, spooled, held or not. Beyond it `send` answers
//! [`SendError::Full`] and nothing is queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::{ClientContext, Message};
use tokio::sync::{oneshot, watch};

use crate::admin::error_name;
use crate::spool::{Depth, Entry, Spool, SpoolError};

/// A record as the HTTP side built it, before it reaches the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    /// `None`: chosen by the partitioner (murmur2 of the key, as Java clients do).
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's CreateTime: when the gateway received it, even if it is
    /// delivered from the spool much later.
    pub timestamp_ms: i64,
}

impl Record {
    /// Bytes the record holds in memory and, about, in the spool.
    pub fn size(&self) -> u64 {
        (64 + self.topic.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>()) as u64
    }
}

/// A broker as the cluster's metadata names it: (id, host, port).
pub type BrokerAddress = (i32, String, i32);

/// A topic as cluster metadata describes it.
pub struct TopicMetadata {
    pub name: String,
    /// (partition, leader, replicas, in-sync replicas)
    pub partitions: Vec<(i32, i32, Vec<i32>, Vec<i32>)>,
}

/// How a record was made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The cluster acknowledged it (acks=all) at this place.
    Delivered { partition: i32, offset: i64 },
    /// It is fsync'd in the spool and will be delivered when the cluster can take it.
    Spooled,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The cluster refused the record for good (unknown topic, too large, ...);
    /// `name` is the Kafka error name.
    #[error("{name}: {message}")]
    Rejected { name: String, message: String },
    /// The spool is full: nothing was queued; the client should come back later.
    #[error("the spool is full ({held_bytes} of {max_bytes} bytes held)")]
    Full { held_bytes: u64, max_bytes: u64 },
    /// The record could not be made durable (spool I/O failed).
    #[error("{0}")]
    Storage(String),
}

impl From<SpoolError> for SendError {
    fn from(err: SpoolError) -> SendError {
        SendError::Storage(err.to_string())
    }
}

/// Settings of a [`DurableProducer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub brokers: String,
    pub spool_dir: std::path::PathBuf,
    pub spool_max_bytes: u64,
    pub spool_segment_bytes: u64,
    /// How long `send` waits for the cluster before spooling the record.
    pub spool_after_ms: u64,
    /// Largest record value; librdkafka's `message.max.bytes` is set above it.
    pub max_record_bytes: usize,
    /// In outage mode, how often the cluster is probed (each probe waits up to this
    /// long for a metadata answer, at least 100 ms).
    pub outage_probe_interval_ms: u64,
    /// Once the cluster answers again, how long the supervisor tries to reconcile
    /// (read other gateways' answers) before it sends the held records anyway.
    pub outage_reconcile_timeout_ms: u64,
    /// Extra librdkafka properties, applied last.
    pub kafka: Vec<(String, String)>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ProducerStats {
    pub delivered: AtomicU64,
    pub spooled: AtomicU64,
    pub rejected: AtomicU64,
    /// Spooled records the cluster later refused for good: logged, then dropped.
    pub dropped: AtomicU64,
    /// Entries of an earlier run queued again at start-up.
    pub replayed: AtomicU64,
    /// Held records dropped at reconciliation: another gateway stored the request.
    pub reconciled: AtomicU64,
    /// Times outage mode was entered.
    pub outages: AtomicU64,
    /// Times a new librdkafka producer took over after a fatal error.
    pub recoveries: AtomicU64,
}

/// What the supervisor asks before it sends held records again.
pub trait Reconcile: Send + Sync {
    /// Reads what other gateways stored while this one could not reach the cluster
    /// (blocks up to `timeout`); `false` if it could not get to the end.
    fn catch_up(&self, timeout: Duration) -> bool;
    /// Whether a held record duplicates one another gateway stored: it is dropped.
    fn is_duplicate(&self, record: &Record) -> bool;
}

pub struct DurableProducer {
    core: Arc<Core>,
    spool_after: Duration,
    topics: Mutex<HashMap<String, TopicInfo>>,
    last_lookup_failure: Mutex<Option<Instant>>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
struct TopicInfo {
    partitions: i32,
    checked: Instant,
}

/// How long a topic's partition count is trusted before it is looked up again (in
/// the background of a request: a stale count is still used meanwhile).
const TOPIC_REFRESH: Duration = Duration::from_secs(30);
/// How long a request waits for a metadata answer about a topic it has never seen
/// (at most `spool_after_ms`).
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// After a metadata lookup went unanswered, requests for unknown topics do not wait
/// for another one for this long.
const LOOKUP_BACKOFF: Duration = Duration::from_secs(5);
/// How long a producer replaced after a fatal error gets to report its purged records.
const OLD_PRODUCER_DRAIN: Duration = Duration::from_secs(5);

/// What the supervisor thread shares with the producer: the librdkafka producer
/// (replaced after a fatal error) and how to make another.
struct Core {
    shared: Arc<Shared>,
    current: RwLock<Arc<ThreadedProducer<Context>>>,
    client: ClientConfig,
    probe_interval: Duration,
    reconcile_timeout: Duration,
    reconciler: Option<Arc<dyn Reconcile>>,
}

struct Shared {
    spool: Spool,
    state: Mutex<State>,
    /// Wakes the supervisor: outage entered, fatal error, stop.
    wake: Condvar,
    /// Mirrors `State::outage` for waiters on the runtime (`Pending::outcome`).
    outage: watch::Sender<bool>,
    stop: AtomicBool,
    max_bytes: u64,
    stats: ProducerStats,
}

struct State {
    next_seq: u64,
    /// Every record accepted and not yet answered for good, by seq: queued in
    /// librdkafka, or held (spooled, waiting for the supervisor).
    in_flight: BTreeMap<u64, InFlight>,
    held_bytes: u64,
    /// How many of `in_flight` are spooled; while non-zero, new records are spooled
    /// before they are queued.
    spooled_in_flight: u64,
    /// The cluster is unreachable: new records are spooled and held.
    outage: bool,
    /// librdkafka's producer had a fatal error: new records are held until a new
    /// producer takes over.
    fatal: bool,
}

impl State {
    fn holding(&self) -> bool {
        self.outage || self.fatal
    }
}

struct InFlight {
    /// Kept until the answer, to be spooled if the cluster is slow.
    record: Arc<Record>,
    spooled: bool,
    /// Handed to librdkafka (false: held, spooled, waiting for the supervisor).
    queued: bool,
    waiter: Option<oneshot::Sender<Answer>>,
}

enum Answer {
    Delivered {
        partition: i32,
        offset: i64,
    },
    Spooled,
    Rejected {
        name: String,
        message: String,
    },
    /// librdkafka gave up on the record without the cluster refusing it (a fatal
    /// producer error, a purge): it is held, spooled, for the supervisor.
    GaveUp {
        name: String,
        message: String,
    },
    Failed(String),
}

struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", "{fac}: {message}")
            }
            // Connection failures are what the spool is for: worth a warning only.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "{fac}: {message}")
            }
            _ => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // The earliest sign of an outage: every connection is down. Spooling at
            // once from here spares requests the wait of `spool_after_ms`.
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.shared.enter_outage("all brokers are down")
            }
            Some(RDKafkaErrorCode::Fatal) => {
                tracing::error!(target: "librdkafka", error = %error, "{reason}: a new producer takes over");
                self.shared.set_fatal();
            }
            // Brokers down are expected here (that is what the spool is for).
            _ => tracing::debug!(target: "librdkafka", error = %error, "{reason}"),
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let seq = seq as u64;
        let answer = match result {
            Ok(message) => Answer::Delivered {
                partition: message.partition(),
                offset: message.offset(),
            },
            Err((error, _)) => {
                let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                let (name, message) = (error_name(code), error.to_string());
                if is_refusal(code) {
                    Answer::Rejected { name, message }
                } else {
                    Answer::GaveUp { name, message }
                }
            }
        };
        self.shared.answer(seq, answer);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter_outage(&self, why: &str) {
        let mut state = self.lock();
        self.enter_outage_locked(&mut state, why);
    }

    fn enter_outage_locked(&self, state: &mut State, why: &str) {
        if state.outage {
            return;
        }
        state.outage = true;
        self.stats.outages.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "{why}: outage mode, records are spooled and held until the cluster answers"
        );
        self.outage.send_replace(true);
        self.wake.notify_all();
    }

    fn set_fatal(&self) {
        let mut state = self.lock();
        state.fatal = true;
        self.wake.notify_all();
    }

    /// The cluster's answer for `seq` (from librdkafka's polling thread).
    fn answer(&self, seq: u64, answer: Answer) {
        let mut state = self.lock();
        let Some(mut entry) = state.in_flight.remove(&seq) else {
            return;
        };
        let answer = match answer {
            Answer::Delivered { .. } => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if entry.spooled {
                    self.mark_delivered(seq);
                }
                answer
            }
            Answer::Rejected {
                ref name,
                ref message,
            } => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                if entry.spooled {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        topic = %entry.record.topic, seq, error = %name,
                        "{message}: the cluster refused a spooled record; it is dropped"
                    );
                    self.mark_delivered(seq);
                }
                answer
            }
            Answer::GaveUp { name, message } => {
                // Not the record's fault: hold it (spooled) for the supervisor, which
                // queues it again into this producer or the one that replaces it.
                tracing::warn!(
                    topic = %entry.record.topic, seq, error = %name,
                    "{message}: the producer gave up on a record; it is held in the spool and sent again"
                );
                // Spooled with every earlier record not spooled yet (the spool's seqs
                // increase), and fsync'd before its request, if any, is answered.
                entry.queued = false;
                let waiter = entry.waiter.take();
                let needs_sync = waiter.is_some() || !entry.spooled;
                state.in_flight.insert(seq, entry);
                let spooled = self.spool_unspooled(&mut state).and_then(|_| {
                    if needs_sync {
                        self.spool.sync_blocking()
                    } else {
                        Ok(())
                    }
                });
                if let Err(err) = spooled {
                    let entry = state.in_flight.remove(&seq).expect("inserted above");
                    state.held_bytes -= entry.record.size();
                    if entry.spooled {
                        state.spooled_in_flight -= 1;
                    }
                    drop(state);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Answer::Failed(format!(
                            "the producer gave up on the record and the spool failed: {err}"
                        )));
                    }
                    return;
                }
                if !state.fatal {
                    // A purge or an error librdkafka does not retry: the probe decides
                    // when to send it again.
                    self.enter_outage_locked(&mut state, "the producer gave up on a record");
                }
                drop(state);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Answer::Spooled);
                }
                return;
            }
            other => other,
        };
        state.held_bytes -= entry.record.size();
        if entry.spooled {
            state.spooled_in_flight -= 1;
        }
        drop(state);
        if let Some(waiter) = entry.waiter {
            let _ = waiter.send(answer);
        }
    }

    fn mark_delivered(&self, seq: u64) {
        if let Err(err) = self.spool.delivered(seq) {
            tracing::error!(error = %err, "spool: cannot mark a record delivered; it will be sent again after a restart");
        }
    }

    /// Appends every in-flight record not spooled yet, in seq order, so the spool's
    /// seqs increase whoever spools first (a spill, a held record, a gave-up one).
    /// Their waiters stay: whoever fsyncs answers them. Returns the ticket covering
    /// everything appended so far.
    fn spool_unspooled(&self, state: &mut State) -> Result<u64, SpoolError> {
        let mut result = Ok(self.spool.written());
        let mut newly = 0;
        for (seq, entry) in state.in_flight.iter_mut() {
            if entry.spooled {
                continue;
            }
            result = self.spool.append(&Entry {
                seq: *seq,
                record: (*entry.record).clone(),
            });
            if result.is_err() {
                break;
            }
            entry.spooled = true;
            newly += 1;
        }
        state.spooled_in_flight += newly;
        self.stats.spooled.fetch_add(newly, Ordering::Relaxed);
        result
    }

    /// Spools every queued record that is not spooled yet, in queue order, fsyncs,
    /// and answers every request still waiting on a spooled record.
    async fn spill(&self) {
        let (ticket, waiters) = {
            let mut state = self.lock();
            let ticket = self.spool_unspooled(&mut state);
            let waiters: Vec<_> = state
                .in_flight
                .values_mut()
                .filter(|e| e.spooled)
                .filter_map(|e| e.waiter.take())
                .collect();
            (ticket, waiters)
        };
        let synced = match ticket {
            Ok(ticket) => self.spool.sync(ticket).await.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        for waiter in waiters {
            let _ = waiter.send(match &synced {
                Ok(()) => Answer::Spooled,
                Err(err) => Answer::Failed(err.clone()),
            });
        }
    }
}

impl Core {
    fn producer(&self) -> Arc<ThreadedProducer<Context>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues every held record, in seq order, into the current producer; those the
    /// reconciler names duplicates (only after an outage) are dropped from the spool.
    /// Called with the state lock held, so nothing is queued in between.
    fn release_held(&self, state: &mut State, reconciler: Option<&dyn Reconcile>) {
        let producer = self.producer();
        let shared = &self.shared;
        let held: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, e)| !e.queued)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in held {
            let entry = state.in_flight.get_mut(&seq).expect("listed above");
            let duplicate = reconciler.is_some_and(|r| r.is_duplicate(&entry.record));
            let outcome = if duplicate {
                Err(None)
            } else {
                enqueue(&producer, seq, &entry.record).map_err(Some)
            };
            match outcome {
                Ok(()) => entry.queued = true,
                Err(Some((RDKafkaErrorCode::Fatal, _))) => {
                    // The producer failed meanwhile: the rest stays held for the next.
                    state.fatal = true;
                    shared.wake.notify_all();
                    return;
                }
                Err(why) => {
                    let entry = state.in_flight.remove(&seq).expect("listed above");
                    match why {
                        None => {
                            shared.stats.reconciled.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(topic = %entry.record.topic, seq, "another gateway stored this request while the cluster was away: dropped from the spool");
                        }
                        Some((code, message)) => {
                            let name = error_name(code);
                            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(topic = %entry.record.topic, seq, error = %name, "{message}: a spooled record cannot be sent; it is dropped");
                        }
                    }
                    shared.mark_delivered(seq);
                    state.held_bytes -= entry.record.size();
                    state.spooled_in_flight -= 1;
                }
            }
        }
    }

    /// The supervisor: replaces the producer after a fatal error, and in outage mode
    /// probes the cluster, reconciles and sends the held records.
    fn supervise(self: Arc<Self>) {
        let shared = &self.shared;
        let mut answering_since: Option<Instant> = None;
        loop {
            let (outage, fatal) = {
                let mut state = shared.lock();
                while !state.holding() && !shared.stop.load(Ordering::Acquire) {
                    state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                (state.outage, state.fatal)
            };
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if fatal {
                self.replace_producer();
                continue;
            }
            if !outage {
                continue;
            }
            let started = Instant::now();
            let answers = self
                .producer()
                .client()
                .fetch_metadata(None, self.probe_interval)
                .is_ok();
            if !answers {
                answering_since = None;
                // Pacing only: a refused connection fails at once.
                self.sleep_unless_stopped(self.probe_interval.saturating_sub(started.elapsed()));
                continue;
            }
            let since = *answering_since.get_or_insert_with(Instant::now);
            let reconciler = self.reconciler.clone();
            let caught_up = reconciler
                .as_ref()
                .is_none_or(|r| r.catch_up(self.probe_interval.max(Duration::from_secs(1))));
            if !caught_up && since.elapsed() < self.reconcile_timeout {
                continue;
            }
            if !caught_up {
                tracing::warn!("the cluster answers but other gateways' answers could not be read; sending the held records without that check");
            }
            let mut state = shared.lock();
            if state.fatal {
                continue; // replace the producer first
            }
            self.release_held(&mut state, reconciler.as_deref());
            state.outage = false;
            shared.outage.send_replace(false);
            answering_since = None;
            tracing::info!("the cluster answers again: held records are queued, outage mode ends");
        }
    }

    /// After a fatal error: a new librdkafka producer takes over; the old one's
    /// undelivered records come back as "gave up" (held) and everything held is queued
    /// into the new one in seq order.
    fn replace_producer(&self) {
        let fresh = match ThreadedProducer::from_config_and_context(
            &self.client,
            Context {
                shared: self.shared.clone(),
            },
        ) {
            Ok(fresh) => Arc::new(fresh),
            Err(err) => {
                tracing::error!(error = %err, "cannot create a new producer; trying again");
                self.sleep_unless_stopped(self.probe_interval);
                return;
            }
        };
        let old = {
            let _state = self.shared.lock();
            std::mem::replace(
                &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                fresh,
            )
        };
        // Purge what it still holds and wait for the reports: each record's "gave up"
        // holds it, so by the end nothing of the old producer's is still queued.
        // (Another thread's metadata lookup may keep `old` alive a moment longer; it
        // sends nothing more.)
        old.purge(PurgeConfig::default().queue().inflight());
        if old.flush(OLD_PRODUCER_DRAIN).is_err() {
            tracing::warn!("the old producer did not report every record in time; those are sent again at the next start");
        }
        drop(old);
        let mut state = self.shared.lock();
        // Whatever is still marked queued belonged to the old producer and will be
        // reported by it; anything it already reported is held now.
        state.fatal = false;
        self.shared.stats.recoveries.fetch_add(1, Ordering::Relaxed);
        if !state.outage {
            // No reconciliation: these records were accepted with the cluster up, their
            // keys checked then.
            self.release_held(&mut state, None);
        }
        tracing::info!("a new producer took over after a fatal error");
    }

    fn sleep_unless_stopped(&self, total: Duration) {
        let state = self.shared.lock();
        let _unused = self
            .shared
            .wake
            .wait_timeout_while(state, total, |_| !self.shared.stop.load(Ordering::Acquire));
    }
}

impl DurableProducer {
    /// Opens the spool and creates the producer. What an earlier run left undelivered
    /// is held, so it is queued (reconciled) before anything new, once the cluster
    /// answers.
    pub fn open(config: &ProducerConfig) -> anyhow::Result<DurableProducer> {
        DurableProducer::open_with(config, None)
    }

    /// [`DurableProducer::open`] with what is asked before held records are sent
    /// after an outage (and before an earlier run's records are sent at start-up).
    pub fn open_with(
        config: &ProducerConfig,
        reconciler: Option<Arc<dyn Reconcile>>,
    ) -> anyhow::Result<DurableProducer> {
        let (spool, pending, recovery) =
            Spool::open(&config.spool_dir, config.spool_segment_bytes)?;
        if recovery.pending > 0 || recovery.truncated_bytes > 0 {
            tracing::info!(
                pending = recovery.pending,
                truncated_bytes = recovery.truncated_bytes,
                dir = %config.spool_dir.display(),
                "spool: replaying what an earlier run left undelivered"
            );
        }
        let next_seq = spool.next_seq();
        let mut in_flight = BTreeMap::new();
        let mut held_bytes = 0;
        for entry in pending {
            held_bytes += entry.record.size();
            in_flight.insert(
                entry.seq,
                InFlight {
                    record: Arc::new(entry.record),
                    spooled: true,
                    queued: false,
                    waiter: None,
                },
            );
        }
        let replayed = in_flight.len() as u64;
        let (outage, _) = watch::channel(replayed > 0);
        let shared = Arc::new(Shared {
            spool,
            state: Mutex::new(State {
                next_seq,
                held_bytes,
                spooled_in_flight: replayed,
                in_flight,
                outage: replayed > 0,
                fatal: false,
            }),
            wake: Condvar::new(),
            outage,
            stop: AtomicBool::new(false),
            max_bytes: config.spool_max_bytes,
            stats: ProducerStats::default(),
        });
        shared.stats.replayed.store(replayed, Ordering::Relaxed);
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // Retry forever: a record leaves librdkafka's queue only acknowledged or
            // refused for good; the spool covers a crash of this process meanwhile.
            .set("message.timeout.ms", "0")
            .set("queue.buffering.max.messages", "2147483647")
            .set(
                "queue.buffering.max.kbytes",
                (config.spool_max_bytes / 1024 + 1024)
                    .min(2_147_483_647)
                    .to_string(),
            )
            // Java clients' partitioner: the same key lands where Kafka tools expect it.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            // Notice a returning cluster within a quarter of a second (librdkafka's
            // default backs off up to 10 s): back to normal latency within 2 s of
            // its return. On loopback or a LAN four attempts a second cost nothing.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "250")
            // An unknown topic fails its records after this, rather than 30 s.
            .set("topic.metadata.propagation.max.ms", "1000")
            .set(
                "message.max.bytes",
                (config.max_record_bytes + 64 * 1024).to_string(),
            );
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        let producer: ThreadedProducer<Context> = ThreadedProducer::from_config_and_context(
            &client,
            Context {
                shared: shared.clone(),
            },
        )?;
        let core = Arc::new(Core {
            shared,
            current: RwLock::new(Arc::new(producer)),
            client,
            probe_interval: Duration::from_millis(config.outage_probe_interval_ms.max(100)),
            reconcile_timeout: Duration::from_millis(config.outage_reconcile_timeout_ms),
            reconciler,
        });
        let supervisor = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("spool-supervisor".into())
                .spawn(move || core.supervise())?
        };
        Ok(DurableProducer {
            core,
            spool_after: Duration::from_millis(config.spool_after_ms),
            topics: Mutex::new(HashMap::new()),
            last_lookup_failure: Mutex::new(None),
            supervisor: Some(supervisor),
        })
    }

    fn shared(&self) -> &Shared {
        &self.core.shared
    }

    /// Whether records are being held because the cluster is unreachable.
    pub fn in_outage(&self) -> bool {
        *self.core.shared.outage.borrow()
    }

    /// Makes `record` durable: acknowledged by the cluster, or spooled.
    pub async fn send(&self, record: Record) -> Result<Outcome, SendError> {
        self.submit(record)?.outcome().await
    }

    /// Queues `record` now (records are sent, and spooled, in the order they are
    /// submitted); the returned [`Pending`] says how it was made durable.
    pub fn submit(&self, record: Record) -> Result<Pending<'_>, SendError> {
        let record = Arc::new(record);
        let size = record.size();
        let shared = self.shared();
        let mut state = shared.lock();
        if state.held_bytes + size > shared.max_bytes {
            return Err(SendError::Full {
                held_bytes: state.held_bytes,
                max_bytes: shared.max_bytes,
            });
        }
        let seq = state.next_seq;
        let (tx, rx) = oneshot::channel();
        if !state.holding() {
            // Queue and spool under one lock: both see records in seq order.
            match enqueue(&self.core.producer(), seq, &record) {
                Ok(()) => {}
                // librdkafka's producer failed before its error event reached us: hold
                // the record for the producer that replaces it.
                Err((RDKafkaErrorCode::Fatal, _)) => {
                    state.fatal = true;
                    shared.wake.notify_all();
                }
                Err((code, message)) => {
                    return Err(SendError::Rejected {
                        name: error_name(code),
                        message,
                    })
                }
            }
        }
        if state.holding() {
            // Spool and hold: the supervisor queues it once the cluster answers (and,
            // after an outage, other gateways' answers are read). Records queued
            // before it and not spooled yet go to the spool first.
            shared.spool_unspooled(&mut state)?;
            let ticket = shared.spool.append(&Entry {
                seq,
                record: (*record).clone(),
            })?;
            state.next_seq += 1;
            state.held_bytes += size;
            state.spooled_in_flight += 1;
            shared.stats.spooled.fetch_add(1, Ordering::Relaxed);
            state.in_flight.insert(
                seq,
                InFlight {
                    record,
                    spooled: true,
                    queued: false,
                    waiter: None,
                },
            );
            return Ok(Pending {
                producer: self,
                waiter: rx,
                ticket: Some(ticket),
            });
        }
        state.next_seq += 1;
        let spool_now = state.spooled_in_flight > 0;
        state.held_bytes += size;
        state.in_flight.insert(
            seq,
            InFlight {
                record: record.clone(),
                spooled: false,
                queued: true,
                waiter: Some(tx),
            },
        );
        let ticket = if spool_now {
            // With every earlier record not spooled yet: the spool's seqs increase.
            let ticket = shared.spool_unspooled(&mut state)?;
            let entry = state.in_flight.get_mut(&seq).expect("inserted above");
            debug_assert!(entry.spooled);
            entry.waiter = None;
            Some(ticket)
        } else {
            None
        };
        Ok(Pending {
            producer: self,
            waiter: rx,
            ticket,
        })
    }

    /// The partition count of `topic`: `Ok(None)` if the cluster says it does not
    /// exist, `Err(())` if the cluster did not answer (the caller then accepts the
    /// record into the spool). A known topic answers from the cache at once and is
    /// looked up again in the background when stale.
    pub async fn partitions(self: &Arc<Self>, topic: &str) -> Result<Option<i32>, ()> {
        let cached = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied();
        if let Some(info) = cached {
            if info.checked.elapsed() > TOPIC_REFRESH {
                let this = self.clone();
                let topic = topic.to_string();
                // Mark it fresh now so only one refresh runs.
                self.remember(&topic, info.partitions);
                tokio::task::spawn_blocking(move || this.lookup(&topic));
            }
            return Ok(Some(info.partitions));
        }
        let this = self.clone();
        let topic = topic.to_string();
        let recently_failed = self
            .last_lookup_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < LOOKUP_BACKOFF);
        if recently_failed || self.in_outage() {
            // The cluster did not answer a moment ago: do not make every request wait
            // for it again; look in the background and accept into the spool now.
            tokio::task::spawn_blocking(move || this.lookup(&topic));
            return Err(());
        }
        tokio::task::spawn_blocking(move || this.lookup(&topic))
            .await
            .unwrap_or(Err(()))
    }

    fn lookup(&self, topic: &str) -> Result<Option<i32>, ()> {
        // No longer than a request would wait for an acknowledgement.
        let timeout = METADATA_TIMEOUT.min(self.spool_after);
        let metadata = match self
            .core
            .producer()
            .client()
            .fetch_metadata(Some(topic), timeout)
        {
            Ok(metadata) => metadata,
            Err(_) => {
                *self
                    .last_lookup_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                return Err(());
            }
        };
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None => {
                let partitions = found.partitions().len() as i32;
                self.remember(topic, partitions);
                Ok(Some(partitions))
            }
            Some(code) => match RDKafkaErrorCode::from(code) {
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                    self.topics
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(topic);
                    Ok(None)
                }
                _ => Err(()),
            },
        }
    }

    fn remember(&self, topic: &str, partitions: i32) {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                topic.to_string(),
                TopicInfo {
                    partitions,
                    checked: Instant::now(),
                },
            );
    }

    /// Waits up to `timeout` for the cluster to acknowledge what is queued, then
    /// spools whatever is still not acknowledged, so nothing queued is lost when the
    /// process exits.
    pub async fn shutdown(self: &Arc<Self>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Held records are not in librdkafka yet: give the supervisor the time to
        // queue them (the cluster may answer within it).
        while self.shared().lock().holding() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let producer = self.core.producer();
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::task::spawn_blocking(move || producer.flush(left)).await;
        self.shared().spill().await;
        let depth = self.shared().spool.depth();
        if depth.records > 0 {
            tracing::info!(
                records = depth.records,
                bytes = depth.bytes,
                "spool: kept for the next start"
            );
        }
    }

    /// The cluster's topics (or only `only`), without creating any. Blocking.
    pub fn topics_metadata(&self, only: Option<&str>) -> Result<Vec<TopicMetadata>, KafkaError> {
        Ok(self.cluster_metadata(only)?.1)
    }

    /// The cluster's brokers, (id, host, port), and its topics (or only `only`),
    /// from one metadata request that creates no topic. Blocking.
    pub fn cluster_metadata(
        &self,
        only: Option<&str>,
    ) -> Result<(Vec<BrokerAddress>, Vec<TopicMetadata>), KafkaError> {
        // All topics even for one: a producer's request for a named topic would
        // create it where the cluster auto-creates topics.
        let metadata = self
            .core
            .producer()
            .client()
            .fetch_metadata(None, METADATA_TIMEOUT)?;
        let brokers = metadata
            .brokers()
            .iter()
            .map(|b| (b.id(), b.host().to_string(), b.port()))
            .collect();
        let topics = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && only.is_none_or(|name| t.name() == name))
            .map(|t| TopicMetadata {
                name: t.name().to_string(),
                partitions: t
                    .partitions()
                    .iter()
                    .map(|p| (p.id(), p.leader(), p.replicas().to_vec(), p.isr().to_vec()))
                    .collect(),
            })
            .collect();
        Ok((brokers, topics))
    }

    /// The log start and end offsets of one partition (blocks for a round trip).
    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        self.core
            .producer()
            .client()
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
    }

    /// Whether the cluster answers a metadata request within `timeout` (blocks).
    pub fn cluster_answers(&self, timeout: Duration) -> bool {
        self.core
            .producer()
            .client()
            .fetch_metadata(None, timeout)
            .is_ok()
    }

    /// Why the spool takes no more records (a failed fsync), if it does not.
    pub fn spool_failure(&self) -> Option<String> {
        self.shared().spool.failure()
    }

    pub fn spool_depth(&self) -> Depth {
        self.shared().spool.depth()
    }

    pub fn stats(&self) -> &ProducerStats {
        &self.shared().stats
    }

    /// Bytes of records queued and not yet acknowledged.
    pub fn held_bytes(&self) -> u64 {
        self.shared().lock().held_bytes
    }

    /// Raises a fatal error in librdkafka's producer, as fencing would (tests).
    #[doc(hidden)]
    pub fn inject_fatal_error(&self) {
        let producer = self.core.producer();
        let reason = std::ffi::CString::new("injected by a test").expect("no NUL");
        // SAFETY: the pointer is the live producer's handle (kept alive by `producer`),
        // and the reason a NUL-terminated string that outlives the call.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            );
        }
    }
}

impl Drop for DurableProducer {
    fn drop(&mut self) {
        self.core.shared.stop.store(true, Ordering::Release);
        {
            let _state = self.core.shared.lock();
            self.core.shared.wake.notify_all();
        }
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
    }
}

/// Hands `record` to librdkafka. Called with the state lock held, so records are
/// queued in seq order (and spooled in the same order). An error is a refusal
/// before anything was queued (e.g. an unknown partition).
fn enqueue(
    producer: &ThreadedProducer<Context>,
    seq: u64,
    record: &Record,
) -> Result<(), (RDKafkaErrorCode, String)> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (name, value) in &record.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    let mut base = BaseRecord::<[u8], [u8], usize>::with_opaque_to(&record.topic, seq as usize)
        .headers(headers)
        .timestamp(record.timestamp_ms);
    if let Some(key) = &record.key {
        base = base.key(key.as_slice());
    }
    if let Some(value) = &record.value {
        base = base.payload(value.as_slice());
    }
    if let Some(partition) = record.partition {
        base = base.partition(partition);
    }
    producer.send(base).map_err(|(error, _)| {
        let code = match &error {
            KafkaError::MessageProduction(code) => *code,
            other => other.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
        };
        (code, error.to_string())
    })
}

/// Errors that are the record's own fault: sending it again cannot succeed.
fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidTimestamp
    )
}

/// A submitted record whose outcome is not known yet.
pub struct Pending<'a> {
    producer: &'a DurableProducer,
    waiter: oneshot::Receiver<Answer>,
    /// Set when the record was spooled at submission: its fsync ticket.
    ticket: Option<u64>,
}

impl Pending<'_> {
    /// Waits until the record is durable: acknowledged within `spool_after_ms`, or
    /// fsync'd in the spool.
    pub async fn outcome(self) -> Result<Outcome, SendError> {
        let shared = self.producer.shared();
        if let Some(ticket) = self.ticket {
            shared.spool.sync(ticket).await?;
            return Ok(Outcome::Spooled);
        }
        let mut waiter = self.waiter;
        let mut outage = shared.outage.subscribe();
        // Its `Ref` is not `Send`: dropped inside, so the future stays `Send`.
        let outage = async move {
            let _ = outage.wait_for(|outage| *outage).await;
        };
        let spool_after = tokio::time::sleep(self.producer.spool_after);
        let answer = tokio::select! {
            answer = &mut waiter => answer,
            _ = spool_after => {
                // The cluster is slow or away: keep the record, and everything queued
                // with it, in the spool; new records are held until it answers.
                shared.enter_outage("no acknowledgement within spool_after_ms");
                shared.spill().await;
                waiter.await
            }
            _ = outage => {
                // The cluster went away with the record queued: spool it now rather
                // than at `spool_after_ms`.
                shared.spill().await;
                waiter.await
            }
        };
        match answer {
            Ok(Answer::Delivered { partition, offset }) => {
                Ok(Outcome::Delivered { partition, offset })
            }
            Ok(Answer::Spooled) => Ok(Outcome::Spooled),
            Ok(Answer::Rejected { name, message }) => Err(SendError::Rejected { name, message }),
            Ok(Answer::Failed(why)) => Err(SendError::Storage(why)),
            Ok(Answer::GaveUp { .. }) => unreachable!("turned into Spooled or Failed by `answer`"),
            // Only when the producer itself is dropped with the record queued.
            Err(_) => Err(SendError::Storage("the producer closed".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    //! `DurableProducer`'s state transitions against librdkafka's in-process mock
    //! cluster: delivered, spooled and held in an outage, reconciled, replayed by a
    //! new process, and a fatal error (fencing) recovered without a restart.

    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;

    const TOPIC: &str = "t";

    fn config(brokers: &str, dir: &std::path::Path) -> ProducerConfig {
        ProducerConfig {
            brokers: brokers.to_string(),
            spool_dir: dir.to_path_buf(),
            spool_max_bytes: 16 << 20,
            spool_segment_bytes: 1 << 20,
            // The mock cluster's first answer takes about 300 ms.
            spool_after_ms: 2000,
            max_record_bytes: 1 << 20,
            outage_probe_interval_ms: 100,
            outage_reconcile_timeout_ms: 2000,
            kafka: Vec::new(),
        }
    }

    fn record(value: &str) -> Record {
        Record {
            topic: TOPIC.into(),
            partition: Some(0),
            key: None,
            value: Some(value.as_bytes().to_vec()),
            headers: Vec::new(),
            timestamp_ms: 1_700_000_000_000,
        }
    }

    /// A one-broker mock cluster with the test topic, its bootstrap address, a spool
    /// directory and a runtime: what every test here starts from.
    fn cluster() -> (
        MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        String,
        tempfile::TempDir,
        tokio::runtime::Runtime,
    ) {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic(TOPIC, 1, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        (mock, brokers, tempfile::tempdir().unwrap(), runtime())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Polls `condition` until it holds (fails after 20 s).
    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn drained(p: &DurableProducer) -> bool {
        p.spool_depth().records == 0 && p.held_bytes() == 0 && !p.in_outage()
    }

    /// Every value stored in the topic's partition 0, in offset order.
    fn stored(brokers: &str) -> Vec<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (_, high) = consumer
            .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(TOPIC, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let mut values = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while (values.len() as i64) < high {
            assert!(Instant::now() < deadline, "read {values:?} of {high}");
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                values.push(String::from_utf8(message.payload().unwrap().to_vec()).unwrap());
            }
        }
        values
    }

    fn open(brokers: &str, dir: &std::path::Path) -> DurableProducer {
        DurableProducer::open(&config(brokers, dir)).unwrap()
    }

    #[test]
    fn delivered_then_spooled_and_held_in_an_outage_then_delivered_once() {
        let (mock, brokers, dir, rt) = cluster();
        let p = open(&brokers, dir.path());
        let first = rt.block_on(p.send(record("0"))).unwrap();
        assert_eq!(
            first,
            Outcome::Delivered {
                partition: 0,
                offset: 0
            }
        );
        assert!(!p.in_outage());
        mock.broker_down(-1).unwrap();
        // librdkafka reports every broker down: outage mode without waiting for a
        // record to time out.
        wait_until("outage mode", || p.in_outage());
        for i in 1..4 {
            let started = Instant::now();
            assert_eq!(
                rt.block_on(p.send(record(&i.to_string()))).unwrap(),
                Outcome::Spooled
            );
            assert!(
                started.elapsed() < p.spool_after,
                "held at once, not after spool_after_ms: {:?}",
                started.elapsed()
            );
        }
        assert_eq!(p.spool_depth().records, 3);
        {
            let state = p.shared().lock();
            assert!(
                state.in_flight.values().all(|e| e.spooled && !e.queued),
                "held, not queued"
            );
        }
        mock.broker_up(-1).unwrap();
        wait_until("the spool to drain", || drained(&p));
        assert_eq!(p.stats().delivered.load(Ordering::Relaxed), 4);
        assert_eq!(p.stats().spooled.load(Ordering::Relaxed), 3);
        assert!(p.stats().outages.load(Ordering::Relaxed) >= 1);
        // Normal again: delivered, not spooled.
        assert!(matches!(
            rt.block_on(p.send(record("4"))).unwrap(),
            Outcome::Delivered { offset: 4, .. }
        ));
        assert_eq!(stored(&brokers), ["0", "1", "2", "3", "4"]);
    }

    #[test]
    fn records_queued_when_an_outage_begins_are_spooled_before_the_held_ones() {
        let (mock, brokers, dir, rt) = cluster();
        let p = open(&brokers, dir.path());
        rt.block_on(p.send(record("0"))).unwrap();
        // "a" is queued and unacknowledged when the cluster goes away.
        mock.broker_round_trip_time(1, Duration::from_millis(1000))
            .unwrap();
        let a = p.submit(record("a")).unwrap();
        mock.broker_down(-1).unwrap();
        wait_until("outage mode", || p.in_outage());
        // Held: "a" goes to the spool first, so the spool's seqs still increase.
        let b = p.submit(record("b")).unwrap();
        assert_eq!(rt.block_on(b.outcome()).unwrap(), Outcome::Spooled);
        assert_eq!(rt.block_on(a.outcome()).unwrap(), Outcome::Spooled);
        assert_eq!(p.spool_depth().records, 2);
        mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
        mock.broker_up(-1).unwrap();
        wait_until("the spool to drain", || drained(&p));
        assert_eq!(stored(&brokers), ["0", "a", "b"]);
    }

    struct DropValue {
        catch_ups: AtomicU64,
    }

    impl Reconcile for DropValue {
        fn catch_up(&self, _timeout: Duration) -> bool {
            self.catch_ups.fetch_add(1, Ordering::Relaxed);
            true
        }
        fn is_duplicate(&self, record: &Record) -> bool {
            record.value.as_deref() == Some(b"dup")
        }
    }

    #[test]
    fn held_records_a_reconciler_names_duplicates_are_dropped_from_the_spool() {
        let (mock, brokers, dir, rt) = cluster();
        let reconciler = Arc::new(DropValue {
            catch_ups: AtomicU64::new(0),
        });
        let p = DurableProducer::open_with(&config(&brokers, dir.path()), Some(reconciler.clone()))
            .unwrap();
        rt.block_on(p.send(record("0"))).unwrap();
        mock.broker_down(-1).unwrap();
        wait_until("outage mode", || p.in_outage());
        for value in ["keep1", "dup", "keep2"] {
            assert_eq!(
                rt.block_on(p.send(record(value))).unwrap(),
                Outcome::Spooled
            );
        }
        assert_eq!(reconciler.catch_ups.load(Ordering::Relaxed), 0);
        mock.broker_up(-1).unwrap();
        wait_until("the spool to drain", || drained(&p));
        assert!(reconciler.catch_ups.load(Ordering::Relaxed) >= 1);
        assert_eq!(p.stats().reconciled.load(Ordering::Relaxed), 1);
        assert_eq!(stored(&brokers), ["0", "keep1", "keep2"]);
        // Nothing is left for a restart to send again.
        drop(p);
        let (_, pending, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(pending.is_empty(), "{pending:?}");
    }

    #[test]
    fn what_a_dead_process_spooled_is_replayed_first_by_the_next() {
        let (mock, brokers, dir, rt) = cluster();
        mock.broker_down(-1).unwrap();
        {
            let p = open(&brokers, dir.path());
            for i in 0..3 {
                assert_eq!(
                    rt.block_on(p.send(record(&i.to_string()))).unwrap(),
                    Outcome::Spooled
                );
            }
            // Dropped without a shutdown, with the cluster away.
        }
        let p = open(&brokers, dir.path());
        assert_eq!(p.stats().replayed.load(Ordering::Relaxed), 3);
        assert!(
            p.in_outage(),
            "replayed entries are held until the cluster answers"
        );
        // A record accepted now comes after them.
        assert_eq!(rt.block_on(p.send(record("3"))).unwrap(), Outcome::Spooled);
        mock.broker_up(-1).unwrap();
        wait_until("the spool to drain", || drained(&p));
        assert_eq!(stored(&brokers), ["0", "1", "2", "3"]);
    }

    #[test]
    fn a_fatal_producer_error_is_recovered_in_process() {
        let (_mock, brokers, dir, rt) = cluster();
        let p = open(&brokers, dir.path());
        rt.block_on(p.send(record("0"))).unwrap();
        // As if another producer had fenced this one.
        p.inject_fatal_error();
        // Accepted whether the new producer has taken over yet or not.
        let outcome = rt.block_on(p.send(record("1"))).unwrap();
        assert!(
            matches!(outcome, Outcome::Spooled | Outcome::Delivered { .. }),
            "{outcome:?}"
        );
        wait_until("a new producer", || {
            p.stats().recoveries.load(Ordering::Relaxed) == 1
        });
        // The held record goes out through the new producer; then records are
        // delivered again, not spooled.
        wait_until("the spool to drain", || drained(&p));
        assert!(matches!(
            rt.block_on(p.send(record("2"))).unwrap(),
            Outcome::Delivered { .. }
        ));
        assert_eq!(stored(&brokers), ["0", "1", "2"]);
    }
}
