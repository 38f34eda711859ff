//! `freshet group list/describe/reset-offsets` end to end: a real rdkafka consumer is a
//! member of the group while the tools look at it, against the real broker binary.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{create_topic, wait_for, Broker, ToolOutput, CONDITION_TIMEOUT};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TOPIC: &str = "orders";
const GROUP: &str = "g1";
const CLIENT_ID: &str = "group-tools-test";
/// Records produced to partitions 0, 1, 2: all different, so a lag computed against
/// the wrong partition shows.
const LOG_END: [i64; 3] = [4, 5, 6];
/// What the member commits for every partition, below every log end.
const COMMITTED: i64 = 2;

/// The broker, without the 3 s wait before a new group's first rebalance.
fn start_broker() -> Broker {
    Broker::start_with_env(&[("FRESHET_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")])
}

/// `freshet ARGS --brokers ADDR`, with nothing on stdin.
fn tool(broker: &Broker, args: &[&str]) -> ToolOutput {
    common::tool(broker, args, b"")
}

/// `group describe` output, each line's `Key: value` fields in a map.
#[derive(Debug)]
struct Described {
    group: BTreeMap<String, String>,
    members: Vec<BTreeMap<String, String>>,
    offsets: Vec<BTreeMap<String, String>>,
}

impl Described {
    /// The offsets line of one partition of [`TOPIC`].
    fn partition(&self, partition: i32) -> Option<&BTreeMap<String, String>> {
        self.offsets
            .iter()
            .find(|line| line["Topic"] == TOPIC && line["Partition"] == partition.to_string())
    }

    /// (committed, log end, lag) of every partition of [`TOPIC`], by partition.
    fn lags(&self) -> Vec<(i64, i64, i64)> {
        (0..3)
            .map(|partition| {
                let line = self
                    .partition(partition)
                    .unwrap_or_else(|| panic!("no offsets for partition {partition}: {self:?}"));
                let number = |key: &str| -> i64 {
                    line[key]
                        .parse()
                        .unwrap_or_else(|_| panic!("{key} is not a number: {line:?}"))
                };
                (number("Committed"), number("LogEnd"), number("Lag"))
            })
            .collect()
    }
}

