//! `GET /topics/{topic}/stream?from=latest|earliest|OFFSET[&partition=N][&format=json|binary]`:
//! a topic's records as Server-Sent Events, for a poll's author or a dashboard.
//!
//! Every subscriber of a topic is served from one shared reader (one librdkafka
//! consumer for all of the topic's partitions, in its own thread) that keeps the
//! last `stream_buffer_records` records of each partition in memory: a thousand
//! subscribers at the tail cost one read of each partition. A subscriber that starts
//! (or resumes) before what the buffer holds reads privately until it reaches the
//! buffer, then joins it; records are never skipped or repeated in the switch.
//!
//! Each event's `id` lists, per partition, the next offset the subscriber will get
//! (`0:16,1:5`), so a reconnecting client's `Last-Event-ID` resumes exactly where it
//! left off. The first event carries only an `id` (no data: browsers do not dispatch
//! it), so a client that reconnects before any record arrived resumes at the same
//! place too. A shared reader with no subscriber for a while stops; its partition
//! list is read when it starts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::ingest::check_topic_name;
use crate::rest_proxy::{base64_encode, Embedded};
use crate::Gateway;

/// A shared reader stops after this long without subscribers.
const READER_IDLE: Duration = Duration::from_secs(30);
/// Events handed to one subscriber per wake-up, so one subscriber far behind does not
/// hold the hub's lock for long.
const EVENTS_PER_TURN: usize = 1000;
/// Records a private catch-up reader may have in flight to its subscriber.
const CATCH_UP_QUEUE: usize = 1024;
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new().route("/topics/{topic}/stream", get(subscribe))
}

/// The shared readers, one per topic with subscribers.
pub struct Streams {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    subscribers: Arc<AtomicUsize>,
    max_subscribers: usize,
    buffer_records: usize,
    client: ClientConfig,
}

