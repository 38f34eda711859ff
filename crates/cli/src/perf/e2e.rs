//! `freshet perf e2e`: one producer sends at a fixed rate while one consumer reads the
//! same topic; every record carries a run id, a sequence number and its send time, so
//! the consumer measures end-to-end latency (send call to receipt) and checks that no
//! record is lost, duplicated or out of order within its partition.
//!
//! Producer and consumer run in this one process, so send and receive times come from
//! the same monotonic clock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use hdrhistogram::Histogram;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext as _, Message, Offset, TopicPartitionList};
use serde_json::json;

use super::produce::PerfContext;
use super::report::{self, LatencySummary, Progress};
use super::{ensure_topic, Pacer};
use crate::tools::{describe_error, ConnectArgs, ToolContext, REQUEST_TIMEOUT};

/// run id (8 bytes) | sequence number (8) | send time in ns since the run's epoch (8).
const HEADER_BYTES: usize = 24;
/// Longest single wait of the consumer's poll, so it notices the end of the run.
const POLL_WAIT_MAX: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct E2eArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to use (created with --partitions if missing).
    #[arg(long, default_value = "freshet-perf-e2e")]
    topic: String,
    /// Records per second the producer sends.
    #[arg(long, default_value = "1000", value_parser = super::parse_rate)]
    rate: f64,
    /// Run for this many seconds (records = rate x duration).
    #[arg(long, conflicts_with = "records")]
    duration_s: Option<f64>,
    /// Send this many records (default: 10 seconds' worth).
    #[arg(long)]
    records: Option<u64>,
    /// Value size in bytes, at least 24 (run id, sequence number, send time).
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Acknowledgements the producer waits for: 0, 1, all (same as -1).
    #[arg(long, default_value = "1", allow_hyphen_values = true, value_parser = ["0", "1", "all", "-1"])]
    acks: String,
    /// Compression codec of the record batches.
    #[arg(long, default_value = "none", value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    compression: String,
    /// Create the topic with this many partitions if it is missing.
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// librdkafka `linger.ms` (0: send each record as soon as possible).
    #[arg(long, default_value_t = 0)]
    linger_ms: u64,
    /// After the last send, how long to wait for the records still missing.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What the consumer saw.
struct Received {
    /// Records of this run received, duplicates included.
    records: u64,
    /// Records received more than once (each extra copy counts).
    duplicated: u64,
    /// First copies that arrived after a higher sequence number of the same partition.
    out_of_order: u64,
    /// Distinct sequence numbers received.
    distinct: u64,
    /// Records of the topic that are not from this run (ignored).
    foreign: u64,
    latency: Histogram<u64>,
}

/// Sequence numbers seen, one bit each.
struct SeenSet {
    words: Vec<u64>,
}

impl SeenSet {
    fn with_capacity(records: u64) -> SeenSet {
        SeenSet {
            words: vec![0; records.div_ceil(64) as usize],
        }
    }

    /// Marks `seq`; returns whether it was already marked.
    fn insert(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let seen = self.words[word] & bit != 0;
        self.words[word] |= bit;
        seen
    }
}

