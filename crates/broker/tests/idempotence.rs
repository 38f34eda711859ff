//! Idempotent producers over real TCP with raw Kafka requests, on a broker served
//! in-process: InitProducerId answers, epoch fencing, sequence gaps, duplicates of
//! the last five batches, producers without state, and producer-id expiry (with a
//! clock the test moves).

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{BrokerConfig, Clock};
use common::*;
use protocol::kafka_protocol::messages::produce_response::PartitionProduceResponse;
use protocol::kafka_protocol::messages::*;
use protocol::record_batch::{build_simple_batch, set_producer};
use protocol::ResponseError;

// ---- harness (tests/common, plus a clock and the background tasks) -------------

/// Starts at the real time; tests move it forward (or back) by hand.
struct TestClock(AtomicI64);

impl TestClock {
    fn new() -> Arc<TestClock> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        Arc::new(TestClock(AtomicI64::new(now)))
    }
    fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A broker on `clock` with its background jobs running: producer-id expiry is one.
async fn start_broker(config: BrokerConfig, clock: Arc<TestClock>) -> TestBroker {
    start_broker_in(tempfile::tempdir().unwrap(), config, clock).await
}

async fn start_broker_in(
    dir: tempfile::TempDir,
    config: BrokerConfig,
    clock: Arc<TestClock>,
) -> TestBroker {
    let setup = Setup {
        clock,
        background: true,
        ..Setup::default()
    };
    TestBroker::start_with(dir, config, setup).await
}

impl Client {
    async fn init_producer_id(&mut self, id: i64, epoch: i16, version: i16) -> (i16, i64, i16) {
        let r = self
            .call(
                InitProducerIdRequest::default()
                    .with_transactional_id(None)
                    .with_transaction_timeout_ms(60_000)
                    .with_producer_id(ProducerId(id))
                    .with_producer_epoch(epoch),
                version,
            )
            .await;
        (r.error_code, r.producer_id.0, r.producer_epoch)
    }

    async fn produce(&mut self, topic: &str, batch: Vec<u8>) -> PartitionProduceResponse {
        common::produce(self, topic, 0, batch, -1).await
    }

    /// (error code, base offset) of an idempotent batch of `records` records.
    async fn send(
        &mut self,
        topic: &str,
        batch: (i64, i16, i32, usize, i64),
    ) -> (Option<ResponseError>, i64) {
        let (pid, epoch, seq, records, timestamp_ms) = batch;
        let r = self
            .produce(topic, idempotent(pid, epoch, seq, records, timestamp_ms))
            .await;
        (error(r.error_code), r.base_offset)
    }

    async fn log_end(&mut self, topic: &str) -> i64 {
        let (err, high_watermark, _) = fetch_now(self, topic, 0, 0).await;
        assert_eq!(err, 0);
        high_watermark
    }
}

/// The answer without an error.
const NONE: Option<ResponseError> = None;

fn error(code: i16) -> Option<ResponseError> {
    (code != 0).then(|| {
        ResponseError::try_from_code(code).unwrap_or_else(|| panic!("unknown error code {code}"))
    })
}

fn idempotent(pid: i64, epoch: i16, seq: i32, records: usize, timestamp_ms: i64) -> Vec<u8> {
    let values: Vec<&[u8]> = vec![b"v"; records];
    let mut batch = build_simple_batch(timestamp_ms, &values);
    set_producer(&mut batch, pid, epoch, seq);
    batch
}

// ---- tests ----------------------------------------------------------------------

#[tokio::test]
async fn init_producer_id_always_hands_out_a_new_id_at_epoch_0() {
    let broker = start_broker(BrokerConfig::default(), TestClock::new()).await;
    let mut client = Client::connect(broker.addr).await;
    let mut seen = std::collections::HashSet::new();
    for version in 0..=4 {
        let (err, id, epoch) = client.init_producer_id(-1, -1, version).await;
        assert_eq!((err, epoch), (0, 0), "v{version}");
        assert!(id >= 0 && seen.insert(id), "v{version}: id {id} is new");
    }
    // KIP-360's form (the producer's current id and epoch) without a transactional
    // id: Kafka still gives a new id at epoch 0, not the next epoch.
    let (_, current, _) = client.init_producer_id(-1, -1, 4).await;
    for version in [3, 4] {
        let (err, id, epoch) = client.init_producer_id(current, 0, version).await;
        assert_eq!((err, epoch), (0, 0), "v{version}");
        assert_ne!(id, current, "v{version}: a new id, not a bumped epoch");
        assert!(seen.insert(id));
    }
    // Only one of the two given: malformed.
    for (id, epoch) in [(current, -1), (-1, 0)] {
        let (err, id_back, epoch_back) = client.init_producer_id(id, epoch, 4).await;
        assert_eq!(
            error(err),
            Some(ResponseError::InvalidRequest),
            "({id}, {epoch})"
        );
        assert_eq!((id_back, epoch_back), (-1, -1));
    }
    drop(client);
    broker.stop().await;
}

