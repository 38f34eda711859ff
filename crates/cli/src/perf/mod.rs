//! `freshet perf`: the producer, consumer and end-to-end latency benchmarks that Kafka
//! users know from `kafka-producer-perf-test`, `kafka-consumer-perf-test` and
//! `EndToEndLatency`, every speed claim about Freshet comes from these.
//!
//! Architecture invariant: like `tools`, nothing in here touches broker internals. The
//! tools are plain librdkafka clients (sharing `tools`' `--brokers`/`-X` flags, client
//! context and error names), so they measure any Kafka-compatible cluster. The one
//! exception to "librdkafka" is `pollers`, which needs a thousand connections to one
//! broker: it speaks the wire protocol itself with the `kafka-protocol` types (through
//! `protocol`'s re-export, the codec only, never broker code).
//!
//! Units in every report: records and bytes of record values; MB is 10^6 bytes;
//! latencies are recorded in microseconds and reported in milliseconds.

pub mod consume;
pub mod e2e;
pub mod pollers;
pub mod produce;
pub mod report;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::Client;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::tools::REQUEST_TIMEOUT;
use crate::tools::{block_on, describe_code, describe_error, ConnectArgs, ToolContext};

#[derive(clap::Args)]
pub struct PerfArgs {
    #[command(subcommand)]
    command: PerfCommand,
}

#[derive(clap::Subcommand)]
enum PerfCommand {
    /// Producer throughput and delivery latency.
    Produce(produce::ProduceArgs),
    /// Consumer throughput and time to first record.
    Consume(consume::ConsumeArgs),
    /// End-to-end latency at a fixed rate, with a check for lost, duplicated and
    /// out-of-order records (exit code 1 if there is any).
    E2e(e2e::E2eArgs),
    /// Many idle long-polling fetch connections at little CPU (raw Kafka frames, not
    /// librdkafka), for benchmarking what waiting fetches cost a broker.
    Pollers(pollers::PollersArgs),
}

pub fn run(args: PerfArgs) -> anyhow::Result<()> {
    match args.command {
        PerfCommand::Produce(args) => produce::run(args),
        PerfCommand::Consume(args) => consume::run(args),
        PerfCommand::E2e(args) => e2e::run(args),
        PerfCommand::Pollers(args) => pollers::run(args),
    }
}

/// Makes sure `topic` exists and returns its partition count. With `partitions`, a
/// missing topic is created with that many partitions and an existing one must have
/// exactly that many (a benchmark against another layout would mislead); without, a
/// missing topic is created with the cluster's default.
pub fn ensure_topic(
    connect: &ConnectArgs,
    topic: &str,
    partitions: Option<i32>,
) -> anyhow::Result<usize> {
    if let Some(n) = partitions.filter(|n| *n < 1) {
        bail!("--partitions must be at least 1, got {n}");
    }
    let config = connect.client_config(&[]);
    let admin: AdminClient<ToolContext> =
        AdminClient::from_config_and_context(&config, connect.context())
            .map_err(|err| anyhow!("cannot create Kafka admin client: {}", describe_error(&err)))?;
    if topic_partitions(admin.inner(), topic)?.is_none() {
        // -1 asks the cluster for its default (CreateTopics v4+).
        let new_topic = NewTopic::new(topic, partitions.unwrap_or(-1), TopicReplication::Fixed(-1));
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let results = block_on(admin.create_topics([&new_topic], &options))?
            .map_err(|err| admin.inner().context().explain(describe_error(&err)))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => bail!("cannot create topic '{name}': {}", describe_code(code)),
            }
        }
    }
    // Creation is asynchronous on some clusters: wait until the metadata shows it.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let count = loop {
        if let Some(count) = topic_partitions(admin.inner(), topic)? {
            break count;
        }
        if Instant::now() >= deadline {
            bail!("topic '{topic}' still not in the cluster's metadata after {REQUEST_TIMEOUT:?}");
        }
        // Polling the cluster's metadata; there is nothing to wait on instead.
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(wanted) = partitions {
        if count != wanted as usize {
            bail!("topic '{topic}' has {count} partitions, not {wanted} (use another topic or delete it)");
        }
    }
    Ok(count)
}

