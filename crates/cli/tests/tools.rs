//! The `freshet topic/produce/consume` tools end to end, against the real broker.

mod common;

use common::{create_topic, tool, wait_for, Broker, CONDITION_TIMEOUT};

/// `freshet consume TOPIC ARGS`, which must succeed: what it printed.
fn consume(broker: &Broker, topic: &str, args: &[&str]) -> String {
    let mut full = vec!["consume", topic];
    full.extend(args);
    let out = tool(broker, &full, b"");
    out.assert_success(&format!("consume {topic} {args:?}"));
    out.stdout_text()
}

#[test]
fn create_produce_consume_with_the_tools() {
    let broker = Broker::start();
    let created = tool(
        &broker,
        &[
            "topic",
            "create",
            "tools",
            "--partitions",
            "1",
            "--replication-factor",
            "1",
        ],
        b"",
    );
    created.assert_success("topic create");
    assert_eq!(created.stdout_text(), "created topic 'tools'\n");

    let listed = tool(&broker, &["topic", "list"], b"");
    listed.assert_success("topic list");
    assert!(
        listed.stdout_text().lines().any(|line| line == "tools"),
        "list: {}",
        listed.stdout_text()
    );
    let long = tool(&broker, &["topic", "list", "--long"], b"");
    long.assert_success("topic list --long");
    assert!(
        long.stdout_text().lines().any(|line| line == "tools\t1"),
        "list --long: {}",
        long.stdout_text()
    );

    let input = b"k1:v1\nk2:v2:with:colons\nno separator\n:empty key\nk5:\n";
    let produced = tool(
        &broker,
        &[
            "produce",
            "tools",
            "--key-separator",
            ":",
            "--header",
            "src=cli",
        ],
        input,
    );
    produced.assert_success("produce");
    assert_eq!(
        produced.stdout_text(),
        "",
        "produce prints nothing on success"
    );

    let consumed = consume(
        &broker,
        "tools",
        &[
            "--from-beginning",
            "-n",
            "5",
            "--format",
            "%k=%v %h\\n",
            "--timeout-ms",
            "20000",
        ],
    );
    assert_eq!(
        consumed,
        "k1=v1 src=cli\nk2=v2:with:colons src=cli\n=no separator src=cli\n=empty key src=cli\nk5= src=cli\n"
    );

    // Offsets, partition and escapes; --exit stops at the end without -n.
    let offsets = consume(
        &broker,
        "tools",
        &["--offset", "3", "--exit", "--format", "%p/%o\\t%v|"],
    );
    assert_eq!(offsets, "0/3\tempty key|0/4\t|");

    // Timestamps are the producer's create time: recent, in milliseconds.
    let stamped = consume(
        &broker,
        "tools",
        &["--from-beginning", "-e", "--format", "%t\\n"],
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    let stamps: Vec<i64> = stamped
        .lines()
        .map(|line| line.parse().expect("a number"))
        .collect();
    assert_eq!(stamps.len(), 5);
    for stamp in stamps {
        assert!(
            (now_ms - 600_000..=now_ms).contains(&stamp),
            "timestamp {stamp} not within 10 min before {now_ms}"
        );
    }
}

#[test]
fn creating_an_existing_topic_fails_with_the_kafka_error_name() {
    let broker = Broker::start();
    create_topic(&broker, "twice", 2);
    let again = tool(
        &broker,
        &["topic", "create", "twice", "--partitions", "2"],
        b"",
    );
    let line = again.assert_one_error_line("second create");
    assert_eq!(again.stdout_text(), "");
    assert!(
        line.starts_with("freshet: topic create failed: TOPIC_ALREADY_EXISTS: "),
        "error line: {:?}",
        line
    );
    assert!(
        line.contains("'twice'"),
        "error names the topic: {:?}",
        line
    );

    let missing = tool(
        &broker,
        &["consume", "no-such-topic", "--from-beginning", "-e"],
        b"",
    );
    missing.assert_one_error_line("consuming a missing topic");
    assert!(
        missing.stderr.contains("UNKNOWN_TOPIC_OR_PARTITION"),
        "stderr: {:?}",
        missing.stderr
    );

    // Describing or altering a missing topic fails, and does not create it on the way.
    for args in [
        &["topic", "describe", "no-such-topic"][..],
        &[
            "topic",
            "alter-config",
            "no-such-topic",
            "--set",
            "retention.ms=1000",
        ][..],
    ] {
        let out = tool(&broker, args, b"");
        out.assert_one_error_line(&format!("{args:?}"));
        assert!(
            out.stderr.contains("UNKNOWN_TOPIC_OR_PARTITION"),
            "{args:?}: {:?}",
            out.stderr
        );
    }
    let listed = tool(&broker, &["topic", "list"], b"");
    listed.assert_success("list");
    assert_eq!(
        listed.stdout_text(),
        "twice\n",
        "nothing but 'twice' was created"
    );

    let bad_config = tool(
        &broker,
        &[
            "topic",
            "create",
            "bad-config",
            "--config",
            "retention.ms=soon",
        ],
        b"",
    );
    assert!(
        !bad_config.status.success(),
        "an invalid config value must fail: {bad_config:?}"
    );
    assert!(
        bad_config
            .stderr
            .starts_with("freshet: topic create failed: INVALID_CONFIG: "),
        "{:?}",
        bad_config.stderr
    );
    assert!(
        bad_config.stderr.contains("retention.ms"),
        "the message names the config: {:?}",
        bad_config.stderr
    );

    let deleted = tool(&broker, &["topic", "delete", "no-such-topic"], b"");
    assert!(
        !deleted.status.success(),
        "deleting a missing topic must fail: {deleted:?}"
    );
    assert!(
        deleted.stderr.contains("UNKNOWN_TOPIC_OR_PARTITION"),
        "stderr: {:?}",
        deleted.stderr
    );
}

#[test]
fn every_compression_codec_through_the_tools() {
    let broker = Broker::start();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("tools-{codec}");
        create_topic(&broker, &topic, 1);
        // Repetitive lines so the batch really compresses.
        let input: String = (0..200)
            .map(|i| format!("key-{i}|{codec} value {i} {}\n", "abc".repeat(i % 13)))
            .collect();
        tool(
            &broker,
            &[
                "produce",
                &topic,
                "--key-separator",
                "|",
                "--compression",
                codec,
                "--acks",
                "1",
            ],
            input.as_bytes(),
        )
        .assert_success("produce");
        let consumed = consume(
            &broker,
            &topic,
            &["--from-beginning", "-e", "--format", "%k|%v\\n"],
        );
        assert_eq!(consumed, input, "{codec}: every line back, in order");
    }
}