impl Streams {
    pub fn new(config: &GatewayConfig) -> Streams {
        let mut client = config.client();
        client
            // librdkafka needs a group id to assign partitions; nothing is committed.
            .set("group.id", "freshet-gateway-stream")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100")
            .set("fetch.queue.backoff.ms", "10")
            .set("reconnect.backoff.max.ms", "1000");
        Streams {
            hubs: Mutex::new(HashMap::new()),
            subscribers: Arc::new(AtomicUsize::new(0)),
            max_subscribers: config.stream_max_subscribers,
            buffer_records: config.stream_buffer_records,
            client,
        }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    pub fn readers(&self) -> usize {
        self.lock()
            .values()
            .filter(|h| h.subscribers.load(Ordering::Relaxed) != CLOSED)
            .count()
    }

    pub fn stop_all(&self) {
        for hub in self.lock().drain().map(|(_, hub)| hub) {
            hub.stop.store(true, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Hub>>> {
        self.hubs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the topic's hub (counted as one of its subscribers), starting one if
    /// there is none or the one there is closing.
    fn join(&self, topic: &str) -> Result<Arc<Hub>, ApiError> {
        let mut hubs = self.lock();
        hubs.retain(|_, hub| hub.subscribers.load(Ordering::Acquire) != CLOSED);
        if let Some(hub) = hubs.get(topic) {
            if hub.try_join() {
                return Ok(hub.clone());
            }
        }
        let consumer: BaseConsumer = self
            .client
            .create()
            .map_err(|e| ApiError::busy(format!("cannot create a reader: {e}")))?;
        let (changed, _) = watch::channel(0u64);
        let hub = Arc::new(Hub {
            topic: topic.to_string(),
            state: Mutex::new(HubState::default()),
            changed,
            subscribers: AtomicUsize::new(1),
            stop: AtomicBool::new(false),
            buffer_records: self.buffer_records,
        });
        let reader = hub.clone();
        std::thread::Builder::new()
            .name(format!("stream-{topic}"))
            .spawn(move || reader.run(consumer))
            .map_err(|e| ApiError::busy(format!("cannot start a reader: {e}")))?;
        hubs.insert(topic.to_string(), hub.clone());
        Ok(hub)
    }
}

/// One record as every subscriber gets it; the data line is rendered once per format.
struct Record {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    json: OnceLock<String>,
    binary: OnceLock<String>,
}

impl Record {
    fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
            json: OnceLock::new(),
            binary: OnceLock::new(),
        }
    }

    fn data(&self, topic: &str, format: Embedded) -> &str {
        let cell = match format {
            Embedded::Json => &self.json,
            Embedded::Binary => &self.binary,
        };
        cell.get_or_init(|| {
            let headers: serde_json::Map<String, Value> = self
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = match (format, v) {
                        (_, None) => Value::Null,
                        (Embedded::Json, Some(v)) => {
                            Value::String(String::from_utf8_lossy(v).into_owned())
                        }
                        (Embedded::Binary, Some(v)) => Value::String(base64_encode(v)),
                    };
                    (k.clone(), v)
                })
                .collect();
            json!({
                "topic": topic,
                "partition": self.partition,
                "offset": self.offset,
                "timestamp": self.timestamp,
                "key": format.encode(self.key.as_deref()),
                "value": format.encode(self.value.as_deref()),
                "headers": headers,
            })
            .to_string()
        })
    }
}

#[derive(Default)]
struct HubState {
    /// `None` until the reader knows the topic's partitions and where it starts.
    partitions: Option<Vec<Buffer>>,
    /// Why the reader cannot start (unknown topic), for subscribers waiting on it.
    error: Option<String>,
}

/// What the shared reader holds of one partition: every record in
/// `[covered_from, next)` is in `ring`, in offset order.
struct Buffer {
    ring: VecDeque<Arc<Record>>,
    covered_from: i64,
    next: i64,
}

impl Buffer {
    /// Records from `pos` on (at most `limit`), if the buffer covers `pos`.
    fn since(&self, pos: i64, limit: usize, out: &mut Vec<Arc<Record>>) -> bool {
        if pos < self.covered_from {
            return false;
        }
        let start = self.ring.partition_point(|r| r.offset < pos);
        out.extend(self.ring.iter().skip(start).take(limit).cloned());
        true
    }
}

struct Hub {
    topic: String,
    state: Mutex<HubState>,
    /// Bumped whenever records arrive or the state changes.
    changed: watch::Sender<u64>,
    /// Subscribers; `CLOSED` once the reader has decided to stop, after which nobody
    /// can join and a new hub is started instead.
    subscribers: AtomicUsize,
    stop: AtomicBool,
    buffer_records: usize,
}

const CLOSED: usize = usize::MAX;

impl Hub {
    fn try_join(&self) -> bool {
        self.subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != CLOSED).then_some(n + 1)
            })
            .is_ok()
    }

    /// Closes the hub if nobody is subscribed.
    fn try_close(&self) -> bool {
        self.subscribers
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The reader thread: find the partitions and their ends, then follow them.
    fn run(self: Arc<Self>, consumer: BaseConsumer) {
        let mut idle_since = Instant::now();
        let mut started = false;
        while !self.stop.load(Ordering::Relaxed) {
            if self.subscribers.load(Ordering::Relaxed) > 0 {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > READER_IDLE && self.try_close() {
                break;
            }
            if !started {
                match self.start(&consumer) {
                    Ok(()) => started = true,
                    Err(Some(why)) => {
                        self.lock().error = Some(why);
                        break;
                    }
                    Err(None) => std::thread::sleep(Duration::from_millis(500)),
                }
                continue;
            }
            let Some(first) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(result) = next {
                if let Ok(message) = result {
                    batch.push(Arc::new(Record::from_message(&message)));
                }
                if batch.len() >= EVENTS_PER_TURN {
                    break;
                }
                next = consumer.poll(Duration::ZERO);
            }
            if batch.is_empty() {
                continue;
            }
            {
                let mut state = self.lock();
                let Some(buffers) = state.partitions.as_mut() else {
                    continue;
                };
                for record in batch {
                    let Some(buffer) = buffers.get_mut(record.partition as usize) else {
                        continue;
                    };
                    if record.offset < buffer.next {
                        continue; // a re-fetch after a reconnect
                    }
                    buffer.next = record.offset + 1;
                    buffer.ring.push_back(record);
                    while buffer.ring.len() > self.buffer_records {
                        let evicted = buffer.ring.pop_front().expect("longer than the limit");
                        buffer.covered_from = evicted.offset + 1;
                    }
                }
            }
            self.bump();
        }
        // Stopped for good: nobody joins any more; whoever is still subscribed ends.
        self.subscribers.store(CLOSED, Ordering::Release);
        self.lock()
            .error
            .get_or_insert_with(|| "the stream reader stopped".into());
        self.bump();
    }

    /// Assigns every partition at its current end. `Err(Some)`: the topic does not
    /// exist; `Err(None)`: the cluster did not answer, try again.
    fn start(&self, consumer: &BaseConsumer) -> Result<(), Option<String>> {
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), METADATA_TIMEOUT)
            .map_err(|_| None)?;
        let Some(topic) = metadata.topics().iter().find(|t| t.name() == self.topic) else {
            return Err(None);
        };
        if topic.error().is_some() || topic.partitions().is_empty() {
            return Err(Some(format!("Topic '{}' not found.", self.topic)));
        }
        let count = topic.partitions().len() as i32;
        let mut assignment = TopicPartitionList::new();
        let mut buffers = Vec::with_capacity(count as usize);
        for p in 0..count {
            let (_, high) = consumer
                .fetch_watermarks(&self.topic, p, METADATA_TIMEOUT)
                .map_err(|_| None)?;
            assignment
                .add_partition_offset(&self.topic, p, Offset::Offset(high))
                .map_err(|_| None)?;
            buffers.push(Buffer {
                ring: VecDeque::new(),
                covered_from: high,
                next: high,
            });
        }
        consumer.assign(&assignment).map_err(|_| None)?;
        self.lock().partitions = Some(buffers);
        self.bump();
        Ok(())
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    from: Option<String>,
    partition: Option<i32>,
    format: Option<String>,
}

