//! The broker served in-process on an ephemeral port and driven over real TCP with
//! raw Kafka requests: behaviour that third-party clients do not let us pin down
//! precisely (long-poll timing, acks=all, bad bytes, limits, restart).

mod common;

use std::time::{Duration, Instant};

use broker::{BrokerConfig, Clock, SystemClock};
use bytes::Buf;
use common::*;
use protocol::kafka_protocol::messages::create_topics_request::CreatableTopic;
use protocol::kafka_protocol::messages::produce_response::PartitionProduceResponse;
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::Decodable;
use protocol::record_batch::{build_simple_batch, BatchHeader};
use protocol::ResponseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A broker with `config`, a client connected to it, and `topic` created through it.
async fn start_with_topic(
    config: BrokerConfig,
    topic: &str,
    partitions: i32,
) -> (TestBroker, Client) {
    let broker = TestBroker::start(config).await;
    let mut client = Client::connect(broker.addr).await;
    create_topic(&mut client, topic, partitions).await;
    (broker, client)
}

#[tokio::test]
async fn produce_then_fetch_returns_the_producers_bytes() {
    let (broker, mut client) = start_with_topic(BrokerConfig::default(), "t", 2).await;
    let first = build_simple_batch(1_000, &[b"a", b"b"]);
    let second = build_simple_batch(2_000, &[b"c"]);
    let r = produce(&mut client, "t", 1, first.clone(), -1).await;
    assert_eq!((r.error_code, r.base_offset), (0, 0));
    let r = produce(&mut client, "t", 1, second.clone(), 1).await;
    assert_eq!((r.error_code, r.base_offset), (0, 2));

    let (err, hw, records) = fetch_now(&mut client, "t", 1, 0).await;
    assert_eq!((err, hw), (0, 3));
    // Stored byte-for-byte; only the base offset (bytes 0..8) was rewritten.
    let mut expected_second = second.clone();
    expected_second[0..8].copy_from_slice(&2i64.to_be_bytes());
    assert_eq!(&records[..], &[first, expected_second].concat()[..]);

    // Fetching from inside the second batch, and past the end.
    let (_, _, records) = fetch_now(&mut client, "t", 1, 2).await;
    assert_eq!(BatchHeader::parse(&records).unwrap().base_offset, 2);
    let (err, _, _) = fetch_now(&mut client, "t", 1, 4).await;
    assert_eq!(err, ResponseError::OffsetOutOfRange.code());
    broker.stop().await;
}

#[tokio::test]
async fn long_poll_returns_when_data_arrives_and_times_out_otherwise() {
    let (broker, mut producer) = start_with_topic(BrokerConfig::default(), "lp", 1).await;
    let mut consumer = Client::connect(broker.addr).await;

    let started = Instant::now();
    let (_, _, records) = records_of(&consumer.call(fetch_request("lp", 0, 0, 300, 1), 12).await);
    let waited = started.elapsed();
    assert!(records.is_empty());
    assert!(
        waited >= Duration::from_millis(290),
        "returned after {waited:?}, before max_wait"
    );

    // A fetch parked for 10 s is answered as soon as a record lands.
    let fetch = tokio::spawn(async move {
        let started = Instant::now();
        let response = consumer
            .call(fetch_request("lp", 0, 0, 10_000, 1), 12)
            .await;
        (started.elapsed(), records_of(&response))
    });
    // Whether the record lands before or while the fetch is parked, the answer
    // must come promptly, not at max_wait.
    let r = produce(&mut producer, "lp", 0, build_simple_batch(5, &[b"wake"]), 1).await;
    assert_eq!(r.error_code, 0);
    let (waited, (err, hw, records)) = fetch.await.unwrap();
    assert_eq!((err, hw), (0, 1));
    assert!(!records.is_empty());
    assert!(waited < Duration::from_secs(5), "long poll took {waited:?}");
    broker.stop().await;
}