#[tokio::test]
async fn a_stale_epoch_is_fenced_and_a_new_epoch_restarts_at_zero() {
    let clock = TestClock::new();
    let now = clock.now_ms();
    let broker = start_broker(BrokerConfig::default(), clock).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "fence", 1).await;
    assert_eq!(c.send("fence", (7, 1, 0, 2, now)).await, (NONE, 0));
    assert_eq!(
        c.send("fence", (7, 0, 2, 1, now)).await.0,
        Some(ResponseError::InvalidProducerEpoch)
    );
    assert_eq!(
        c.send("fence", (7, 0, 0, 1, now)).await.0,
        Some(ResponseError::InvalidProducerEpoch),
        "an older epoch is fenced even at sequence 0"
    );
    assert_eq!(
        c.send("fence", (7, 2, 2, 1, now)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber),
        "a new epoch must start at sequence 0"
    );
    assert_eq!(c.send("fence", (7, 2, 0, 1, now)).await, (NONE, 2));
    assert_eq!(
        c.send("fence", (7, 1, 2, 1, now)).await.0,
        Some(ResponseError::InvalidProducerEpoch),
        "epoch 1 is now stale too"
    );
    assert_eq!(c.log_end("fence").await, 3, "refused batches wrote nothing");
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn a_sequence_gap_is_out_of_order_and_writes_nothing() {
    let clock = TestClock::new();
    let now = clock.now_ms();
    let broker = start_broker(BrokerConfig::default(), clock).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "gap", 1).await;
    assert_eq!(c.send("gap", (3, 0, 0, 3, now)).await, (NONE, 0));
    for seq in [4, 100, 1] {
        assert_eq!(
            c.send("gap", (3, 0, seq, 1, now)).await.0,
            Some(ResponseError::OutOfOrderSequenceNumber),
            "sequence {seq} after 0..=2"
        );
    }
    assert_eq!(c.log_end("gap").await, 3);
    assert_eq!(c.send("gap", (3, 0, 3, 1, now)).await, (NONE, 3));
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn retries_of_the_last_five_batches_get_their_offsets_and_older_ones_are_refused() {
    let clock = TestClock::new();
    let now = clock.now_ms();
    let broker = start_broker(BrokerConfig::default(), clock).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "dups", 1).await;
    // Six batches of 1..=6 records: (sequence, records, base offset).
    let mut sent = Vec::new();
    let (mut seq, mut offset) = (0, 0);
    for records in 1..=6usize {
        assert_eq!(
            c.send("dups", (9, 0, seq, records, now)).await,
            (NONE, offset)
        );
        sent.push((seq, records, offset));
        seq += records as i32;
        offset += records as i64;
    }
    let end = c.log_end("dups").await;
    assert_eq!(end, 21);
    for &(seq, records, offset) in &sent[1..] {
        assert_eq!(
            c.send("dups", (9, 0, seq, records, now)).await,
            (NONE, offset),
            "retry of the batch at sequence {seq}"
        );
    }
    // The first batch is no longer remembered: Kafka answers out of order.
    let (seq, records, _) = sent[0];
    assert_eq!(
        c.send("dups", (9, 0, seq, records, now)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber)
    );
    // Same first sequence, different length: not a duplicate, and not next either.
    let (seq, records, _) = sent[5];
    assert_eq!(
        c.send("dups", (9, 0, seq, records - 1, now)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber)
    );
    assert_eq!(c.log_end("dups").await, end, "no retry was written again");
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn a_producer_without_state_may_start_at_any_sequence() {
    let clock = TestClock::new();
    let now = clock.now_ms();
    let broker = start_broker(BrokerConfig::default(), clock).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "lost", 1).await;
    // As after its state expired or its batches were removed: Kafka 3.x accepts it.
    assert_eq!(c.send("lost", (55, 3, 42, 2, now)).await, (NONE, 0));
    assert_eq!(
        c.send("lost", (55, 3, 42, 2, now)).await,
        (NONE, 0),
        "retry"
    );
    assert_eq!(
        c.send("lost", (55, 3, 45, 1, now)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber),
        "from then on it is tracked"
    );
    assert_eq!(c.send("lost", (55, 3, 44, 1, now)).await, (NONE, 2));
    assert_eq!(
        error(
            c.produce("lost", idempotent(56, 0, -1, 1, now))
                .await
                .error_code
        ),
        Some(ResponseError::InvalidRecord),
        "a producer id with no sequence is malformed"
    );
    assert_eq!(c.log_end("lost").await, 3);
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn idle_producers_expire_in_the_background_and_leave_the_snapshot() {
    const EXPIRATION_MS: i64 = 60_000;
    let config = BrokerConfig {
        producer_id_expiration_ms: EXPIRATION_MS,
        producer_id_expiration_check_interval_ms: 10,
        ..BrokerConfig::default()
    };
    let clock = TestClock::new();
    let start = clock.now_ms();
    let broker = start_broker(config.clone(), clock.clone()).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "idle", 1).await;
    // Producer 1 goes idle; producer 2 writes again just before the clock moves.
    assert_eq!(c.send("idle", (1, 0, 0, 1, start)).await, (NONE, 0));
    assert_eq!(c.send("idle", (2, 0, 0, 1, start)).await, (NONE, 1));
    clock.set(start + EXPIRATION_MS - 1);
    assert_eq!(
        c.send("idle", (2, 0, 1, 1, start + 30_000)).await,
        (NONE, 2)
    );
    assert_eq!(
        c.send("idle", (1, 0, 5, 1, start)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber),
        "not idle long enough yet"
    );

    clock.set(start + EXPIRATION_MS);
    // The background check forgets producer 1: its gapped sequence is then taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.send("idle", (1, 0, 5, 1, start)).await {
            (None, offset) => {
                assert_eq!(offset, 3);
                break;
            }
            (err, _) => assert_eq!(err, Some(ResponseError::OutOfOrderSequenceNumber)),
        }
        assert!(Instant::now() < deadline, "producer 1 never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        c.send("idle", (2, 0, 5, 1, start + 30_000)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber),
        "producer 2 was active 30 s ago and is still tracked"
    );
    // Producer 1's new batch still carries the old timestamp, so it is idle again:
    // the next check drops it, and rewrites the snapshot without it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let partition = broker
        .broker
        .topics
        .get("idle")
        .unwrap()
        .partition(0)
        .unwrap();
    while partition.lock_producers().producer_count() != 1 {
        assert!(Instant::now() < deadline, "producer 1 never expired again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(partition);
    drop(c);

    // Restart with the clock back at the start: had the snapshot kept producer 1,
    // it would not be idle then and its gap would be refused.
    let dir = broker.stop().await;
    clock.set(start);
    let broker = start_broker_in(dir, config, clock.clone()).await;
    let mut c = Client::connect(broker.addr).await;
    assert_eq!(
        c.send("idle", (1, 0, 40, 1, start)).await,
        (NONE, 4),
        "producer 1 did not come back from the snapshot"
    );
    assert_eq!(
        c.send("idle", (2, 0, 5, 1, start)).await.0,
        Some(ResponseError::OutOfOrderSequenceNumber),
        "producer 2 did"
    );
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn producers_replayed_from_the_log_expire_at_start_up() {
    let config = BrokerConfig {
        producer_id_expiration_ms: 60_000,
        ..BrokerConfig::default()
    };
    let clock = TestClock::new();
    let start = clock.now_ms();
    let broker = start_broker(config.clone(), clock.clone()).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "replay", 1).await;
    assert_eq!(c.send("replay", (1, 0, 0, 1, start)).await, (NONE, 0));
    drop(c);
    let dir = broker.stop().await;
    // Without a snapshot the state is rebuilt from the log, old batch included.
    std::fs::remove_file(dir.path().join("replay-0").join("producer-state.json")).unwrap();
    clock.set(start + 60_000);
    let broker = start_broker_in(dir, config, clock).await;
    let mut c = Client::connect(broker.addr).await;
    assert_eq!(
        c.send("replay", (1, 0, 9, 1, start)).await,
        (NONE, 1),
        "the idle producer was dropped when the broker opened"
    );
    drop(c);
    broker.stop().await;
}

#[tokio::test]
async fn a_new_producer_id_past_the_partitions_limit_is_throttled_until_one_expires() {
    let clock = TestClock::new();
    let now = clock.now_ms();
    let config = BrokerConfig {
        max_producer_ids_per_partition: 2,
        producer_id_expiration_ms: 60_000,
        producer_id_expiration_check_interval_ms: 10,
        ..BrokerConfig::default()
    };
    let broker = start_broker(config, clock.clone()).await;
    let mut c = Client::connect(broker.addr).await;
    create_topic(&mut c, "few", 1).await;
    assert_eq!(c.send("few", (1, 0, 0, 1, now - 50_000)).await, (NONE, 0));
    assert_eq!(c.send("few", (2, 0, 0, 1, now)).await, (NONE, 1));
    let refused = c.produce("few", idempotent(3, 0, 0, 1, now)).await;
    assert_eq!(
        error(refused.error_code),
        Some(ResponseError::ThrottlingQuotaExceeded)
    );
    assert!(refused
        .error_message
        .as_deref()
        .is_some_and(|m| m.contains("max_producer_ids_per_partition=2")));
    // The producers already known go on, retries included.
    assert_eq!(c.send("few", (1, 0, 1, 1, now)).await, (NONE, 2));
    assert_eq!(c.send("few", (1, 0, 1, 1, now)).await, (NONE, 2), "retry");
    assert_eq!(
        c.log_end("few").await,
        3,
        "nothing of the refused batch was written"
    );
    // Both producers go idle past the expiration: the new id gets a place.
    clock.set(now + 60_000);
    let mut attempts = 0;
    loop {
        let (err, _) = c.send("few", (3, 0, 0, 1, now + 60_000)).await;
        if err.is_none() {
            break;
        }
        assert_eq!(err, Some(ResponseError::ThrottlingQuotaExceeded));
        attempts += 1;
        assert!(attempts < 2_000, "producer 2 never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(c);
    broker.stop().await;
}