#[test]
fn describe_alter_config_and_delete_with_the_tools() {
    let broker = Broker::start();
    tool(
        &broker,
        &[
            "topic",
            "create",
            "cfg",
            "--partitions",
            "2",
            "--config",
            "retention.ms=86400000",
        ],
        b"",
    )
    .assert_success("create with config");
    tool(
        &broker,
        &["produce", "cfg", "--partition", "1"],
        b"a\nb\nc\n",
    )
    .assert_success("produce to partition 1");

    let described = tool(&broker, &["topic", "describe", "cfg"], b"");
    described.assert_success("describe");
    let text = described.stdout_text();
    assert!(
        text.starts_with("Topic: cfg\tPartitionCount: 2\tReplicationFactor: 1\n"),
        "describe:\n{text}"
    );
    let partition_line = |id: i32| {
        text.lines()
            .find(|line| line.starts_with(&format!("\tPartition: {id}\t")))
            .unwrap_or_else(|| panic!("no line for partition {id}:\n{text}"))
            .to_owned()
    };
    assert!(
        partition_line(0).ends_with("\tLogStartOffset: 0\tLogEndOffset: 0"),
        "{}",
        partition_line(0)
    );
    assert!(
        partition_line(1).ends_with("\tLogStartOffset: 0\tLogEndOffset: 3"),
        "{}",
        partition_line(1)
    );
    assert!(
        text.lines()
            .any(|line| line == "\tretention.ms=86400000\t(topic)"),
        "describe:\n{text}"
    );

    tool(
        &broker,
        &[
            "topic",
            "alter-config",
            "cfg",
            "--set",
            "retention.ms=1234567",
            "--set",
            "cleanup.policy=delete",
        ],
        b"",
    )
    .assert_success("alter-config --set");
    let config_line = |key: &str| -> Option<String> {
        let out = tool(&broker, &["topic", "describe", "cfg"], b"");
        out.assert_success("describe");
        out.stdout_text()
            .lines()
            .find(|line| line.starts_with(&format!("\t{key}=")))
            .map(str::to_owned)
    };
    assert_eq!(
        config_line("retention.ms").as_deref(),
        Some("\tretention.ms=1234567\t(topic)")
    );

    tool(
        &broker,
        &["topic", "alter-config", "cfg", "--delete", "retention.ms"],
        b"",
    )
    .assert_success("alter-config --delete");
    let after = config_line("retention.ms");
    assert!(
        after
            .as_deref()
            .is_none_or(|line| !line.ends_with("(topic)")),
        "retention.ms still a topic override after --delete: {after:?}"
    );
    assert_eq!(
        config_line("cleanup.policy").as_deref(),
        Some("\tcleanup.policy=delete\t(topic)"),
        "other keys kept"
    );

    // --validate-only creates nothing.
    let validated = tool(
        &broker,
        &[
            "topic",
            "create",
            "checked",
            "--partitions",
            "3",
            "--validate-only",
        ],
        b"",
    );
    validated.assert_success("create --validate-only");
    assert_eq!(
        validated.stdout_text(),
        "topic 'checked' is valid (not created)\n"
    );
    let listed = tool(&broker, &["topic", "list"], b"");
    listed.assert_success("list");
    assert!(
        !listed.stdout_text().lines().any(|line| line == "checked"),
        "validate-only created it:\n{}",
        listed.stdout_text()
    );

    // Without --partitions/--replication-factor the cluster's defaults apply.
    tool(&broker, &["topic", "create", "defaults"], b"")
        .assert_success("create with cluster defaults");
    let described = tool(&broker, &["topic", "describe", "defaults"], b"");
    described.assert_success("describe defaults");
    let first = described
        .stdout_text()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        first.starts_with("Topic: defaults\tPartitionCount: "),
        "{first}"
    );
    assert!(!first.contains("PartitionCount: 0\t"), "{first}");
    assert!(first.ends_with("\tReplicationFactor: 1"), "{first}");

    let deleted = tool(&broker, &["topic", "delete", "cfg"], b"");
    deleted.assert_success("delete");
    assert_eq!(deleted.stdout_text(), "deleted topic 'cfg'\n");
    wait_for(
        "cfg to disappear from topic list",
        CONDITION_TIMEOUT,
        || {
            let listed = tool(&broker, &["topic", "list"], b"");
            listed.assert_success("list");
            (!listed.stdout_text().lines().any(|line| line == "cfg")).then_some(())
        },
    );
}