#[tokio::test]
async fn min_bytes_zero_answers_at_once_and_larger_min_bytes_waits_for_them() {
    let (broker, mut producer) = start_with_topic(BrokerConfig::default(), "mb", 1).await;
    let mut consumer = Client::connect(broker.addr).await;

    // min_bytes 0: Kafka answers at once, even with nothing to return.
    let started = Instant::now();
    let (err, hw, records) = records_of(
        &consumer
            .call(fetch_request("mb", 0, 0, 10_000, 0), 12)
            .await,
    );
    let waited = started.elapsed();
    assert_eq!((err, hw), (0, 0));
    assert!(records.is_empty());
    assert!(
        waited < Duration::from_secs(5),
        "min_bytes 0 waited {waited:?}"
    );

    let first = build_simple_batch(1, &[&[1u8; 100]]);
    let second = build_simple_batch(2, &[&[2u8; 100]]);
    assert_eq!(
        produce(&mut producer, "mb", 0, first.clone(), 1)
            .await
            .error_code,
        0
    );

    // One batch is there but min_bytes asks for more: wait out max_wait, then
    // answer with what there is.
    let started = Instant::now();
    let min_bytes = first.len() as i32 + 1;
    let (_, _, records) = records_of(
        &consumer
            .call(fetch_request("mb", 0, 0, 400, min_bytes), 12)
            .await,
    );
    let waited = started.elapsed();
    assert_eq!(records.len(), first.len());
    assert!(
        waited >= Duration::from_millis(390),
        "answered after {waited:?} with fewer than min_bytes"
    );

    // min_bytes reached by a second batch: answered then, with both, well before
    // max_wait.
    let both = first.len() + second.len();
    let fetch = tokio::spawn(async move {
        let started = Instant::now();
        let response = consumer
            .call(fetch_request("mb", 0, 0, 20_000, both as i32), 12)
            .await;
        (started.elapsed(), records_of(&response))
    });
    let r = produce(&mut producer, "mb", 0, second, 1).await;
    assert_eq!(r.error_code, 0);
    let (waited, (err, hw, records)) = fetch.await.unwrap();
    assert_eq!((err, hw), (0, 2));
    assert_eq!(records.len(), both);
    assert!(waited < Duration::from_secs(10), "took {waited:?}");
    broker.stop().await;
}

/// Fills partition 0 of `topic` with `batches` batches of one 1 MB record each.
async fn fill_megabytes(client: &mut Client, topic: &str, batches: u8) -> usize {
    let mut bytes = 0;
    for i in 0..batches {
        let batch = build_simple_batch(i as i64, &[&vec![i; 1_000_000]]);
        bytes += batch.len();
        let r = produce(client, topic, 0, batch, 1).await;
        assert_eq!(r.error_code, 0);
    }
    bytes
}

/// Fetch memory, and the most one fetch may answer, both `budget` bytes.
fn fetch_budget(budget: usize) -> BrokerConfig {
    BrokerConfig {
        fetch_memory_bytes: budget,
        fetch_max_bytes: budget,
        ..BrokerConfig::default()
    }
}

/// A fetch of everything from offset 0, up to 16 MiB.
fn fetch_all(topic: &str) -> FetchRequest {
    let mut request = fetch_request(topic, 0, 0, 0, 1).with_max_bytes(16 << 20);
    request.topics[0].partitions[0].partition_max_bytes = 16 << 20;
    request
}

