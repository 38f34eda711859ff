//! State every gateway in front of a cluster must agree on, kept in the cluster
//! itself: a one-partition topic of key/value records (a null value deletes), which
//! each gateway follows from its start. Schemas set over HTTP and `Idempotency-Key`
//! answers live in such topics, so a gateway behind a load balancer, or one that
//! restarted, sees what another one (or its earlier self) wrote.
//!
//! A follower thread hands every record to the owner's callback, then
//! [`Event::CaughtUp`] once it has read what the topic held when it started (at once
//! if the topic does not exist yet), then every later record as it arrives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100")
            .set("reconnect.backoff.max.ms", "1000")
            .create()?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(SharedTopic {
            name: name.to_string(),
            retention_ms,
            admin,
            ready: AtomicBool::new(false),
            stop: stop.clone(),
        });
        let topic = name.to_string();
        std::thread::Builder::new()
            .name(thread.to_string())
            .spawn(move || follow(consumer, &topic, start, &stop, &mut on_event))?;
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

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads the topic for as long as the gateway runs. Until it exists it looks for it
/// every few seconds.
fn follow(
    consumer: BaseConsumer,
    topic: &str,
    start: Start,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    let mut caught_up = false;
    let mut assigned = false;
    while !stop.load(Ordering::Relaxed) {
        if !assigned {
            // All topics, not the one: a request naming it could create it.
            match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(metadata) if metadata.topics().iter().any(|t| t.name() == topic) => {
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
            sleep_unless_stopped(stop, Duration::from_secs(3));
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
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
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
