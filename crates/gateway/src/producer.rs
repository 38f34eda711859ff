//! The one way records leave the gateway: [`DurableProducer`], an idempotent
//! librdkafka producer with acks=all in front of the [`Spool`].
//!
//! `send` answers `Delivered` when the cluster acknowledged the record within
//! `spool_after_ms`, and `Spooled` once the record is fsync'd in the spool otherwise;
//! either way the record is durable and the caller may answer `2xx`. A spooled record
//! stays in librdkafka's queue too: librdkafka keeps retrying it (the message timeout
//! is infinite) with the same producer id and sequence numbers, so the cluster stores
//! it once and in order per partition, and its spool entry is marked done when the
//! acknowledgement comes. While anything spooled is undelivered, new records are
//! spooled before they are queued, so the spool holds them in the order they were
//! queued. At start-up the entries of an earlier run that were never marked done are
//! queued first, in spool order, before any new request.
//!
//! Memory and disk are bounded by `spool_max_bytes`: the bytes of every record
//! queued and not yet acknowledged, spooled or not. Beyond it `send` answers
//! [`SendError::Full`] and nothing is queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use tokio::sync::oneshot;

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
}

pub struct DurableProducer {
    producer: ThreadedProducer<Context>,
    shared: Arc<Shared>,
    spool_after: Duration,
    topics: Mutex<HashMap<String, TopicInfo>>,
    last_lookup_failure: Mutex<Option<Instant>>,
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

struct Shared {
    spool: Spool,
    state: Mutex<State>,
    max_bytes: u64,
    stats: ProducerStats,
}

struct State {
    next_seq: u64,
    /// Every record queued in librdkafka and not yet answered, by seq.
    in_flight: BTreeMap<u64, InFlight>,
    held_bytes: u64,
    /// How many of `in_flight` are spooled; while non-zero, new records are spooled
    /// before they are queued.
    spooled_in_flight: u64,
}

struct InFlight {
    /// Kept until the answer, to be spooled if the cluster is slow.
    record: Arc<Record>,
    spooled: bool,
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
    /// producer error, a purge at shutdown): it stays (or is put) in the spool.
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
        // Brokers down are expected here (that is what the spool is for): debug only.
        tracing::debug!(target: "librdkafka", error = %error, "{reason}");
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

    /// The cluster's answer for `seq` (from librdkafka's polling thread).
    fn answer(&self, seq: u64, answer: Answer) {
        let mut state = self.lock();
        let Some(entry) = state.in_flight.remove(&seq) else {
            return;
        };
        state.held_bytes -= entry.record.size();
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
                // Not the record's fault: keep it for the next start.
                tracing::error!(
                    topic = %entry.record.topic, seq, error = %name,
                    "{message}: the producer gave up on a record; it is kept in the spool and sent again at the next start"
                );
                if entry.spooled {
                    Answer::Spooled
                } else {
                    match self.spool.append(&Entry {
                        seq,
                        record: (*entry.record).clone(),
                    }) {
                        Ok(_) => match self.spool.sync_blocking() {
                            Ok(()) => Answer::Spooled,
                            Err(err) => Answer::Failed(err.to_string()),
                        },
                        Err(err) => Answer::Failed(err.to_string()),
                    }
                }
            }
            other => other,
        };
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