#[tokio::test]
async fn fetch_memory_is_held_until_answers_are_written() {
    const BUDGET: usize = 8 << 20;
    let config = fetch_budget(BUDGET);
    let (broker, mut producer) = start_with_topic(config, "mem", 1).await;
    // 6 MB per answer: more than the kernel's largest send buffer (4 MiB), so an
    // answer to a peer that is not reading stays in the broker; two do not fit the
    // budget together.
    let stored = fill_megabytes(&mut producer, "mem", 6).await;

    const CLIENTS: usize = 4;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = Client::connect_slow_reader(broker.addr).await;
        client.send_request(fetch_all("mem"), 12).await;
        clients.push(client);
    }
    // Nobody reads yet: one answer is out (stuck in its socket), the others wait
    // for fetch memory instead of being loaded alongside it.
    let b = broker.broker.clone();
    wait_until(
        "one fetch answer is sent and the others wait for memory",
        || b.fetch_answer_bytes.value() > 0 && b.fetch_memory_waiting.value() == CLIENTS - 1,
    )
    .await;
    assert!(
        b.fetch_answer_bytes.max() <= BUDGET,
        "{} bytes held",
        b.fetch_answer_bytes.max()
    );

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move { records_of(&client.receive::<FetchRequest>(12).await) })
        })
        .collect();
    for reader in readers {
        let (err, hw, records) = reader.await.unwrap();
        assert_eq!((err, hw, records.len()), (0, 6, stored));
    }
    wait_until("every answer's memory is given back", || {
        b.fetch_answer_bytes.value() == 0
    })
    .await;
    assert_eq!(b.fetch_memory.available_permits(), BUDGET);
    assert!(
        b.fetch_answer_bytes.max() <= BUDGET,
        "fetch answers held {} bytes at once, budget {BUDGET}",
        b.fetch_answer_bytes.max()
    );
    broker.stop().await;
}

