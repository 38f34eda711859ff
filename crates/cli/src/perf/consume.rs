//! `freshet perf consume`: read records as fast as the client can, from the beginning
//! or from now on, by assigning every partition or as a member of a consumer group;
//! report throughput (first record to last) and the time to the first record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext as _, Offset, TopicPartitionList};
use serde_json::json;

use super::report::{self, Progress};
use crate::tools::{describe_error, ConnectArgs, ToolContext};

/// Longest single wait in `poll`, so the stop conditions are checked regularly.
const POLL_WAIT_MAX: Duration = Duration::from_millis(100);
/// Records between two updates of the progress counter.
const PROGRESS_EVERY: u64 = 1024;
/// Group id librdkafka needs even to assign partitions by hand; never joined, since
/// this tool only subscribes with `--group`, and nothing is committed to it.
const ASSIGN_GROUP_ID: &str = "freshet-perf-consume";

#[derive(clap::Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to consume.
    #[arg(long)]
    topic: String,
    /// Stop after this many records (fewer is an error).
    #[arg(long)]
    records: Option<u64>,
    /// Stop once no record has arrived for MS milliseconds.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    /// Start at the first record of each partition (default: only records produced
    /// from now on).
    #[arg(long)]
    from_beginning: bool,
    /// Join this consumer group (subscribe) instead of assigning every partition.
    /// Offsets the group committed take precedence over --from-beginning.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    if args.records == Some(0) {
        bail!("--records must be at least 1");
    }
    let reset = if args.from_beginning {
        "earliest"
    } else {
        "latest"
    };
    let mut defaults = vec![
        ("auto.offset.reset", reset),
        // librdkafka's default (1000 ms) pauses a partition's fetching for a whole
        // second whenever the local queue is over its threshold, which a fast reader
        // hits at once: the measured rate then swings between 100k and 1.7M records/s
        // of 100 bytes on the same run. 10 ms keeps the fetcher busy at little cost.
        ("fetch.queue.backoff.ms", "10"),
    ];
    match &args.group {
        Some(group) => defaults.push(("group.id", group.as_str())),
        None => {
            defaults.push(("group.id", ASSIGN_GROUP_ID));
            defaults.push(("enable.auto.commit", "false"));
            defaults.push(("enable.auto.offset.store", "false"));
        }
    }
    let config = args.connect.client_config(&defaults);
    let consumer: BaseConsumer<ToolContext> =
        BaseConsumer::from_config_and_context(&config, args.connect.context())
            .map_err(|err| anyhow!("cannot create Kafka consumer: {}", describe_error(&err)))?;
    let partitions = super::topic_partitions(consumer.client(), &args.topic)?.ok_or_else(|| {
        anyhow!(
            "UNKNOWN_TOPIC_OR_PARTITION: topic '{}' does not exist",
            args.topic
        )
    })?;

    let start = Instant::now();
    match &args.group {
        Some(_) => consumer
            .subscribe(&[args.topic.as_str()])
            .map_err(|err| anyhow!("cannot subscribe: {}", describe_error(&err)))?,
        None => {
            let offset = if args.from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            };
            let mut assignment = TopicPartitionList::new();
            for partition in 0..partitions {
                assignment
                    .add_partition_offset(&args.topic, partition as i32, offset)
                    .map_err(|err| anyhow!("{}", describe_error(&err)))?;
            }
            consumer
                .assign(&assignment)
                .map_err(|err| anyhow!("cannot assign partitions: {}", describe_error(&err)))?;
        }
    }

    let consumed = Arc::new(AtomicU64::new(0));
    let quiet = args.json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = Progress::start("records consumed", args.records, consumed.clone(), quiet);
    let counts = consume_loop(&consumer, &args, start, &consumed);
    progress.finish();
    let counts = counts?;

    let records = counts.records;
    let (first, last) = match (counts.first_at, counts.last_at) {
        (Some(first), Some(last)) => (first, last),
        _ => bail!(
            "no record within {} ms (topic '{}', {})",
            args.timeout_ms,
            args.topic,
            if args.from_beginning {
                "from the beginning"
            } else {
                "from the end"
            }
        ),
    };
    let window = last - first;
    let (records_per_s, mb_per_s) = report::rates(records, counts.bytes, window);
    let time_to_first = first - start;
    let value = json!({
        "tool": "consume",
        "topic": args.topic,
        "partitions": partitions,
        "group": args.group,
        "from_beginning": args.from_beginning,
        "records": records,
        "bytes": counts.bytes,
        "elapsed_s": report::round3(window.as_secs_f64()),
        "records_per_s": records_per_s.round(),
        "mb_per_s": report::round3(mb_per_s),
        "time_to_first_record_ms": report::round3(time_to_first.as_secs_f64() * 1000.0),
    });
    let text = format!(
        "{} records ({} MB) from '{}' ({partitions} partitions) in {:.2} s: {} records/s, {:.1} MB/s\ntime to first record: {:.1} ms\n",
        report::thousands(records),
        report::round3(counts.bytes as f64 / 1e6),
        args.topic,
        window.as_secs_f64(),
        report::thousands(records_per_s as u64),
        mb_per_s,
        time_to_first.as_secs_f64() * 1000.0,
    );
    report::print_result(args.json, &value, &text);
    if let Some(wanted) = args.records.filter(|wanted| records < *wanted) {
        return Err(consumer.context().explain(format!(
            "stopped after {} ms without a record: got {records} of {wanted} records",
            args.timeout_ms
        )));
    }
    Ok(())
}

struct Counts {
    records: u64,
    bytes: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

fn consume_loop(
    consumer: &BaseConsumer<ToolContext>,
    args: &ConsumeArgs,
    start: Instant,
    consumed: &AtomicU64,
) -> anyhow::Result<Counts> {
    let idle_max = Duration::from_millis(args.timeout_ms);
    let wanted = args.records.unwrap_or(u64::MAX);
    let mut counts = Counts {
        records: 0,
        bytes: 0,
        first_at: None,
        last_at: None,
    };
    let mut records = 0u64;
    // Reading the clock for every record would cost more than the rest of this loop, so
    // the time of the last record is read when the queue first runs dry after it (a
    // non-blocking poll comes back empty) or when the last wanted record arrives.
    let mut unstamped = false;
    while records < wanted {
        let mut polled = consumer.poll(Duration::ZERO);
        if polled.is_none() {
            if unstamped {
                counts.last_at = Some(Instant::now());
                unstamped = false;
                consumed.store(records, Ordering::Relaxed);
            }
            let idle = counts.last_at.unwrap_or(start).elapsed();
            if idle >= idle_max {
                break;
            }
            polled = consumer.poll(POLL_WAIT_MAX.min(idle_max - idle));
        }
        match polled {
            None => {}
            Some(Ok(message)) => {
                if counts.first_at.is_none() {
                    counts.first_at = Some(Instant::now());
                }
                unstamped = true;
                counts.bytes += message.payload_len() as u64;
                records += 1;
                if records.is_multiple_of(PROGRESS_EVERY) {
                    consumed.store(records, Ordering::Relaxed);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(err @ KafkaError::MessageConsumptionFatal(_))) => {
                bail!("consume failed: {}", describe_error(&err));
            }
            Some(Err(err)) => {
                // librdkafka retries by itself; remember it in case we time out.
                consumer.context().error(err, "while consuming");
            }
        }
    }
    if unstamped {
        counts.last_at = Some(Instant::now());
    }
    consumed.store(records, Ordering::Relaxed);
    counts.records = records;
    Ok(counts)
}