    /// Spools every queued record that is not spooled yet, in queue order, fsyncs,
    /// and answers their waiting requests.
    async fn spill(&self) {
        let (ticket, waiters) = {
            let mut state = self.lock();
            let mut ticket = Ok(0);
            let mut waiters = Vec::new();
            let mut newly = 0;
            for (seq, entry) in state.in_flight.iter_mut() {
                if entry.spooled {
                    continue;
                }
                ticket = self.spool.append(&Entry {
                    seq: *seq,
                    record: (*entry.record).clone(),
                });
                if ticket.is_err() {
                    break;
                }
                entry.spooled = true;
                newly += 1;
                waiters.extend(entry.waiter.take());
            }
            state.spooled_in_flight += newly;
            self.stats.spooled.fetch_add(newly, Ordering::Relaxed);
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

impl DurableProducer {
    /// Opens the spool, creates the producer and queues what an earlier run left
    /// undelivered, before anything new.
    pub fn open(config: &ProducerConfig) -> anyhow::Result<DurableProducer> {
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
        let shared = Arc::new(Shared {
            spool,
            state: Mutex::new(State {
                next_seq,
                in_flight: BTreeMap::new(),
                held_bytes: 0,
                spooled_in_flight: 0,
            }),
            max_bytes: config.spool_max_bytes,
            stats: ProducerStats::default(),
        });
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
            // Notice a returning cluster within a second, not librdkafka's 10 s.
            .set("reconnect.backoff.max.ms", "1000")
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
        let this = DurableProducer {
            producer,
            shared,
            spool_after: Duration::from_millis(config.spool_after_ms),
            topics: Mutex::new(HashMap::new()),
            last_lookup_failure: Mutex::new(None),
        };
        for entry in pending {
            let record = Arc::new(entry.record);
            let mut state = this.shared.lock();
            match this.enqueue(entry.seq, &record) {
                Ok(()) => {
                    this.shared.stats.replayed.fetch_add(1, Ordering::Relaxed);
                    state.held_bytes += record.size();
                    state.spooled_in_flight += 1;
                    state.in_flight.insert(
                        entry.seq,
                        InFlight {
                            record,
                            spooled: true,
                            waiter: None,
                        },
                    );
                }
                Err((name, message)) => {
                    this.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic = %record.topic, seq = entry.seq, error = %name, "{message}: a spooled record cannot be sent; it is dropped");
                    this.shared.mark_delivered(entry.seq);
                }
            }
        }
        Ok(this)
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
        let mut state = self.shared.lock();
        if state.held_bytes + size > self.shared.max_bytes {
            return Err(SendError::Full {
                held_bytes: state.held_bytes,
                max_bytes: self.shared.max_bytes,
            });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        // Queue and spool under one lock: both see records in seq order.
        self.enqueue(seq, &record)
            .map_err(|(name, message)| SendError::Rejected { name, message })?;
        let spool_now = state.spooled_in_flight > 0;
        let (tx, rx) = oneshot::channel();
        state.held_bytes += size;
        state.in_flight.insert(
            seq,
            InFlight {
                record: record.clone(),
                spooled: false,
                waiter: Some(tx),
            },
        );
        let ticket = if spool_now {
            let ticket = self.shared.spool.append(&Entry {
                seq,
                record: (*record).clone(),
            })?;
            let entry = state.in_flight.get_mut(&seq).expect("inserted above");
            entry.spooled = true;
            entry.waiter = None;
            state.spooled_in_flight += 1;
            self.shared.stats.spooled.fetch_add(1, Ordering::Relaxed);
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

    /// Hands `record` to librdkafka. Called with the state lock held, so records are
    /// queued in seq order (and spooled in the same order). An error is a refusal
    /// before anything was queued (e.g. an unknown partition).
    fn enqueue(&self, seq: u64, record: &Record) -> Result<(), (String, String)> {
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
        self.producer.send(base).map_err(|(error, _)| {
            let code = match &error {
                KafkaError::MessageProduction(code) => *code,
                other => other.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
            };
            (error_name(code), error.to_string())
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
        if recently_failed {
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
        let metadata = match self.producer.client().fetch_metadata(Some(topic), timeout) {
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
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.producer.flush(timeout)).await;
        self.shared.spill().await;
        let depth = self.shared.spool.depth();
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
        // All topics even for one: a producer's request for a named topic would
        // create it where the cluster auto-creates topics.
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, METADATA_TIMEOUT)?;
        Ok(metadata
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
            .collect())
    }

    /// Whether the cluster answers a metadata request within `timeout` (blocks).
    pub fn cluster_answers(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(None, timeout).is_ok()
    }

    pub fn spool_depth(&self) -> Depth {
        self.shared.spool.depth()
    }

    pub fn stats(&self) -> &ProducerStats {
        &self.shared.stats
    }

    /// Bytes of records queued and not yet acknowledged.
    pub fn held_bytes(&self) -> u64 {
        self.shared.lock().held_bytes
    }
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
        let shared = &self.producer.shared;
        if let Some(ticket) = self.ticket {
            shared.spool.sync(ticket).await?;
            return Ok(Outcome::Spooled);
        }
        let mut waiter = self.waiter;
        let answer = match tokio::time::timeout(self.producer.spool_after, &mut waiter).await {
            Ok(answer) => answer,
            Err(_) => {
                // The cluster is slow or away: keep the record, and everything queued
                // with it, in the spool.
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

/// `UnknownTopicOrPartition` -> `UNKNOWN_TOPIC_OR_PARTITION`.
pub fn error_name(code: RDKafkaErrorCode) -> String {
    let debug = format!("{code:?}");
    let mut name = String::with_capacity(debug.len() + 8);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}