#[tokio::test]
async fn pipelined_fetches_on_one_connection_cannot_deadlock_on_fetch_memory() {
    const BUDGET: usize = 8 << 20;
    let config = fetch_budget(BUDGET);
    let (broker, mut producer) = start_with_topic(config, "ready", 1).await;
    create_topic(&mut producer, "later", 1).await;
    let ready_bytes = fill_megabytes(&mut producer, "ready", 6).await;

    // First a long poll that will need 6 MB, then a fetch that could take 6 MB at
    // once; its answer must go out after the first one's.
    let mut client = Client::connect(broker.addr).await;
    let mut long_poll = fetch_all("later");
    long_poll.max_wait_ms = 20_000;
    long_poll.min_bytes = ready_bytes as i32; // all 6 MB, once they are there
    client.send_request(long_poll, 12).await;
    client.send_request(fetch_all("ready"), 12).await;
    let b = broker.broker.clone();
    // Either the second fetch took its memory ahead of the first (the deadlock to
    // avoid), or it waits for its turn.
    wait_until("the second fetch is taken up", || {
        b.fetch_memory.available_permits() < BUDGET || b.fetch_waiting_turn.value() == 1
    })
    .await;
    let later_bytes = fill_megabytes(&mut producer, "later", 6).await;
    let answers = tokio::time::timeout(Duration::from_secs(20), async {
        let first = records_of(&client.receive::<FetchRequest>(12).await);
        let second = records_of(&client.receive::<FetchRequest>(12).await);
        (first, second)
    })
    .await
    .expect("pipelined fetches deadlocked on fetch memory");
    let ((err1, hw1, first), (err2, hw2, second)) = answers;
    assert_eq!((err1, hw1, first.len()), (0, 6, later_bytes));
    assert_eq!((err2, hw2, second.len()), (0, 6, ready_bytes));
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_ever_on_a_peer_that_stopped_reading() {
    let config = BrokerConfig {
        shutdown_timeout_ms: 300,
        ..BrokerConfig::default()
    };
    let (broker, mut producer) = start_with_topic(config, "stuck", 1).await;
    fill_megabytes(&mut producer, "stuck", 6).await;
    let mut stuck = Client::connect_slow_reader(broker.addr).await;
    stuck.send_request(fetch_all("stuck"), 12).await;
    let b = broker.broker.clone();
    wait_until("the answer is being written", || {
        b.fetch_answer_bytes.value() > 0
    })
    .await;

    let started = Instant::now();
    let dir = tokio::time::timeout(Duration::from_secs(20), broker.stop())
        .await
        .expect("shutdown hung on a peer that does not read");
    assert!(started.elapsed() >= Duration::from_millis(290));
    drop((stuck, b));
    // The stop still flushed: everything is there after a restart.
    let broker = TestBroker::start_in(dir, BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    let (err, hw, _) = fetch_now(&mut client, "stuck", 0, 0).await;
    assert_eq!((err, hw), (0, 6));
    broker.stop().await;
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_busy_ones_are_not() {
    let config = BrokerConfig {
        connections_max_idle_ms: 300,
        ..BrokerConfig::default()
    };
    let broker = TestBroker::start(config).await;
    let closed_within = |mut client: Client| async move {
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(20), client.read_frame()).await;
        assert!(read.expect("connection left open").is_none());
        started.elapsed()
    };

    // Sends nothing at all.
    let silent = Client::connect(broker.addr).await;
    assert!(closed_within(silent).await >= Duration::from_millis(250));

    // Stops in the middle of a frame: the size says 100 bytes, 10 come.
    let mut half = Client::connect(broker.addr).await;
    half.stream.write_all(&100i32.to_be_bytes()).await.unwrap();
    half.stream.write_all(&[0u8; 10]).await.unwrap();
    closed_within(half).await;

    // Trickles a frame byte by byte, slower than requests but faster than the idle
    // time: the bytes alone do not keep the connection open.
    let mut trickle = Client::connect(broker.addr).await;
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..100 {
        if trickle.stream.write_all(&[0u8]).await.is_err() {
            closed = true;
            break;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), trickle.stream.read(&mut byte)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("an answer to a frame never finished"),
            Err(_) => {} // still open, nothing to read: go on trickling
        }
    }
    assert!(
        closed,
        "a trickling peer kept its connection for {:?}",
        started.elapsed()
    );

    // A long poll longer than the idle time is waiting for us, not idle: it is
    // answered, and the connection serves the next request.
    let mut client = Client::connect(broker.addr).await;
    create_topic(&mut client, "idle", 1).await;
    let started = Instant::now();
    let (err, _, records) =
        records_of(&client.call(fetch_request("idle", 0, 0, 1_000, 1), 12).await);
    assert_eq!(err, 0);
    assert!(records.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(990));
    client.call(ApiVersionsRequest::default(), 0).await;
    broker.stop().await;
}

fn creatable(name: &str, partitions: i32) -> CreatableTopic {
    CreatableTopic::default()
        .with_name(topic_name(name))
        .with_num_partitions(partitions)
        .with_replication_factor(1)
}

async fn create_topics(
    client: &mut Client,
    topics: Vec<CreatableTopic>,
    validate_only: bool,
) -> Vec<(i16, String)> {
    let request = CreateTopicsRequest::default()
        .with_topics(topics)
        .with_validate_only(validate_only);
    let response = client.call(request, 7).await;
    response
        .topics
        .iter()
        .map(|t| {
            let message = t.error_message.as_deref().unwrap_or_default().to_string();
            (t.error_code, message)
        })
        .collect()
}

async fn create_partitions(client: &mut Client, topic: &str, count: i32) -> (i16, String) {
    use protocol::kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
    let request = CreatePartitionsRequest::default()
        .with_timeout_ms(5000)
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(topic_name(topic))
            .with_count(count)
            .with_assignments(None)]);
    let response = client.call(request, 3).await;
    let r = &response.results[0];
    let message = r.error_message.as_deref().unwrap_or_default().to_string();
    (r.error_code, message)
}