async fn subscribe(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    match open(&gateway, topic, query, &headers).await {
        Ok(sse) => sse.into_response(),
        Err(err) => err.into_response(),
    }
}

/// Where a subscriber starts in each partition, before it is resolved to offsets.
enum From {
    Latest,
    Earliest,
    Offset(i64),
}

async fn open(
    gateway: &Arc<Gateway>,
    topic: String,
    query: StreamQuery,
    headers: &HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    check_topic_name(&topic)?;
    let format = match query.format.as_deref() {
        None | Some("json") => Embedded::Json,
        Some("binary") => Embedded::Binary,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format must be json or binary, not '{other}'"
            )))
        }
    };
    let from = match query.from.as_deref() {
        None | Some("latest") => From::Latest,
        Some("earliest") => From::Earliest,
        Some(n) => match n.parse::<i64>() {
            Ok(n) if n >= 0 => From::Offset(n),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "from must be latest, earliest or an offset, not '{n}'"
                )))
            }
        },
    };
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(parse_event_id)
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must look like 0:16,1:5"))?,
        ),
    };
    let streams = &gateway.streams;
    let guard = SubscriberGuard::new(streams.subscribers.clone(), streams.max_subscribers)
        .ok_or_else(|| ApiError::busy("too many stream subscribers"))?;
    let hub = streams.join(&topic)?;
    let hub_guard = HubGuard(hub.clone());
    // Wait for the reader to know the partitions.
    let mut changed = hub.changed.subscribe();
    let ends = loop {
        {
            let state = hub.lock();
            if let Some(buffers) = &state.partitions {
                break buffers.iter().map(|b| b.next).collect::<Vec<i64>>();
            }
            if let Some(err) = &state.error {
                return Err(ApiError::not_found(1, err.clone()));
            }
        }
        let wait = tokio::time::timeout(METADATA_TIMEOUT * 2, changed.changed());
        match wait.await {
            Ok(Ok(())) => {}
            _ => return Err(ApiError::busy("the cluster did not answer")),
        }
    };
    let wanted: Vec<i32> = match query.partition {
        Some(p) if p < 0 || p as usize >= ends.len() => {
            return Err(ApiError::partition_not_found(&topic, p))
        }
        Some(p) => vec![p],
        None => (0..ends.len() as i32).collect(),
    };
    let mut positions = BTreeMap::new();
    let earliest = if matches!(from, From::Earliest) {
        Some(low_watermarks(streams, &topic, &wanted).await?)
    } else {
        None
    };
    for &p in &wanted {
        let pos = match (&resume, &from) {
            (Some(resume), _) if resume.contains_key(&p) => resume[&p],
            (_, From::Latest) => ends[p as usize],
            (_, From::Earliest) => earliest.as_ref().expect("resolved above")[&p],
            (_, From::Offset(n)) => *n,
        };
        positions.insert(p, pos);
    }
    let subscriber = Subscriber {
        topic,
        format,
        hub,
        changed,
        positions,
        catch_up: None,
        client: streams.client.clone(),
        pending: VecDeque::new(),
        announced: false,
        shutting_down: gateway.shutting_down.clone(),
        _guards: (guard, hub_guard),
    };
    let events = stream::unfold(subscriber, |mut s| async move {
        s.next_event().await.map(|e| (Ok(e), s))
    });
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new().interval(Duration::from_millis(gateway.config.stream_keepalive_ms)),
    ))
}

