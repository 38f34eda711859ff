//! The broker as librdkafka (through the `rdkafka` crate) sees it: produce with every
//! compression codec and read back exact bytes, consume from the end, and manage
//! topics with the admin API. Runs against the real `freshet serve` binary.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{parse_listening_line, wait_for, Broker, CONDITION_TIMEOUT};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, Timestamp, TopicPartitionList};

const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

/// One record as produced and as expected back.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Records that exercise what a broker could get wrong: every byte value, empty and
/// null keys and values, empty, null and repeated headers, and a value large and
/// repetitive enough that every codec really compresses it.
fn tricky_records(tag: &str) -> Vec<Record> {
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..200_000u32)
        .map(|i| (i % 251) as u8 ^ (i / 1000) as u8)
        .collect();
    let mut records = vec![
        Record {
            key: Some(b"k\x00\xff".to_vec()),
            value: Some(all_bytes.clone()),
            headers: vec![("h1".into(), Some(b"v1".to_vec()))],
        },
        Record {
            key: None,
            value: Some(b"no key".to_vec()),
            headers: vec![],
        },
        Record {
            key: Some(Vec::new()),
            value: Some(Vec::new()),
            headers: vec![],
        },
        Record {
            key: Some(b"null value".to_vec()),
            value: None,
            headers: vec![],
        },
        Record {
            key: Some(all_bytes.iter().rev().copied().collect()),
            value: Some(large),
            headers: vec![
                ("dup".into(), Some(b"1".to_vec())),
                ("dup".into(), Some(b"2".to_vec())),
                ("empty".into(), Some(Vec::new())),
                ("null".into(), None),
                ("bin\u{e9}".into(), Some(all_bytes)),
            ],
        },
    ];
    for i in 0..20 {
        records.push(Record {
            key: Some(format!("{tag}-key-{i}").into_bytes()),
            value: Some(format!("{tag}-value-{i}-{}", "x".repeat(i * 7)).into_bytes()),
            headers: vec![("i".into(), Some(i.to_string().into_bytes()))],
        });
    }
    records
}

fn config(broker: &Broker) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker.address);
    config
}

fn admin(broker: &Broker) -> AdminClient<DefaultClientContext> {
    config(broker).create().expect("create admin client")
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn create_topic(broker: &Broker, name: &str, partitions: i32) {
    let admin = admin(broker);
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = block_on(admin.create_topics([&topic], &AdminOptions::new()))
        .expect("CreateTopics request");
    assert_eq!(
        results,
        vec![Ok(name.to_owned())],
        "CreateTopics result for '{name}'"
    );
    // Metadata can trail the create on a real cluster; wait until it lists the topic.
    wait_for(&format!("metadata of '{name}'"), CONDITION_TIMEOUT, || {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .ok()?;
        let topic = metadata.topics().iter().find(|t| t.name() == name)?;
        (topic.error().is_none() && topic.partitions().len() == partitions as usize).then_some(())
    });
}

/// Where a record landed, (partition, offset), or why it did not.
type Outcome = Result<(i32, i64), String>;

/// Collects every delivery report, by record index.
#[derive(Default)]
struct Reports {
    reports: Mutex<Vec<(usize, Outcome)>>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<usize>) {
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((err, _)) => Err(err.to_string()),
        };
        self.reports
            .lock()
            .expect("reports lock")
            .push((*index, outcome));
    }
}

/// Produces `records` to partition 0 of `topic` with `codec`; returns the offset each
/// record got, in record order.
fn produce(broker: &Broker, topic: &str, codec: &str, records: &[Record]) -> Vec<i64> {
    let producer: BaseProducer<Reports> = config(broker)
        .set("compression.type", codec)
        .set("acks", "all")
        // Let records gather into multi-record batches, so compression covers several.
        .set("linger.ms", "20")
        .set("message.timeout.ms", "30000")
        .create_with_context(Reports::default())
        .expect("create producer");
    for (index, record) in records.iter().enumerate() {
        let mut base = BaseRecord::with_opaque_to(topic, Box::new(index)).partition(0);
        if let Some(key) = &record.key {
            base = base.key(key);
        }
        if let Some(value) = &record.value {
            base = base.payload(value);
        }
        if !record.headers.is_empty() {
            let mut headers = OwnedHeaders::new();
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: value.as_ref(),
                });
            }
            base = base.headers(headers);
        }
        producer
            .send(base)
            .map_err(|(err, _)| err)
            .expect("enqueue record");
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("flush: every record gets a delivery report");
    let mut reports =
        std::mem::take(&mut *producer.context().reports.lock().expect("reports lock"));
    assert_eq!(
        reports.len(),
        records.len(),
        "one delivery report per record"
    );
    reports.sort_by_key(|(index, _)| *index);
    reports
        .into_iter()
        .map(|(index, outcome)| match outcome {
            Ok((partition, offset)) => {
                assert_eq!(partition, 0, "record {index} went to partition 0 as asked");
                offset
            }
            Err(err) => panic!("record {index} ({codec}) was not delivered: {err}"),
        })
        .collect()
}