fn topic_names(metadata: &MetadataResponse) -> Vec<String> {
    let mut names: Vec<String> = metadata
        .topics
        .iter()
        .filter(|t| t.error_code == 0)
        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn requests_for_too_many_partitions_are_refused_as_kafka_refuses_them() {
    let policy = ResponseError::PolicyViolation.code();
    let excessive = "Excessively large number of partitions per request.".to_string();
    // Kafka's limit: 10,000 partitions in one request, counted over all its topics.
    let broker = TestBroker::start(BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    let topics = vec![
        creatable("a", 5_000),
        creatable("b", 5_000),
        creatable("c", 1),
    ];
    assert_eq!(
        create_topics(&mut client, topics, false).await,
        vec![(policy, excessive.clone()); 3],
        "the whole request is refused"
    );
    let answer = create_topics(&mut client, vec![creatable("huge", i32::MAX)], true).await;
    assert_eq!(answer, vec![(policy, excessive.clone())]);
    let metadata = client
        .call(MetadataRequest::default().with_topics(None), 12)
        .await;
    assert!(topic_names(&metadata).is_empty(), "nothing was created");
    assert_eq!(
        create_topics(&mut client, vec![creatable("a", 3)], false).await[0].0,
        0
    );
    let (err, message) = create_partitions(&mut client, "a", 10_004).await;
    assert_eq!((err, message), (policy, excessive));
    assert_eq!(create_partitions(&mut client, "a", 5).await.0, 0);
    broker.stop().await;
}

#[tokio::test]
async fn the_broker_hosts_at_most_max_partitions() {
    let config = BrokerConfig {
        max_partitions: 10,
        ..BrokerConfig::default()
    };
    let policy = ResponseError::PolicyViolation.code();
    let broker = TestBroker::start(config).await;
    let mut client = Client::connect(broker.addr).await;
    assert_eq!(
        create_topics(&mut client, vec![creatable("a", 8)], false).await[0].0,
        0
    );
    for validate_only in [true, false] {
        let (err, message) = create_topics(&mut client, vec![creatable("b", 3)], validate_only)
            .await
            .remove(0);
        assert_eq!(err, policy, "validate_only {validate_only}: {message}");
        assert!(message.contains("max_partitions"), "{message}");
    }
    assert_eq!(create_partitions(&mut client, "a", 11).await.0, policy);
    // Up to the limit is fine.
    assert_eq!(create_partitions(&mut client, "a", 10).await.0, 0);
    // Automatic creation counts too: the topic is simply not there.
    let auto = MetadataRequest::default()
        .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default(
        )
        .with_name(Some(topic_name("auto")))]))
        .with_allow_auto_topic_creation(true);
    let metadata = client.call(auto, 12).await;
    assert_eq!(
        metadata.topics[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    let metadata = client
        .call(MetadataRequest::default().with_topics(None), 12)
        .await;
    assert_eq!(topic_names(&metadata), vec!["a"]);
    assert_eq!(metadata.topics[0].partitions.len(), 10);
    assert_eq!(
        create_topics(&mut client, vec![creatable("c", 1)], false).await[0].0,
        policy
    );
    broker.stop().await;
}

#[tokio::test]
async fn concurrent_acks_all_producers_share_fsyncs() {
    let config = BrokerConfig {
        flush_interval_ms: 0, // only acks=all produces fsync
        ..BrokerConfig::default()
    };
    let (broker, mut admin) = start_with_topic(config, "gc", 1).await;
    const PRODUCERS: usize = 8;
    const EACH: usize = 30;
    let syncs_before = broker.broker.flusher.sync_count();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let addr = broker.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for i in 0..EACH {
                    let value = format!("{p}-{i}");
                    let batch = build_simple_batch(i as i64, &[value.as_bytes()]);
                    let r = produce(&mut client, "gc", 0, batch, -1).await;
                    assert_eq!(r.error_code, 0);
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let syncs = broker.broker.flusher.sync_count() - syncs_before;
    let requests = (PRODUCERS * EACH) as u64;
    eprintln!("{syncs} fsyncs for {requests} acks=all produce requests");
    assert!(syncs >= 1);
    assert!(
        syncs * 2 <= requests,
        "{syncs} fsyncs for {requests} acks=all produce requests: not shared"
    );
    let (_, hw, _) = fetch_now(&mut admin, "gc", 0, 0).await;
    assert_eq!(hw, requests as i64);
    broker.stop().await;
}

#[tokio::test]
async fn corrupt_and_oversized_batches_are_refused_and_nothing_is_written() {
    let config = BrokerConfig {
        max_message_bytes: 200,
        ..BrokerConfig::default()
    };
    let (broker, mut client) = start_with_topic(config, "c", 1).await;
    assert_eq!(
        produce(&mut client, "c", 0, build_simple_batch(1, &[b"good"]), -1)
            .await
            .error_code,
        0
    );

    let mut corrupt = build_simple_batch(1, &[b"payload"]);
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0xff;
    let r = produce(&mut client, "c", 0, corrupt, -1).await;
    assert_eq!(r.error_code, ResponseError::CorruptMessage.code());

    let big = build_simple_batch(1, &[&[7u8; 300]]);
    let r = produce(&mut client, "c", 0, big, -1).await;
    assert_eq!(r.error_code, ResponseError::MessageTooLarge.code());

    let r = produce(&mut client, "nope", 0, build_simple_batch(1, &[b"x"]), -1).await;
    assert_eq!(r.error_code, ResponseError::UnknownTopicOrPartition.code());

    let (err, hw, records) = fetch_now(&mut client, "c", 0, 0).await;
    assert_eq!((err, hw), (0, 1), "only the good batch is in the log");
    assert_eq!(BatchHeader::parse(&records).unwrap().records_count, 1);
    broker.stop().await;
}

#[tokio::test]
async fn bad_bytes_close_the_connection_and_harm_nothing() {
    let config = BrokerConfig {
        max_request_bytes: 4096,
        max_message_bytes: 4096,
        ..BrokerConfig::default()
    };
    let (broker, mut client) = start_with_topic(config, "b", 1).await;
    assert_eq!(
        produce(&mut client, "b", 0, build_simple_batch(1, &[b"kept"]), -1)
            .await
            .error_code,
        0
    );

    let attacks: Vec<Vec<u8>> = vec![
        vec![0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5], // unknown API key
        vec![0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0x03, 0x3c], // Metadata claiming a huge array
        vec![0, 0, 0, 9, 0, 0, 0, 1],                   // Produce v9, body missing
        vec![0, 1],                                     // shorter than a header
    ];
    for attack in attacks {
        let mut bad = Client::connect(broker.addr).await;
        bad.send_raw(&attack).await;
        assert!(
            bad.read_frame().await.is_none(),
            "connection not closed for {attack:?}"
        );
    }
    // A frame above max_request_bytes is refused from its size alone.
    let mut bad = Client::connect(broker.addr).await;
    bad.stream
        .write_all(&(1_000_000i32).to_be_bytes())
        .await
        .unwrap();
    assert!(bad.read_frame().await.is_none());

    // ApiVersions at a version we do not serve: the v0 answer with our ranges.
    let mut av = Client::connect(broker.addr).await;
    av.send_raw(&[0, 18, 0, 99, 0, 0, 0, 42, 0, 0]).await;
    let mut frame = av
        .read_frame()
        .await
        .expect("an answer, not a closed socket");
    assert_eq!(frame.get_i32(), 42);
    let response = ApiVersionsResponse::decode(&mut frame, 0).unwrap();
    assert_eq!(
        response.error_code,
        ResponseError::UnsupportedVersion.code()
    );
    assert!(response
        .api_keys
        .iter()
        .any(|k| k.api_key == ApiKey::Fetch as i16));

    let (err, hw, _) = fetch_now(&mut client, "b", 0, 0).await;
    assert_eq!((err, hw), (0, 1));
    broker.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let config = BrokerConfig {
        max_connections: 2,
        ..BrokerConfig::default()
    };
    let broker = TestBroker::start(config).await;
    let mut a = Client::connect(broker.addr).await;
    let mut b = Client::connect(broker.addr).await;
    // Both are served (this also proves the broker accepted them).
    a.call(ApiVersionsRequest::default(), 0).await;
    b.call(ApiVersionsRequest::default(), 0).await;
    let mut c = Client::connect(broker.addr).await;
    c.send_raw(&[0, 18, 0, 0, 0, 0, 0, 1, 0, 0]).await;
    assert!(
        c.read_frame().await.is_none(),
        "third connection must be closed"
    );
    drop(a);
    // Once a slot frees, new connections are served again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Client::connect(broker.addr).await;
        d.send_raw(&[0, 18, 0, 0, 0, 0, 0, 1, 0, 0]).await;
        if d.read_frame().await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "freed connection slot never reused"
        );
        tokio::task::yield_now().await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn data_and_topics_survive_a_restart() {
    let (broker, mut client) = start_with_topic(BrokerConfig::default(), "keep", 3).await;
    for i in 0..10u8 {
        let r = produce(
            &mut client,
            "keep",
            (i % 3) as i32,
            build_simple_batch(i as i64, &[&[i]]),
            -1,
        )
        .await;
        assert_eq!(r.error_code, 0);
    }
    drop(client);
    let dir = broker.stop().await;
    // A clean stop leaves a producer-state snapshot even where no idempotent producer
    // wrote, so the next start replays nothing.
    for p in 0..3 {
        assert!(dir
            .path()
            .join(format!("keep-{p}"))
            .join("producer-state.json")
            .exists());
    }
    let broker = TestBroker::start_in(dir, BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    let metadata = client
        .call(MetadataRequest::default().with_topics(None), 12)
        .await;
    assert_eq!(metadata.topics.len(), 1);
    assert_eq!(metadata.topics[0].partitions.len(), 3);
    let (_, hw, _) = fetch_now(&mut client, "keep", 0, 0).await;
    assert_eq!(hw, 4); // i = 0, 3, 6, 9
    broker.stop().await;
}

/// Produces `values` to partition 0 of `topic` as producer `producer_id` (epoch 0)
/// from `sequence` on, with acks=all.
async fn produce_idempotent(
    client: &mut Client,
    topic: &str,
    producer_id: i64,
    sequence: i32,
    values: &[&[u8]],
) -> PartitionProduceResponse {
    // A current timestamp: producer-id expiry measures idleness from it.
    let now_ms = SystemClock.now_ms();
    let mut batch = build_simple_batch(now_ms, values);
    protocol::record_batch::set_producer(&mut batch, producer_id, 0, sequence);
    produce(client, topic, 0, batch, -1).await
}

/// InitProducerId for a new idempotent producer (no transactional id).
fn new_producer_id() -> InitProducerIdRequest {
    InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

#[tokio::test]
async fn idempotent_retries_are_written_once_even_across_restarts() {
    let (broker, mut client) = start_with_topic(BrokerConfig::default(), "idem", 1).await;
    let init = client.call(new_producer_id(), 4).await;
    assert_eq!((init.error_code, init.producer_epoch), (0, 0));
    let pid = init.producer_id.0;
    let second = client.call(new_producer_id(), 4).await;
    assert_ne!(second.producer_id.0, pid, "producer ids are unique");

    let r = produce_idempotent(&mut client, "idem", pid, 0, &[b"a", b"b"]).await;
    assert_eq!((r.error_code, r.base_offset), (0, 0));
    let r = produce_idempotent(&mut client, "idem", pid, 0, &[b"a", b"b"]).await;
    assert_eq!(
        (r.error_code, r.base_offset),
        (0, 0),
        "a retry is acknowledged with its first offset"
    );
    let r = produce_idempotent(&mut client, "idem", pid, 5, &[b"gap"]).await;
    assert_eq!(r.error_code, ResponseError::OutOfOrderSequenceNumber.code());
    let r = produce_idempotent(&mut client, "idem", pid, 2, &[b"c"]).await;
    assert_eq!((r.error_code, r.base_offset), (0, 2));
    let (_, hw, _) = fetch_now(&mut client, "idem", 0, 0).await;
    assert_eq!(hw, 3, "the retry was not written");
    drop(client);

    // Restart with the snapshot, then without it (state rebuilt from the log alone).
    let mut dir = broker.stop().await;
    for remove_snapshot in [false, true] {
        if remove_snapshot {
            std::fs::remove_file(dir.path().join("idem-0").join("producer-state.json")).unwrap();
        }
        let broker = TestBroker::start_in(dir, BrokerConfig::default()).await;
        let mut client = Client::connect(broker.addr).await;
        let r = produce_idempotent(&mut client, "idem", pid, 2, &[b"c"]).await;
        assert_eq!(
            (r.error_code, r.base_offset),
            (0, 2),
            "retry after restart (snapshot removed: {remove_snapshot})"
        );
        let (_, hw, _) = fetch_now(&mut client, "idem", 0, 0).await;
        assert_eq!(hw, 3);
        drop(client);
        dir = broker.stop().await;
    }
}

/// An ApiVersions v0 request (which ignores its body) padded to `body_bytes`.
fn padded_api_versions(correlation_id: i32, body_bytes: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + body_bytes);
    frame.extend_from_slice(&(body_bytes as i32).to_be_bytes());
    frame.extend_from_slice(&[0, 18, 0, 0]); // ApiVersions v0
    frame.extend_from_slice(&correlation_id.to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // client id ""
    frame.resize(4 + body_bytes, 0);
    frame
}

#[tokio::test]
async fn large_frames_share_the_read_budget_and_small_ones_pass_them() {
    const FRAME: usize = 1 << 20;
    let config = BrokerConfig {
        max_request_bytes: FRAME,
        max_message_bytes: FRAME as i32,
        // One large frame at a time.
        queued_max_request_bytes: FRAME + FRAME / 2,
        connections_max_idle_ms: 1_000,
        ..BrokerConfig::default()
    };
    let broker = TestBroker::start(config).await;
    let started = Instant::now();

    // Takes the budget (more than one read buffer of its frame) and stalls.
    let mut hog = Client::connect(broker.addr).await;
    hog.stream
        .write_all(&padded_api_versions(1, FRAME)[..200 << 10])
        .await
        .unwrap();
    let hog_closed = tokio::spawn(async move {
        assert!(
            hog.read_frame().await.is_none(),
            "an unfinished frame was answered"
        );
        Instant::now()
    });

    // A whole large frame: it cannot be read past its first 64 KiB until the hog
    // is closed as idle and gives its reservation back.
    let waiter = tokio::spawn({
        let addr = broker.addr;
        async move {
            let mut client = Client::connect(addr).await;
            client
                .stream
                .write_all(&padded_api_versions(2, FRAME))
                .await
                .unwrap();
            let mut answer = client
                .read_frame()
                .await
                .expect("the large frame is answered");
            assert_eq!(answer.get_i32(), 2);
            Instant::now()
        }
    });

    // Small requests have their own lane: served while the large ones wait.
    let mut small = Client::connect(broker.addr).await;
    small.send_raw(&padded_api_versions(3, 1_000)[4..]).await;
    let mut answer = small
        .read_frame()
        .await
        .expect("a small request is answered");
    assert_eq!(answer.get_i32(), 3);
    let small_answered = Instant::now();

    let hog_closed = hog_closed.await.unwrap();
    let waiter_answered = waiter.await.unwrap();
    assert!(
        small_answered < hog_closed,
        "the small request waited for the hog ({:?} vs {:?})",
        small_answered - started,
        hog_closed - started
    );
    assert!(
        hog_closed >= started + Duration::from_millis(900),
        "the hog was closed before its idle time"
    );
    assert!(
        waiter_answered >= hog_closed,
        "the second large frame was read while the first held the budget"
    );
    broker.stop().await;
}