/// The partition count of `topic`, or `None` if the cluster does not know it.
pub fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> anyhow::Result<Option<usize>> {
    // Metadata for all topics: asking for this one by name would let a cluster with
    // auto-creation create it, with its default partition count.
    let metadata = client
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|err| {
            anyhow!(
                "cannot read the cluster's metadata: {}",
                describe_error(&err)
            )
        })?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None if !found.partitions().is_empty() => Ok(Some(found.partitions().len())),
        None => Ok(None),
        Some(err) => match RDKafkaErrorCode::from(err) {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::LeaderNotAvailable => {
                Ok(None)
            }
            code => bail!("{} (topic '{topic}')", describe_code(code)),
        },
    }
}

/// Spreads sends evenly over time: record `i` is due `i / rate` seconds after the start.
/// Catching up after a stall sends the backlog at once (the schedule is absolute), so a
/// slow cluster shows up as latency, not as a silently lower rate.
pub struct Pacer {
    start: Instant,
    nanos_per_record: f64,
}

impl Pacer {
    pub fn new(records_per_s: f64) -> Pacer {
        assert!(
            records_per_s > 0.0,
            "rate is checked when parsing the flags"
        );
        Pacer {
            start: Instant::now(),
            nanos_per_record: 1e9 / records_per_s,
        }
    }

    pub fn due(&self, index: u64) -> Instant {
        self.start + Duration::from_nanos((index as f64 * self.nanos_per_record) as u64)
    }
}

/// The payloads a producer cycles through: `--record-size` random letters (slices of a
/// 1 MiB buffer at shifting offsets, so consecutive records differ and compression is
/// not flattered by identical values), or the lines of `--payload-file`.
pub struct Payloads {
    kind: PayloadKind,
}

enum PayloadKind {
    Random { buffer: Vec<u8>, size: usize },
    Lines(Vec<Vec<u8>>),
}

/// Length of the random buffer that `--record-size` payloads are sliced from.
const RANDOM_BUFFER_BYTES: usize = 1 << 20;

impl Payloads {
    pub fn random(size: usize) -> Payloads {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let buffer = (0..RANDOM_BUFFER_BYTES + size)
            .map(|_| {
                // xorshift64: fast, deterministic, good enough for filler bytes.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b'A' + (state % 26) as u8
            })
            .collect();
        Payloads {
            kind: PayloadKind::Random { buffer, size },
        }
    }

    /// Every non-empty line of the file is one payload (without its newline).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Payloads> {
        let text = std::fs::read(path)
            .map_err(|err| anyhow!("cannot read payload file {}: {err}", path.display()))?;
        let lines: Vec<Vec<u8>> = text
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        if lines.is_empty() {
            bail!("payload file {} has no non-empty line", path.display());
        }
        Ok(Payloads {
            kind: PayloadKind::Lines(lines),
        })
    }

    pub fn get(&self, index: u64) -> &[u8] {
        match &self.kind {
            PayloadKind::Random { buffer, size } => {
                // A prime stride walks every offset of the buffer before repeating.
                let at = (index.wrapping_mul(7919) % RANDOM_BUFFER_BYTES as u64) as usize;
                &buffer[at..at + size]
            }
            PayloadKind::Lines(lines) => &lines[(index % lines.len() as u64) as usize],
        }
    }
}

/// `--rate`: records per second, positive.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "expected a positive number of records per second, got '{text}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_payloads_have_the_size_and_differ() {
        let payloads = Payloads::random(100);
        assert_eq!(payloads.get(0).len(), 100);
        assert_eq!(payloads.get(u64::MAX).len(), 100);
        assert_ne!(payloads.get(0), payloads.get(1));
        assert!(payloads.get(7).iter().all(u8::is_ascii_uppercase));
    }

    #[test]
    fn pacer_spreads_records_over_a_second() {
        let pacer = Pacer::new(1000.0);
        assert_eq!(pacer.due(1000) - pacer.due(0), Duration::from_secs(1));
        assert_eq!(pacer.due(1) - pacer.due(0), Duration::from_millis(1));
    }

    #[test]
    fn rate_must_be_positive() {
        assert_eq!(parse_rate("1e4"), Ok(10_000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("x").is_err());
    }
}