fn consumer(broker: &Broker, eof: bool) -> BaseConsumer {
    config(broker)
        // librdkafka needs a group id to assign(); the group is never joined.
        .set("group.id", "kafka-clients-test")
        // Verify every batch's CRC: the broker must serve batches exactly as stored.
        .set("check.crcs", "true")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .create()
        .expect("create consumer")
}

fn assign(consumer: &BaseConsumer, topic: &str, offset: Offset) {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, offset)
        .expect("partition offset");
    consumer.assign(&assignment).expect("assign");
}

/// Reads exactly `count` records (failing on any consumer error), then returns them
/// with their offsets.
fn consume(consumer: &BaseConsumer, count: usize) -> Vec<(i64, Record)> {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} records arrived in time",
            got.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(err)) => panic!("consumer error after {} records: {err}", got.len()),
            Some(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Record {
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                };
                assert_eq!(message.partition(), 0);
                got.push((message.offset(), record));
            }
        }
    }
    got
}

/// Polls until the consumer reports end of partition 0 of `topic`, failing on any
/// record, then checks the high watermark is `end_offset`.
fn wait_for_end(consumer: &BaseConsumer, topic: &str, end_offset: i64) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no end-of-partition event in time"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(0))) => break,
            Some(Err(err)) => panic!("consumer error while waiting for the end: {err}"),
            Some(Ok(message)) => panic!(
                "expected no more records, got offset {} (value {:?})",
                message.offset(),
                message.payload().map(String::from_utf8_lossy)
            ),
        }
    }
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("ListOffsets for watermarks");
    assert_eq!(high, end_offset, "high watermark of '{topic}' at the end");
}

#[test]
fn listening_line_parses() {
    assert_eq!(
        parse_listening_line("freshet listening on 127.0.0.1:40123, data in /tmp/x\n").as_deref(),
        Some("127.0.0.1:40123")
    );
    assert_eq!(
        parse_listening_line("freshet listening on 127.0.0.1:0, data in /tmp/x"),
        None
    );
    assert_eq!(parse_listening_line("something else"), None);
}

#[test]
fn every_codec_round_trips_exact_bytes_keys_headers_and_offsets() {
    let broker = Broker::start();
    for codec in CODECS {
        let topic = format!("codec-{codec}");
        create_topic(&broker, &topic, 1);
        let records = tricky_records(codec);

        let offsets = produce(&broker, &topic, codec, &records);
        let expected_offsets: Vec<i64> = (0..records.len() as i64).collect();
        assert_eq!(
            offsets, expected_offsets,
            "{codec}: offsets in delivery reports"
        );

        // A second produce call continues the same log.
        let more = tricky_records(&format!("{codec}-again"));
        let more_offsets = produce(&broker, &topic, codec, &more[..3]);
        let n = records.len() as i64;
        assert_eq!(
            more_offsets,
            vec![n, n + 1, n + 2],
            "{codec}: offsets continue"
        );

        let consumer = consumer(&broker, true);
        assign(&consumer, &topic, Offset::Beginning);
        let got = consume(&consumer, records.len() + 3);
        let expected: Vec<(i64, Record)> = records
            .iter()
            .chain(&more[..3])
            .cloned()
            .enumerate()
            .map(|(i, record)| (i as i64, record))
            .collect();
        for (got, expected) in got.iter().zip(&expected) {
            assert_eq!(got, expected, "{codec}: record at offset {}", expected.0);
        }
        assert_eq!(got.len(), expected.len());
        wait_for_end(&consumer, &topic, n + 3);

        // Starting in the middle of a (compressed) batch yields exactly the records
        // from that offset on.
        let consumer = consumer_from(&broker, &topic, Offset::Offset(4));
        let got = consume(&consumer, expected.len() - 4);
        assert_eq!(
            got,
            expected[4..].to_vec(),
            "{codec}: consuming from offset 4"
        );
    }
}

fn consumer_from(broker: &Broker, topic: &str, offset: Offset) -> BaseConsumer {
    let consumer = consumer(broker, true);
    assign(&consumer, topic, offset);
    consumer
}

#[test]
fn consuming_from_the_end_gets_only_records_produced_after() {
    let broker = Broker::start();
    let topic = "from-end";
    create_topic(&broker, topic, 1);
    let before: Vec<Record> = (0..3)
        .map(|i| Record {
            key: None,
            value: Some(format!("before-{i}").into_bytes()),
            headers: vec![],
        })
        .collect();
    assert_eq!(produce(&broker, topic, "none", &before), vec![0, 1, 2]);

    let consumer = consumer(&broker, true);
    assign(&consumer, topic, Offset::End);
    // End of partition means the consumer resolved "end" to offset 3 and fetched there:
    // only now is it certain that later records come after its position.
    wait_for_end(&consumer, topic, 3);

    let after: Vec<Record> = (0..2)
        .map(|i| Record {
            key: None,
            value: Some(format!("after-{i}").into_bytes()),
            headers: vec![],
        })
        .collect();
    assert_eq!(produce(&broker, topic, "lz4", &after), vec![3, 4]);
    let got = consume(&consumer, 2);
    assert_eq!(got, vec![(3, after[0].clone()), (4, after[1].clone())]);
    wait_for_end(&consumer, topic, 5);
}