#[test]
fn produce_reports_failure_with_one_line() {
    let broker = Broker::start();
    // A record for a partition the topic does not have cannot be delivered.
    create_topic(&broker, "one-partition", 1);
    let out = tool(
        &broker,
        &[
            "produce",
            "one-partition",
            "--partition",
            "7",
            "-X",
            "message.timeout.ms=3000",
        ],
        b"x\n",
    );
    let line = out.assert_one_error_line("producing to a missing partition");
    assert!(
        line.starts_with("freshet: produce failed: 1 of 1 records not delivered"),
        "{:?}",
        line
    );
    assert!(line.contains("_UNKNOWN_PARTITION"), "{:?}", line);
}

#[test]
fn produce_with_acks_0_delivers() {
    let broker = Broker::start();
    create_topic(&broker, "fire-and-forget", 1);
    let input: String = (0..300)
        .map(|i| format!("k{i}|acks-0 value {i}\n"))
        .collect();
    let produced = tool(
        &broker,
        &[
            "produce",
            "fire-and-forget",
            "--acks",
            "0",
            "--key-separator",
            "|",
        ],
        input.as_bytes(),
    );
    produced.assert_success("produce --acks 0");
    assert_eq!(produced.stdout_text(), "");
    // Nothing acknowledges acks=0 records: wait until the broker has stored them all.
    let consumed = consume(
        &broker,
        "fire-and-forget",
        &[
            "--from-beginning",
            "-n",
            "300",
            "--timeout-ms",
            "20000",
            "--format",
            "%o %k|%v\\n",
        ],
    );
    let want: String = (0..300)
        .map(|i| format!("{i} k{i}|acks-0 value {i}\n"))
        .collect();
    assert_eq!(consumed, want, "every record, once, in order");
}

#[test]
fn produce_refused_by_the_cluster_prints_one_line_with_the_kafka_error() {
    let broker = Broker::start();
    tool(
        &broker,
        &[
            "topic",
            "create",
            "small-records",
            "--partitions",
            "1",
            "--config",
            "max.message.bytes=1000",
        ],
        b"",
    )
    .assert_success("create with max.message.bytes");
    // Far below librdkafka's own message.max.bytes, so only the broker can refuse it.
    let big = format!("{}\n", "x".repeat(5000));
    let refused = tool(&broker, &["produce", "small-records"], big.as_bytes());
    let line = refused.assert_one_error_line("a record above the topic's max.message.bytes");
    assert_eq!(refused.stdout_text(), "");
    assert!(
        line.starts_with(
            "freshet: produce failed: 1 of 1 records not delivered, first: MESSAGE_TOO_LARGE: "
        ),
        "{:?}",
        line
    );
    assert!(line.contains("(line 1)"), "{:?}", line);

    // Nothing was stored, and a record within the limit still goes through.
    tool(&broker, &["produce", "small-records"], b"fits\n").assert_success("small produce");
    let consumed = consume(
        &broker,
        "small-records",
        &["--from-beginning", "-e", "--format", "%o:%v\\n"],
    );
    assert_eq!(consumed, "0:fits\n");
}