fn fields(line: &str) -> BTreeMap<String, String> {
    line.trim_start_matches('\t')
        .split('\t')
        .map(|field| {
            let (key, value) = field
                .split_once(": ")
                .or_else(|| field.strip_suffix(':').map(|key| (key, "")))
                .unwrap_or_else(|| panic!("field without 'Key: ' in {line:?}"));
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn describe(broker: &Broker, group: &str) -> Described {
    let out = tool(broker, &["group", "describe", group]);
    out.assert_success("group describe");
    let text = out.stdout_text();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_else(|| panic!("empty describe"));
    assert!(first.starts_with(&format!("Group: {group}\t")), "{text}");
    let mut described = Described {
        group: fields(first),
        members: Vec::new(),
        offsets: Vec::new(),
    };
    for line in lines {
        if line.starts_with("\tMember: ") {
            described.members.push(fields(line));
        } else if line.starts_with("\tTopic: ") {
            described.offsets.push(fields(line));
        } else {
            panic!("unexpected describe line {line:?} in:\n{text}");
        }
    }
    assert_eq!(
        described.group["Members"],
        described.members.len().to_string(),
        "member count and member lines agree: {text}"
    );
    described
}

fn reset(broker: &Broker, extra: &[&str]) -> ToolOutput {
    let mut args = vec!["group", "reset-offsets", GROUP, "--topic", TOPIC];
    args.extend(extra);
    tool(broker, &args)
}

/// The table `reset-offsets` prints for partitions → offsets.
fn reset_table(offsets: &[(i32, i64)]) -> String {
    let mut table = "TOPIC\tPARTITION\tNEW-OFFSET\n".to_owned();
    for (partition, offset) in offsets {
        table.push_str(&format!("{TOPIC}\t{partition}\t{offset}\n"));
    }
    table
}

/// A member of [`GROUP`] that has consumed every record and committed [`COMMITTED`]
/// (with metadata `meta-P`) for every partition.
fn join_consume_and_commit(broker: &Broker) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", GROUP)
        .set("client.id", CLIENT_ID)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the group member");
    consumer.subscribe(&[TOPIC]).expect("subscribe");

    let expected: i64 = LOG_END.iter().sum();
    let mut received = [0i64; 3];
    let mut last_error = None;
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    while received.iter().sum::<i64>() < expected {
        assert!(
            Instant::now() < deadline,
            "consumed {received:?} of {LOG_END:?} records in {CONDITION_TIMEOUT:?}; \
             last error: {last_error:?}"
        );
        match consumer.poll(std::time::Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let partition = message.partition() as usize;
                assert_eq!(message.topic(), TOPIC);
                assert_eq!(message.offset(), received[partition], "in order, no gaps");
                received[partition] += 1;
            }
            // Transient while the group forms (e.g. the coordinator is being looked
            // up); kept for the failure message.
            Some(Err(err)) => last_error = Some(err),
            None => {}
        }
    }
    assert_eq!(received, LOG_END);

    let mut commit = TopicPartitionList::new();
    for partition in 0..3 {
        let mut element = commit.add_partition(TOPIC, partition);
        element
            .set_offset(Offset::Offset(COMMITTED))
            .expect("set offset");
        element.set_metadata(format!("meta-{partition}"));
    }
    consumer
        .commit(&commit, CommitMode::Sync)
        .expect("the member's commit");
    consumer
}

#[test]
fn list_describe_and_reset_a_consumer_group() {
    let broker = start_broker();
    create_topic(&broker, TOPIC, 3);
    for (partition, count) in LOG_END.iter().enumerate() {
        let input: String = (0..*count).map(|i| format!("p{partition}-{i}\n")).collect();
        let out = common::tool(
            &broker,
            &["produce", TOPIC, "--partition", &partition.to_string()],
            input.as_bytes(),
        );
        out.assert_success("produce");
    }

    let member = join_consume_and_commit(&broker);

    // While the consumer is a member.
    wait_for("g1 listed as Stable", CONDITION_TIMEOUT, || {
        let listed = tool(&broker, &["group", "list"]);
        listed.assert_success("group list");
        listed
            .stdout_text()
            .lines()
            .any(|line| line == "g1\tStable\tconsumer")
            .then_some(())
    });
    let described = describe(&broker, GROUP);
    assert_eq!(described.group["State"], "Stable", "{described:?}");
    assert_eq!(described.group["ProtocolType"], "consumer", "{described:?}");
    assert!(!described.group["Protocol"].is_empty(), "{described:?}");
    assert_eq!(described.members.len(), 1, "{described:?}");
    let only = &described.members[0];
    assert_eq!(only["ClientId"], CLIENT_ID);
    assert_eq!(only["Assignment"], "orders:0,1,2");
    assert!(
        !only["Member"].is_empty() && !only["Host"].is_empty(),
        "{only:?}"
    );
    assert_eq!(
        described.lags(),
        LOG_END
            .iter()
            .map(|end| (COMMITTED, *end, end - COMMITTED))
            .collect::<Vec<_>>()
    );
    for partition in 0..3 {
        assert_eq!(
            described.partition(partition).expect("offsets line")["Metadata"],
            format!("meta-{partition}")
        );
    }
    assert_eq!(described.offsets.len(), 3, "only orders has offsets");

    let refused = reset(&broker, &["--to-earliest"]);
    let line = refused.assert_one_error_line("reset while the group has a member");
    assert_eq!(refused.stdout_text(), "");
    assert!(
        line.starts_with("freshet: group reset-offsets failed: group 'g1' is active"),
        "{:?}",
        line
    );
    assert!(line.contains("Stable"), "{:?}", line);
    assert_eq!(
        describe(&broker, GROUP).lags()[0].0,
        COMMITTED,
        "a refused reset commits nothing"
    );

    // The member leaves; the group stays, Empty, with its offsets.
    drop(member);
    let empty = wait_for("g1 to become Empty", CONDITION_TIMEOUT, || {
        let described = describe(&broker, GROUP);
        (described.group["State"] == "Empty").then_some(described)
    });
    assert!(empty.members.is_empty(), "{empty:?}");
    assert_eq!(
        empty.lags()[2],
        (COMMITTED, LOG_END[2], LOG_END[2] - COMMITTED)
    );
    let listed = tool(&broker, &["group", "list"]);
    listed.assert_success("group list");
    assert!(
        listed
            .stdout_text()
            .lines()
            .any(|line| line.starts_with("g1\tEmpty\t")),
        "{}",
        listed.stdout_text()
    );

    let earliest = reset(&broker, &["--to-earliest"]);
    earliest.assert_success("reset --to-earliest");
    assert_eq!(
        earliest.stdout_text(),
        reset_table(&[(0, 0), (1, 0), (2, 0)])
    );
    assert_eq!(
        earliest.stderr, "",
        "nothing clamped, nothing to warn about"
    );
    let after = describe(&broker, GROUP);
    assert_eq!(
        after.lags(),
        LOG_END
            .iter()
            .map(|end| (0, *end, *end))
            .collect::<Vec<_>>()
    );
    assert_eq!(after.partition(0).expect("offsets line")["Metadata"], "");

    // Past the end of partition 1 only: clamped to its log end, with a warning.
    let clamped = reset(&broker, &["--to-offset", "100", "--partition", "1"]);
    clamped.assert_success("reset --to-offset 100 --partition 1");
    assert_eq!(clamped.stdout_text(), reset_table(&[(1, LOG_END[1])]));
    assert_eq!(clamped.stderr.lines().count(), 1, "{:?}", clamped.stderr);
    assert!(
        clamped
            .stderr
            .starts_with("freshet: warning: offset 100 is outside orders partition 1"),
        "{:?}",
        clamped.stderr
    );
    assert_eq!(
        describe(&broker, GROUP).lags(),
        vec![(0, 4, 4), (LOG_END[1], LOG_END[1], 0), (0, 6, 6)]
    );

    let in_range = reset(&broker, &["--to-offset", "3"]);
    in_range.assert_success("reset --to-offset 3");
    assert_eq!(
        in_range.stdout_text(),
        reset_table(&[(0, 3), (1, 3), (2, 3)])
    );
    assert_eq!(in_range.stderr, "");
    assert_eq!(
        describe(&broker, GROUP).lags(),
        LOG_END
            .iter()
            .map(|end| (3, *end, end - 3))
            .collect::<Vec<_>>()
    );

    let latest = reset(&broker, &["--to-latest"]);
    latest.assert_success("reset --to-latest");
    assert_eq!(
        latest.stdout_text(),
        reset_table(&[(0, LOG_END[0]), (1, LOG_END[1]), (2, LOG_END[2])])
    );
    let at_end: Vec<(i64, i64, i64)> = LOG_END.iter().map(|end| (*end, *end, 0)).collect();
    assert_eq!(describe(&broker, GROUP).lags(), at_end);

    // A dry run prints what it would do and changes nothing.
    let dry = reset(&broker, &["--to-earliest", "--dry-run"]);
    dry.assert_success("reset --dry-run");
    assert_eq!(dry.stdout_text(), reset_table(&[(0, 0), (1, 0), (2, 0)]));
    assert_eq!(describe(&broker, GROUP).lags(), at_end);
}

#[test]
fn unknown_groups_and_cluster_errors() {
    let broker = start_broker();
    create_topic(&broker, TOPIC, 1);

    let listed = tool(&broker, &["group", "list"]);
    listed.assert_success("group list");
    assert_eq!(listed.stdout_text(), "", "no groups yet");

    let unknown = describe(&broker, "nope");
    assert_eq!(unknown.group["State"], "Dead", "{unknown:?}");
    assert_eq!(unknown.group["Members"], "0");
    assert!(unknown.members.is_empty() && unknown.offsets.is_empty());
    let listed = tool(&broker, &["group", "list"]);
    listed.assert_success("group list");
    assert_eq!(listed.stdout_text(), "", "describing created no group");

    // The cluster's error, by its Kafka name, on one line.
    let missing = tool(
        &broker,
        &[
            "group",
            "reset-offsets",
            "nope",
            "--topic",
            "no-such-topic",
            "--to-latest",
        ],
    );
    let line = missing.assert_one_error_line("reset-offsets of a missing topic");
    assert_eq!(missing.stdout_text(), "");
    assert!(
        line.starts_with("freshet: group reset-offsets failed: UNKNOWN_TOPIC_OR_PARTITION: "),
        "{:?}",
        line
    );
    let no_partition = tool(
        &broker,
        &[
            "group",
            "reset-offsets",
            "nope",
            "--topic",
            TOPIC,
            "--to-latest",
            "--partition",
            "5",
        ],
    );
    assert!(!no_partition.status.success(), "{no_partition:?}");
    assert!(
        no_partition.stderr.contains("_UNKNOWN_PARTITION"),
        "{:?}",
        no_partition.stderr
    );

    // Resetting an unknown group's offsets creates it, Empty, like a commit does.
    let created = tool(
        &broker,
        &[
            "group",
            "reset-offsets",
            "fresh",
            "--topic",
            TOPIC,
            "--to-earliest",
        ],
    );
    created.assert_success("reset an unknown group");
    assert_eq!(
        created.stdout_text(),
        format!("TOPIC\tPARTITION\tNEW-OFFSET\n{TOPIC}\t0\t0\n")
    );
    let fresh = describe(&broker, "fresh");
    assert_eq!(fresh.group["State"], "Empty", "{fresh:?}");
    assert_eq!(fresh.offsets.len(), 1, "{fresh:?}");
}

/// Partitions a member is assigned but has not committed are shown, as
/// kafka-consumer-groups shows them: "-" for the committed offset and the lag.
#[test]
fn assigned_partitions_without_a_commit_are_shown_with_dashes() {
    const TOPIC: &str = "uncommitted";
    const GROUP: &str = "g-dash";
    let broker = start_broker();
    create_topic(&broker, TOPIC, 3);
    let out = common::tool(&broker, &["produce", TOPIC, "--partition", "1"], b"a\nb\n");
    out.assert_success("produce");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", GROUP)
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the group member");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    wait_for("the member's assignment", CONDITION_TIMEOUT, || {
        consumer.poll(std::time::Duration::from_millis(100));
        let assigned = consumer.assignment().expect("assignment");
        (assigned.count() == 3).then_some(())
    });
    let lines = |described: &Described| -> Vec<(String, String, String, String)> {
        described
            .offsets
            .iter()
            .filter(|line| line["Topic"] == TOPIC)
            .map(|line| {
                (
                    line["Partition"].clone(),
                    line["Committed"].clone(),
                    line["LogEnd"].clone(),
                    line["Lag"].clone(),
                )
            })
            .collect()
    };
    let row = |p: &str, committed: &str, end: &str, lag: &str| {
        (
            p.to_owned(),
            committed.to_owned(),
            end.to_owned(),
            lag.to_owned(),
        )
    };
    let described = wait_for(
        "g-dash Stable with its assignment",
        CONDITION_TIMEOUT,
        || {
            let described = describe(&broker, GROUP);
            (described.group["State"] == "Stable" && described.members.len() == 1)
                .then_some(described)
        },
    );
    assert_eq!(described.members[0]["Assignment"], "uncommitted:0,1,2");
    assert_eq!(
        lines(&described),
        vec![
            row("0", "-", "0", "-"),
            row("1", "-", "2", "-"),
            row("2", "-", "0", "-")
        ],
        "{described:?}"
    );

    let mut commit = TopicPartitionList::new();
    commit
        .add_partition(TOPIC, 1)
        .set_offset(Offset::Offset(1))
        .expect("set offset");
    consumer
        .commit(&commit, CommitMode::Sync)
        .expect("the member's commit");
    assert_eq!(
        lines(&describe(&broker, GROUP)),
        vec![
            row("0", "-", "0", "-"),
            row("1", "1", "2", "1"),
            row("2", "-", "0", "-")
        ]
    );

    // Once the member has left, only the committed partition is left to show.
    drop(consumer);
    let empty = wait_for("g-dash to become Empty", CONDITION_TIMEOUT, || {
        let described = describe(&broker, GROUP);
        (described.group["State"] == "Empty").then_some(described)
    });
    assert_eq!(lines(&empty), vec![row("1", "1", "2", "1")]);
}