#[test]
fn admin_creates_and_deletes_topics() {
    let broker = Broker::start();
    let admin = admin(&broker);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));

    let topics = [
        NewTopic::new("admin-a", 3, TopicReplication::Fixed(1)).set("retention.ms", "3600000"),
        NewTopic::new("admin-b", 1, TopicReplication::Fixed(1)),
    ];
    let results = block_on(admin.create_topics(&topics, &options)).expect("CreateTopics");
    assert_eq!(
        results,
        vec![Ok("admin-a".to_owned()), Ok("admin-b".to_owned())]
    );

    let partitions = |name: &str| -> Option<usize> {
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()?;
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len())
    };
    wait_for("admin-a with 3 partitions", CONDITION_TIMEOUT, || {
        (partitions("admin-a") == Some(3)).then_some(())
    });
    wait_for("admin-b with 1 partition", CONDITION_TIMEOUT, || {
        (partitions("admin-b") == Some(1)).then_some(())
    });

    let again = block_on(admin.create_topics(&topics[..1], &options)).expect("CreateTopics again");
    assert_eq!(
        again,
        vec![Err((
            "admin-a".to_owned(),
            RDKafkaErrorCode::TopicAlreadyExists
        ))]
    );

    let bad = NewTopic::new("admin-bad", 0, TopicReplication::Fixed(1));
    let bad_result =
        block_on(admin.create_topics([&bad], &options)).expect("CreateTopics with 0 partitions");
    assert_eq!(
        bad_result,
        vec![Err((
            "admin-bad".to_owned(),
            RDKafkaErrorCode::InvalidPartitions
        ))]
    );

    let deleted = block_on(admin.delete_topics(&["admin-a"], &options)).expect("DeleteTopics");
    assert_eq!(deleted, vec![Ok("admin-a".to_owned())]);
    wait_for(
        "admin-a to disappear from metadata",
        CONDITION_TIMEOUT,
        || {
            let metadata = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(5))
                .ok()?;
            let names: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
            assert!(
                names.contains(&"admin-b"),
                "deleting admin-a must leave admin-b: {names:?}"
            );
            (!names.contains(&"admin-a")).then_some(())
        },
    );

    let missing =
        block_on(admin.delete_topics(&["admin-a"], &options)).expect("DeleteTopics again");
    assert_eq!(
        missing,
        vec![Err((
            "admin-a".to_owned(),
            RDKafkaErrorCode::UnknownTopicOrPartition
        ))]
    );

    // A deleted topic's name can be used again, starting from an empty log.
    create_topic(&broker, "admin-a", 1);
    let consumer = consumer(&broker, true);
    assign(&consumer, "admin-a", Offset::Beginning);
    wait_for_end(&consumer, "admin-a", 0);
}

/// Produces one record with an explicit create time; returns the delivery report's
/// timestamp.
fn produce_with_timestamp(
    broker: &Broker,
    topic: &str,
    codec: &str,
    value: &str,
    timestamp_ms: i64,
) -> Timestamp {
    let producer: BaseProducer = config(broker)
        .set("compression.type", codec)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    producer
        .send(
            BaseRecord::<(), str>::to(topic)
                .payload(value)
                .partition(0)
                .timestamp(timestamp_ms),
        )
        .map_err(|(err, _)| err)
        .expect("enqueue record");
    producer.flush(Duration::from_secs(60)).expect("flush");
    // BaseProducer's default context drops delivery reports; read the record back.
    let consumer = consumer(broker, false);
    assign(&consumer, topic, Offset::Beginning);
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "record '{value}' not consumed in time"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.payload() == Some(value.as_bytes()) => {
                return message.timestamp()
            }
            Some(Err(err)) => panic!("consumer error: {err}"),
            _ => {}
        }
    }
}

#[test]
fn the_producers_create_time_is_kept() {
    let broker = Broker::start();
    create_topic(&broker, "create-time", 1);
    let long_ago_ms = 1_000_000_000_000; // 2001-09-09
    for (i, codec) in CODECS.iter().enumerate() {
        let value = format!("created long ago, {codec}");
        let stamp = produce_with_timestamp(
            &broker,
            "create-time",
            codec,
            &value,
            long_ago_ms + i as i64,
        );
        assert_eq!(
            stamp,
            Timestamp::CreateTime(long_ago_ms + i as i64),
            "{codec}: the producer's create time"
        );
    }
}