pub fn run(args: E2eArgs) -> anyhow::Result<()> {
    if args.record_size < HEADER_BYTES {
        bail!("--record-size must be at least {HEADER_BYTES} (run id, sequence number, send time)");
    }
    let records = match (args.records, args.duration_s) {
        (Some(records), _) => records,
        (None, Some(seconds)) if seconds > 0.0 => (args.rate * seconds).round() as u64,
        (None, Some(seconds)) => bail!("--duration-s must be positive, got {seconds}"),
        (None, None) => (args.rate * 10.0).round() as u64,
    };
    if records == 0 {
        bail!("nothing to send: --records or rate x duration must be at least 1");
    }
    let partitions = ensure_topic(&args.connect, &args.topic, Some(args.partitions))?;

    // The consumer starts at each partition's current end, read before the producer
    // starts, so it sees every record of this run and (almost) nothing older.
    let consumer: BaseConsumer<ToolContext> = BaseConsumer::from_config_and_context(
        &args.connect.client_config(&[
            ("group.id", "freshet-perf-e2e"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "error"),
        ]),
        args.connect.context(),
    )
    .map_err(|err| anyhow!("cannot create Kafka consumer: {}", describe_error(&err)))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        let (_, high) = consumer
            .fetch_watermarks(&args.topic, partition, REQUEST_TIMEOUT)
            .map_err(|err| {
                consumer.context().explain(format!(
                    "cannot read the end offsets: {}",
                    describe_error(&err)
                ))
            })?;
        assignment
            .add_partition_offset(&args.topic, partition, Offset::Offset(high))
            .map_err(|err| anyhow!("{}", describe_error(&err)))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|err| anyhow!("cannot assign partitions: {}", describe_error(&err)))?;

    let linger = args.linger_ms.to_string();
    let epoch = Instant::now();
    let producer: BaseProducer<PerfContext> = BaseProducer::from_config_and_context(
        &args.connect.client_config(&[
            ("acks", args.acks.as_str()),
            ("compression.type", args.compression.as_str()),
            ("linger.ms", linger.as_str()),
        ]),
        PerfContext::new(args.connect.context(), epoch, Arc::new(AtomicU64::new(0))),
    )
    .map_err(|err| anyhow!("cannot create Kafka producer: {}", describe_error(&err)))?;
    let run_id = run_id();
    let done_sending = AtomicBool::new(false);
    let consumed = Arc::new(AtomicU64::new(0));
    let quiet = args.json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = Progress::start("records received", Some(records), consumed.clone(), quiet);
    let (sent, received) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            receive(
                &consumer,
                run_id,
                epoch,
                records,
                &done_sending,
                &consumed,
                Duration::from_millis(args.timeout_ms),
            )
        });
        let sent = send(
            &producer,
            &args.topic,
            partitions,
            args.record_size,
            args.rate,
            records,
            run_id,
            epoch,
        );
        done_sending.store(true, Ordering::Release);
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the consumer thread panicked")));
        (sent, received)
    });
    progress.finish();
    let sent = sent?;
    let received = received?;

    let lost = records - received.distinct.min(records);
    let summary = LatencySummary::of(&received.latency);
    let value = json!({
        "tool": "e2e",
        "topic": args.topic,
        "partitions": partitions,
        "acks": args.acks,
        "record_bytes": args.record_size,
        "rate_target": args.rate,
        "records": records,
        "produced": sent.acknowledged,
        "delivery_failed": sent.failed,
        "consumed": received.records,
        "lost": lost,
        "duplicated": received.duplicated,
        "out_of_order": received.out_of_order,
        "foreign": received.foreign,
        "send_s": report::round3(sent.elapsed.as_secs_f64()),
        "rate_achieved": (records as f64 / sent.elapsed.as_secs_f64().max(1e-9)).round(),
        "latency_ms": summary.to_json(),
        "ack_latency_ms": LatencySummary::of(&sent.ack_latency).to_json(),
    });
    let text = format!(
        "{} records at {} records/s to '{}' ({partitions} partitions, acks={}): {} acknowledged, {} delivery failures\nreceived {}: {lost} lost, {} duplicated, {} out of order\nend-to-end latency: {}\nack latency:        {}\n",
        report::thousands(records),
        report::thousands(args.rate as u64),
        args.topic,
        args.acks,
        report::thousands(sent.acknowledged),
        sent.failed,
        report::thousands(received.records),
        received.duplicated,
        received.out_of_order,
        summary.line(),
        LatencySummary::of(&sent.ack_latency).line(),
    );
    report::print_result(args.json, &value, &text);
    if lost > 0 || received.duplicated > 0 || received.out_of_order > 0 || sent.failed > 0 {
        let mut err = anyhow!(
            "{lost} lost, {} duplicated, {} out of order, {} delivery failures",
            received.duplicated,
            received.out_of_order,
            sent.failed
        );
        if let Some(first) = sent.first_failure {
            err = err.context(format!("first delivery failure: {first}"));
        }
        return Err(err);
    }
    Ok(())
}

/// A number that tells this run's records from any other's in the same topic.
fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

struct Sent {
    acknowledged: u64,
    failed: u64,
    first_failure: Option<String>,
    /// From the first send to the last (not to the last acknowledgement).
    elapsed: Duration,
    /// From each send to its acknowledgement.
    ack_latency: Histogram<u64>,
}