async fn low_watermarks(
    streams: &Streams,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, ApiError> {
    let client = streams.client.clone();
    let topic = topic.to_string();
    let partitions = partitions.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create().map_err(|e| e.to_string())?;
        partitions
            .into_iter()
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
                    .map(|(low, _)| (p, low))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<HashMap<_, _>, String>>()
    })
    .await
    .map_err(|e| ApiError::busy(e.to_string()))?
    .map_err(|e| ApiError::busy(format!("cluster unavailable: {e}")))
}

/// `0:16,1:5` -> {0: 16, 1: 5}.
fn parse_event_id(text: &str) -> Option<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (p, o) = part.split_once(':')?;
        let (p, o) = (p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?);
        if p < 0 || o < 0 {
            return None;
        }
        out.insert(p, o);
    }
    Some(out)
}

fn event_id(positions: &BTreeMap<i32, i64>) -> String {
    let mut id = String::with_capacity(positions.len() * 8);
    for (i, (p, o)) in positions.iter().enumerate() {
        if i > 0 {
            id.push(',');
        }
        id.push_str(&format!("{p}:{o}"));
    }
    id
}

struct Subscriber {
    topic: String,
    format: Embedded,
    hub: Arc<Hub>,
    changed: watch::Receiver<u64>,
    /// Next offset to send, per partition.
    positions: BTreeMap<i32, i64>,
    /// Records of partitions behind the shared buffer, from a private reader.
    catch_up: Option<mpsc::Receiver<Arc<Record>>>,
    client: ClientConfig,
    pending: VecDeque<Arc<Record>>,
    announced: bool,
    shutting_down: watch::Receiver<bool>,
    _guards: (SubscriberGuard, HubGuard),
}

