//! State every gateway in front of a cluster must agree on, kept in the cluster
//! itself: a one-partition topic of key/value records (a null value deletes), which
//! each gateway follows from its start. Schemas set over HTTP and `Idempotency-Key`
//! answers live in such topics, so a gateway behind a load balancer, or one that
//! restarted, sees what another one (or its earlier self) wrote.
//!
//! A follower thread hands every record to the owner's callback, then
//! [`Event::CaughtUp`] once it has read what the topic held when it started (at once
//! if the topic does not exist yet), then every later record as it arrives.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

/// What the follower reports.
pub enum Event<'a> {
    Record {
        key: &'a [u8],
        value: Option<&'a [u8]>,
    },
    CaughtUp,
}

/// Where a follower starts reading.
#[derive(Clone, Copy)]
pub enum Start {
    Beginning,
    /// At most this many records before the end.
    Last(i64),
}

/// One shared topic: its follower, and the admin client that creates it.
pub struct SharedTopic {
    pub name: String,
    retention_ms: i64,
    admin: AdminClient<DefaultClientContext>,
    ready: AtomicBool,
    stop: Arc<AtomicBool>,
    /// The follower's next offset (-1 until it reads the topic).
    position: Arc<AtomicI64>,
}

impl SharedTopic {
    /// Starts following `name` in a thread named `thread`, calling `on_event`.
    pub fn follow(
        client: &ClientConfig,
        name: &str,
        retention_ms: i64,
        start: Start,
        thread: &str,
        mut on_event: impl FnMut(Event<'_>) + Send + 'static,
    ) -> anyhow::Result<Arc<SharedTopic>> {
        let admin: AdminClient<DefaultClientContext> = client.create()?;
        let consumer: BaseConsumer = client
            .clone()
            // librdkafka needs a group id to assign partitions; nothing is committed.
            .set("group.id", "freshet-gateway-shared")
            // Its metadata requests for the topic it waits for never create it.
            .set("allow.auto.create.topics", "false")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100")
            .create()?;
        let stop = Arc::new(AtomicBool::new(false));
        let position = Arc::new(AtomicI64::new(-1));
        let shared = Arc::new(SharedTopic {
            name: name.to_string(),
            retention_ms,
            admin,
            ready: AtomicBool::new(false),
            stop: stop.clone(),
            position: position.clone(),
        });
        let topic = name.to_string();
        std::thread::Builder::new()
            .name(thread.to_string())
            .spawn(move || follow(consumer, &topic, start, &stop, &position, &mut on_event))?;
        Ok(shared)
    }

    /// Creates the topic (one partition, `retention_ms`) unless it exists.
    pub async fn ensure(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let retention = self.retention_ms.to_string();
        let topic = NewTopic::new(&self.name, 1, TopicReplication::Fixed(-1))
            .set("retention.ms", &retention);
        let results = self
            .admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| e.to_string())?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(format!("cannot create topic '{}': {code}", self.name))
                }
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Waits (up to `timeout`) until the follower has handed over every record the
    /// topic holds now: whatever another gateway wrote before answering its client
    /// is then known here. Returns whether it got there (a topic that does not exist
    /// yet holds nothing: `true`; a cluster that does not answer: `false`).
    pub async fn sync_to_end(self: &Arc<Self>, timeout: Duration) -> bool {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_to_end_blocking(timeout))
            .await
            .unwrap_or(false)
    }

    /// [`SharedTopic::sync_to_end`] for threads outside the runtime.
    pub fn sync_to_end_blocking(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let end = match self.end_offset(timeout) {
            Ok(Some(end)) => end,
            Ok(None) => return true,
            Err(()) => return false,
        };
        while self.position.load(Ordering::Acquire) < end {
            if Instant::now() >= deadline {
                return false;
            }
            // Polling the follower's position: it advances as records are handed over.
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// The topic's end offset now; `Ok(None)` if the cluster says it does not exist.
    fn end_offset(&self, timeout: Duration) -> Result<Option<i64>, ()> {
        let client = self.admin.inner();
        match client.fetch_watermarks(&self.name, 0, timeout) {
            Ok((_, high)) => Ok(Some(high)),
            // All topics, not the one: a request naming it could create it.
            Err(_) => match client.fetch_metadata(None, timeout) {
                Ok(metadata) if !metadata.topics().iter().any(|t| t.name() == self.name) => {
                    Ok(None)
                }
                _ => Err(()),
            },
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads the topic for as long as the gateway runs, keeping `position` at the next
/// offset it will hand over. Until the topic exists it looks for it twice a second.
fn follow(
    consumer: BaseConsumer,
    topic: &str,
    start: Start,
    stop: &AtomicBool,
    position: &AtomicI64,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    let mut caught_up = false;
    let mut assigned = false;
    while !stop.load(Ordering::Relaxed) {
        if !assigned {
            // The one topic: the consumer does not let it be auto-created, and a
            // request for all topics would cost the cluster its whole metadata
            // twice a second (10,000 topics: a tenth of a core, idle).
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
                Ok(metadata)
                    if metadata
                        .topics()
                        .iter()
                        .any(|t| t.name() == topic && t.error().is_none()) =>
                {
                    let offset = match start {
                        Start::Beginning => Ok(Offset::Beginning),
                        Start::Last(n) => consumer
                            .fetch_watermarks(topic, 0, Duration::from_secs(5))
                            .map(|(low, high)| Offset::Offset((high - n).max(low))),
                    };
                    let mut assignment = TopicPartitionList::new();
                    let assign = offset
                        .and_then(|offset| assignment.add_partition_offset(topic, 0, offset))
                        .and_then(|()| consumer.assign(&assignment));
                    match assign {
                        Ok(()) => assigned = true,
                        Err(err) => {
                            tracing::warn!(topic, error = %err, "cannot read a shared topic")
                        }
                    }
                    continue;
                }
                Ok(_) => {
                    // Not created yet: nothing was ever written to it.
                    if !caught_up {
                        caught_up = true;
                        on_event(Event::CaughtUp);
                    }
                }
                Err(err) => tracing::debug!(topic, error = %err, "cluster metadata"),
            }
            sleep_unless_stopped(stop, Duration::from_millis(500));
            continue;
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(message)) => {
                if let Some(key) = message.key() {
                    on_event(Event::Record {
                        key,
                        value: message.payload(),
                    });
                }
                position.store(message.offset() + 1, Ordering::Release);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                let end = consumer.position().ok().and_then(|tpl| {
                    tpl.find_partition(topic, 0)
                        .and_then(|e| e.offset().to_raw())
                });
                if let Some(end) = end {
                    position.fetch_max(end, Ordering::AcqRel);
                }
                if !caught_up {
                    caught_up = true;
                    on_event(Event::CaughtUp);
                }
            }
            Some(Err(err)) => {
                tracing::debug!(topic, error = %err, "reading a shared topic");
                sleep_unless_stopped(stop, Duration::from_millis(200));
            }
        }
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, total: Duration) {
    let step = Duration::from_millis(100);
    let mut slept = Duration::ZERO;
    while slept < total && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step);
        slept += step;
    }
}