/// Sends `records` at `rate`, record `i` to partition `i % partitions`, then waits for
/// every delivery report.
#[allow(clippy::too_many_arguments)]
fn send(
    producer: &BaseProducer<PerfContext>,
    topic: &str,
    partitions: usize,
    record_size: usize,
    rate: f64,
    records: u64,
    run_id: u64,
    epoch: Instant,
) -> anyhow::Result<Sent> {
    let pacer = Pacer::new(rate);
    let mut value = vec![b'.'; record_size];
    value[..8].copy_from_slice(&run_id.to_be_bytes());
    for seq in 0..records {
        super::produce::wait_until(producer, pacer.due(seq));
        value[8..16].copy_from_slice(&seq.to_be_bytes());
        let sent_at_ns = epoch.elapsed().as_nanos() as u64;
        value[16..24].copy_from_slice(&sent_at_ns.to_be_bytes());
        let partition = (seq % partitions as u64) as i32;
        let mut record =
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, sent_at_ns as usize)
                .partition(partition)
                .payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(1));
                }
                Err((err, _)) => {
                    return Err(producer
                        .context()
                        .tool
                        .explain(format!("produce failed: {}", describe_error(&err))));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    let elapsed = epoch.elapsed();
    // `message.timeout.ms` bounds how long any record can stay undelivered.
    producer.flush(Timeout::Never).map_err(|err| {
        producer
            .context()
            .tool
            .explain(format!("produce failed: {}", describe_error(&err)))
    })?;
    let context = producer.context();
    let acknowledged = context.delivered.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    assert_eq!(
        acknowledged + failed,
        records,
        "every record sent got exactly one delivery report"
    );
    Ok(Sent {
        acknowledged,
        failed,
        first_failure: context.first_failure(),
        elapsed,
        ack_latency: context.latency()?,
    })
}

/// Reads until every record arrived, or until `timeout` after the producer finished.
fn receive(
    consumer: &BaseConsumer<ToolContext>,
    run_id: u64,
    epoch: Instant,
    records: u64,
    done_sending: &AtomicBool,
    consumed: &AtomicU64,
    timeout: Duration,
) -> anyhow::Result<Received> {
    let mut seen = SeenSet::with_capacity(records);
    let mut highest: Vec<Option<u64>> = Vec::new();
    let mut received = Received {
        records: 0,
        duplicated: 0,
        out_of_order: 0,
        distinct: 0,
        foreign: 0,
        latency: report::latency_histogram(),
    };
    let mut sending_done_at: Option<Instant> = None;
    while received.distinct < records {
        if sending_done_at.is_none() && done_sending.load(Ordering::Acquire) {
            sending_done_at = Some(Instant::now());
        }
        if sending_done_at.is_some_and(|at| at.elapsed() >= timeout) {
            break;
        }
        let message = match consumer.poll(POLL_WAIT_MAX) {
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(err @ KafkaError::MessageConsumptionFatal(_))) => {
                bail!("consume failed: {}", describe_error(&err));
            }
            Some(Err(err)) => {
                consumer.context().error(err, "while consuming");
                continue;
            }
        };
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let Some((record_run, seq, sent_at_ns)) = message.payload().and_then(parse_header) else {
            received.foreign += 1;
            continue;
        };
        if record_run != run_id {
            received.foreign += 1;
            continue;
        }
        received.records += 1;
        consumed.store(received.records, Ordering::Relaxed);
        if seq >= records {
            // Not a sequence number this run sent: the payload is damaged.
            bail!("received sequence number {seq}, but only {records} records were sent");
        }
        if seen.insert(seq) {
            received.duplicated += 1;
            continue;
        }
        received.distinct += 1;
        let partition = message.partition().max(0) as usize;
        if highest.len() <= partition {
            highest.resize(partition + 1, None);
        }
        match highest[partition] {
            Some(top) if seq < top => received.out_of_order += 1,
            _ => highest[partition] = Some(seq),
        }
        report::record_latency(
            &mut received.latency,
            Duration::from_nanos(now_ns.saturating_sub(sent_at_ns)),
        );
    }
    Ok(received)
}

/// (run id, sequence number, send time) from a value this tool wrote.
fn parse_header(value: &[u8]) -> Option<(u64, u64, u64)> {
    let field = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?))
    };
    Some((field(0)?, field(8)?, field(16)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_reports_repeats_and_grows() {
        let mut seen = SeenSet::with_capacity(10);
        assert!(!seen.insert(3));
        assert!(seen.insert(3));
        assert!(!seen.insert(1000));
        assert!(seen.insert(1000));
        assert!(!seen.insert(0));
    }

    #[test]
    fn header_round_trips() {
        let mut value = vec![0u8; 30];
        value[..8].copy_from_slice(&7u64.to_be_bytes());
        value[8..16].copy_from_slice(&42u64.to_be_bytes());
        value[16..24].copy_from_slice(&99u64.to_be_bytes());
        assert_eq!(parse_header(&value), Some((7, 42, 99)));
        assert_eq!(parse_header(&value[..23]), None);
    }
}