/// A record to produce with everything `--format` can show set to a known value.
struct Known {
    partition: i32,
    key: Option<&'static str>,
    value: &'static str,
    timestamp_ms: i64,
    headers: &'static [(&'static str, &'static str)],
}

/// Produces `records` in order through librdkafka, each with its create time, and
/// fails the test unless every one is acknowledged.
fn produce_known(broker: &Broker, topic: &str, records: &[Known]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Acks {
        delivered: AtomicUsize,
    }
    impl rdkafka::ClientContext for Acks {}
    impl ProducerContext for Acks {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if let Err((err, _)) = result {
                panic!("record not delivered: {err}");
            }
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    let producer: BaseProducer<Acks> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("acks", "all")
        // One in flight at a time: the records land in the order given.
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "30000")
        .create_with_context(Acks::default())
        .expect("create producer");
    for record in records {
        let mut base = BaseRecord::to(topic)
            .partition(record.partition)
            .payload(record.value)
            .timestamp(record.timestamp_ms);
        if let Some(key) = record.key {
            base = base.key(key);
        }
        if !record.headers.is_empty() {
            let mut headers = OwnedHeaders::new();
            for (key, value) in record.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(*value),
                });
            }
            base = base.headers(headers);
        }
        producer
            .send(base)
            .map_err(|(err, _)| err)
            .expect("enqueue record");
        producer.poll(std::time::Duration::ZERO);
    }
    producer
        .flush(std::time::Duration::from_secs(60))
        .expect("flush");
    assert_eq!(
        producer.context().delivered.load(Ordering::Relaxed),
        records.len(),
        "every record acknowledged"
    );
}

#[test]
fn consume_from_an_offset_with_every_format_field() {
    let broker = Broker::start();
    create_topic(&broker, "known", 2);
    let t0 = 1_600_000_000_000i64;
    let records: Vec<Known> = (0..4)
        .flat_map(|i| {
            [
                Known {
                    partition: 0,
                    key: Some(["a", "b", "c", "d"][i]),
                    value: ["zero", "one", "two", "three"][i],
                    timestamp_ms: t0 + i as i64,
                    headers: [
                        &[("h", "1")][..],
                        &[][..],
                        &[("x", "y"), ("h", "2")][..],
                        &[("h", "")][..],
                    ][i],
                },
                Known {
                    partition: 1,
                    key: [None, Some("k1"), Some(""), Some("k3")][i],
                    value: ["p1-0", "p1-1", "p1-2", "p1-3"][i],
                    timestamp_ms: t0 + 1000 + i as i64,
                    headers: &[("p", "1")],
                },
            ]
        })
        .collect();
    produce_known(&broker, "known", &records);

    let format = "%p/%o@%t %k=%v [%h] 100%%\\n";
    let partition0 = consume(
        &broker,
        "known",
        &[
            "--partition",
            "0",
            "--offset",
            "1",
            "--exit",
            "--format",
            format,
        ],
    );
    assert_eq!(
        partition0,
        "0/1@1600000000001 b=one [] 100%\n\
         0/2@1600000000002 c=two [x=y,h=2] 100%\n\
         0/3@1600000000003 d=three [h=] 100%\n"
    );

    // --offset N applies to every partition; their records interleave in any order.
    let both = consume(
        &broker,
        "known",
        &["--offset", "2", "-n", "4", "--format", format],
    );
    let mut lines: Vec<String> = both.lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "0/2@1600000000002 c=two [x=y,h=2] 100%",
            "0/3@1600000000003 d=three [h=] 100%",
            "1/2@1600000001002 =p1-2 [p=1] 100%",
            "1/3@1600000001003 k3=p1-3 [p=1] 100%",
        ]
    );

    // A negative offset counts back from the end of each partition.
    let tail = consume(
        &broker,
        "known",
        &[
            "--partition",
            "1",
            "--offset",
            "-2",
            "--exit",
            "--format",
            format,
        ],
    );
    assert_eq!(
        tail,
        "1/2@1600000001002 =p1-2 [p=1] 100%\n1/3@1600000001003 k3=p1-3 [p=1] 100%\n"
    );

    // An offset past the end is the user's mistake: one line, non-zero exit.
    let beyond = tool(
        &broker,
        &[
            "consume",
            "known",
            "--partition",
            "0",
            "--offset",
            "10",
            "--exit",
        ],
        b"",
    );
    beyond.assert_one_error_line("--offset past the end");
    assert_eq!(beyond.stdout_text(), "");
    assert!(
        beyond
            .stderr
            .starts_with("freshet: consume failed: OFFSET_OUT_OF_RANGE: "),
        "names the Kafka error: {:?}",
        beyond.stderr
    );
    assert!(
        beyond
            .stderr
            .contains("--offset 10 is outside a partition's log"),
        "{:?}",
        beyond.stderr
    );
}