impl Subscriber {
    /// The next event to send; `None` ends the stream.
    async fn next_event(&mut self) -> Option<Event> {
        if !self.announced {
            self.announced = true;
            return Some(Event::default().id(event_id(&self.positions)));
        }
        loop {
            if *self.shutting_down.borrow() {
                return None;
            }
            while let Some(record) = self.pending.pop_front() {
                let Some(pos) = self.positions.get_mut(&record.partition) else {
                    continue;
                };
                if record.offset < *pos {
                    continue; // already sent (from the other source)
                }
                *pos = record.offset + 1;
                let data = record.data(&self.topic, self.format).to_string();
                return Some(Event::default().id(event_id(&self.positions)).data(data));
            }
            if let Some(rx) = &mut self.catch_up {
                while let Ok(record) = rx.try_recv() {
                    self.pending.push_back(record);
                }
                if !self.pending.is_empty() {
                    continue;
                }
            }
            // What the shared buffer has for us; partitions it does not cover need a
            // private reader.
            let mut behind = Vec::new();
            {
                let state = self.hub.lock();
                if let Some(err) = &state.error {
                    tracing::debug!(topic = %self.topic, error = %err, "stream ends");
                    return None;
                }
                let buffers = state.partitions.as_ref()?;
                let mut out = Vec::new();
                for (&p, &pos) in &self.positions {
                    let Some(buffer) = buffers.get(p as usize) else {
                        continue;
                    };
                    if !buffer.since(pos, EVENTS_PER_TURN, &mut out) {
                        behind.push((p, pos));
                    }
                }
                self.pending.extend(out);
            }
            if !self.pending.is_empty() {
                continue;
            }
            if !behind.is_empty() && self.catch_up.is_none() {
                self.catch_up = Some(self.start_catch_up(behind));
            }
            let mut shutting_down = self.shutting_down.clone();
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                record = async {
                    match &mut self.catch_up {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match record {
                    Some(record) => self.pending.push_back(record),
                    None => self.catch_up = None, // caught up (or the reader failed; it is retried)
                },
                _ = shutting_down.changed() => return None,
            }
        }
    }

    /// A private reader for partitions behind the shared buffer; it stops once every
    /// one of them has reached what the buffer covers.
    fn start_catch_up(&self, behind: Vec<(i32, i64)>) -> mpsc::Receiver<Arc<Record>> {
        let (tx, rx) = mpsc::channel(CATCH_UP_QUEUE);
        let client = self.client.clone();
        let topic = self.topic.clone();
        let hub = self.hub.clone();
        std::thread::spawn(move || catch_up(client, topic, hub, behind, tx));
        rx
    }
}

fn catch_up(
    client: ClientConfig,
    topic: String,
    hub: Arc<Hub>,
    behind: Vec<(i32, i64)>,
    tx: mpsc::Sender<Arc<Record>>,
) {
    let consumer: BaseConsumer = match client.create() {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(error = %err, "stream: cannot create a catch-up reader");
            return;
        }
    };
    let mut assignment = TopicPartitionList::new();
    for (p, pos) in &behind {
        if assignment
            .add_partition_offset(&topic, *p, Offset::Offset(*pos))
            .is_err()
        {
            return;
        }
    }
    if consumer.assign(&assignment).is_err() {
        return;
    }
    let mut left: HashMap<i32, i64> = behind.into_iter().collect();
    while !left.is_empty() && !tx.is_closed() && !hub.stop.load(Ordering::Relaxed) {
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let (partition, next) = match result {
            Ok(message) => {
                let record = Arc::new(Record::from_message(&message));
                let (p, next) = (record.partition, record.offset + 1);
                if left.contains_key(&p) && tx.blocking_send(record).is_err() {
                    return;
                }
                (p, next)
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                // At the end of the log: the buffer covers from here on.
                let Some(next) = consumer.position().ok().and_then(|tpl| {
                    tpl.find_partition(&topic, p)
                        .and_then(|e| e.offset().to_raw())
                }) else {
                    continue;
                };
                (p, next)
            }
            Err(err) => {
                tracing::debug!(error = %err, "stream: catch-up read");
                continue;
            }
        };
        if let Some(pos) = left.get_mut(&partition) {
            *pos = next;
            let covered = hub
                .lock()
                .partitions
                .as_ref()
                .and_then(|b| b.get(partition as usize))
                .is_some_and(|b| next >= b.covered_from);
            if covered {
                left.remove(&partition);
            }
        }
    }
}

/// Counts a subscriber against `stream_max_subscribers` while it lives.
struct SubscriberGuard(Arc<AtomicUsize>);

impl SubscriberGuard {
    fn new(count: Arc<AtomicUsize>, max: usize) -> Option<SubscriberGuard> {
        let mut now = count.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match count.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(SubscriberGuard(count)),
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct HubGuard(Arc<Hub>);

impl Drop for HubGuard {
    fn drop(&mut self) {
        // A closed hub's count is not counted down any more.
        let _ = self
            .0
            .subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != CLOSED).then(|| n - 1)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip() {
        let positions: BTreeMap<i32, i64> = [(0, 16), (1, 5), (12, 0)].into_iter().collect();
        let id = event_id(&positions);
        assert_eq!(id, "0:16,1:5,12:0");
        assert_eq!(parse_event_id(&id).unwrap(), positions);
        assert!(parse_event_id("0:x").is_none());
        assert!(parse_event_id("-1:3").is_none());
        assert!(parse_event_id("5").is_none());
        assert_eq!(parse_event_id("").unwrap(), BTreeMap::new());
    }

    fn record(partition: i32, offset: i64) -> Arc<Record> {
        Arc::new(Record {
            partition,
            offset,
            timestamp: None,
            key: None,
            value: None,
            headers: Vec::new(),
            json: OnceLock::new(),
            binary: OnceLock::new(),
        })
    }

    #[test]
    fn a_buffer_serves_only_what_it_covers() {
        let mut b = Buffer {
            ring: VecDeque::new(),
            covered_from: 10,
            next: 10,
        };
        let mut out = Vec::new();
        assert!(b.since(10, 100, &mut out) && out.is_empty());
        assert!(!b.since(9, 100, &mut out));
        for o in [10, 11, 13] {
            b.ring.push_back(record(0, o));
            b.next = o + 1;
        }
        assert!(b.since(11, 100, &mut out));
        assert_eq!(
            out.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![11, 13]
        );
        out.clear();
        assert!(b.since(12, 1, &mut out));
        assert_eq!(out.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![13]);
    }
}
