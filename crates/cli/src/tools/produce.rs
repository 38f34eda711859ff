//! `freshet produce`: one record per stdin line, then wait for every delivery report.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;

use super::{describe_error, ConnectArgs, ToolContext};

/// Longest stdin line accepted as one record; librdkafka's own `message.max.bytes`
/// defaults to 1 MB, so anything near this limit would be refused anyway.
const LINE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to produce to.
    topic: String,
    /// Text before the first SEP on a line is the key, the rest the value. A line
    /// without SEP is produced with a null key and the whole line as value.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Header added to every record (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = super::parse_key_value)]
    headers: Vec<(String, String)>,
    /// Acknowledgements to wait for: 0, 1, all (same as -1).
    #[arg(long, default_value = "all", value_parser = ["0", "1", "all", "-1"])]
    acks: String,
    /// Produce every record to this partition (default: by key hash, or sticky for
    /// records without a key).
    #[arg(long)]
    partition: Option<i32>,
    /// Compression codec of the record batches.
    #[arg(long, default_value = "none", value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    compression: String,
    /// Keep records the cluster cannot acknowledge in this directory (fsync'd), and
    /// send what an earlier run left there first: the command succeeds once every
    /// line is acknowledged (acks=all, idempotent) or spooled. Needs --acks all.
    #[arg(long, value_name = "DIR")]
    spool: Option<std::path::PathBuf>,
    /// With --spool: how long a record waits for the cluster before it is spooled.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    spool_after_ms: u64,
    /// With --spool: bytes of records held (in memory and in the spool) at most.
    #[arg(long, default_value_t = 256 << 20, value_name = "BYTES")]
    spool_max_bytes: u64,
}

/// Counts delivery reports and keeps the first failure, so the tool can wait for all
/// of them and report one clear line.
struct DeliveryContext {
    tool: ToolContext,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.tool.log(level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.tool.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    /// The record's 1-based stdin line number, for the error message.
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, line: Box<u64>) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _message)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_failure.lock() {
                    first.get_or_insert_with(|| format!("{} (line {line})", describe_error(error)));
                }
            }
        }
    }
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    if let Some(sep) = &args.key_separator {
        if sep.is_empty() {
            bail!("--key-separator must not be empty");
        }
    }
    if let Some(partition) = args.partition {
        if partition < 0 {
            bail!("--partition must not be negative, got {partition}");
        }
    }
    if let Some(dir) = args.spool.clone() {
        return run_spooled(&args, dir);
    }
    let config = args.connect.client_config(&[
        ("acks", args.acks.as_str()),
        ("compression.type", args.compression.as_str()),
    ]);
    let context = DeliveryContext {
        tool: args.connect.context(),
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_failure: Mutex::new(None),
    };
    let producer: BaseProducer<DeliveryContext> =
        BaseProducer::from_config_and_context(&config, context)
            .context("cannot create Kafka producer")?;

    let stdin = std::io::stdin();
    let sent = send_lines(&producer, &args, BufReader::new(stdin.lock()));
    // Wait for the delivery report of everything already handed to librdkafka, even
    // when reading stdin failed: those records may already be on the cluster.
    // `message.timeout.ms` bounds how long each record can stay undelivered.
    let flushed = producer.flush(Timeout::Never);
    let sent = sent?;
    let context = producer.context();
    let failed = context.failed.load(Ordering::Relaxed);
    let delivered = context.delivered.load(Ordering::Relaxed);
    if failed > 0 {
        let first = context
            .first_failure
            .lock()
            .ok()
            .and_then(|first| first.clone())
            .unwrap_or_default();
        return Err(context.tool.explain(format!(
            "produce failed: {failed} of {sent} records not delivered, first: {first}"
        )));
    }
    if let Err(err) = flushed {
        return Err(context
            .tool
            .explain(format!("produce failed: {}", describe_error(&err))));
    }
    assert_eq!(
        delivered, sent,
        "every record sent got exactly one delivery report"
    );
    Ok(())
}

/// Hands every stdin line to librdkafka; returns how many were handed over.
fn send_lines(
    producer: &BaseProducer<DeliveryContext>,
    args: &ProduceArgs,
    mut input: impl BufRead,
) -> anyhow::Result<u64> {
    let separator = args.key_separator.as_deref().map(str::as_bytes);
    let mut line = Vec::new();
    let mut sent = 0u64;
    loop {
        let line_number = sent + 1;
        if !read_line(&mut input, &mut line, line_number)? {
            return Ok(sent);
        }
        let (key, value) = split_key(&line, separator);
        let mut record =
            BaseRecord::with_opaque_to(&args.topic, Box::new(line_number)).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(partition) = args.partition {
            record = record.partition(partition);
        }
        if !args.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(args.headers.len());
            for (key, value) in &args.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            record = record.headers(headers);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // Backpressure: let librdkafka drain its queue, then retry.
                    record = returned;
                    producer.poll(Duration::from_millis(100));
                }
                Err((err, _)) => {
                    let err = producer
                        .context()
                        .tool
                        .explain(format!("{} (line {line_number})", describe_error(&err)));
                    return Err(err.context("produce failed"));
                }
            }
        }
        sent += 1;
        producer.poll(Duration::ZERO);
    }
}

/// `--spool DIR`: every line goes through the gateway's durable producer, so it is
/// acknowledged or kept in DIR; lines are submitted in order, at most
/// `SPOOLED_IN_FLIGHT` awaiting their outcome.
fn run_spooled(args: &ProduceArgs, dir: std::path::PathBuf) -> anyhow::Result<()> {
    use gateway::producer::{DurableProducer, ProducerConfig, Record, SendError};
    const SPOOLED_IN_FLIGHT: usize = 10_000;
    if args.acks != "all" && args.acks != "-1" {
        bail!("--spool needs --acks all: a record is only dropped from the spool once the cluster has it durably");
    }
    let mut kafka = vec![("compression.type".to_string(), args.compression.clone())];
    kafka.extend(args.connect.properties.iter().cloned());
    let config = ProducerConfig {
        brokers: args.connect.brokers.clone(),
        spool_dir: dir.clone(),
        spool_max_bytes: args.spool_max_bytes,
        spool_segment_bytes: 16 << 20,
        spool_after_ms: args.spool_after_ms,
        max_record_bytes: LINE_BYTES_MAX,
        outage_probe_interval_ms: 200,
        outage_reconcile_timeout_ms: 10_000,
        kafka,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let producer =
        std::sync::Arc::new(DurableProducer::open(&config).context("cannot open the spool")?);
    let separator = args.key_separator.as_deref().map(str::as_bytes);
    let headers: Vec<(String, Vec<u8>)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    let (mut delivered, mut spooled) = (0u64, 0u64);
    let result: anyhow::Result<()> = runtime.block_on(async {
        let mut pending = std::collections::VecDeque::new();
        let mut input = BufReader::new(std::io::stdin().lock());
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            if !read_line(&mut input, &mut line, number + 1)? {
                break;
            }
            number += 1;
            let (key, value) = split_key(&line, separator);
            let record = Record {
                topic: args.topic.clone(),
                partition: args.partition,
                key: key.map(<[u8]>::to_vec),
                value: Some(value.to_vec()),
                headers: headers.clone(),
                timestamp_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
            };
            // Submitting queues the record at once, in line order; its outcome is
            // awaited later, so lines are pipelined. The first outcome that times out
            // spools everything queued, so waiting in order costs one timeout.
            loop {
                match producer.submit(record.clone()) {
                    Ok(p) => {
                        pending.push_back((number, p));
                        break;
                    }
                    Err(SendError::Full { .. }) if !pending.is_empty() => {
                        let (n, p) = pending.pop_front().expect("not empty");
                        count(n, p.outcome().await, &mut delivered, &mut spooled)?;
                    }
                    Err(err) => bail!("produce failed: {err} (line {number})"),
                }
            }
            if pending.len() >= SPOOLED_IN_FLIGHT {
                let (n, p) = pending.pop_front().expect("not empty");
                count(n, p.outcome().await, &mut delivered, &mut spooled)?;
            }
        }
        while let Some((n, p)) = pending.pop_front() {
            count(n, p.outcome().await, &mut delivered, &mut spooled)?;
        }
        producer
            .shutdown(std::time::Duration::from_millis(args.spool_after_ms))
            .await;
        Ok(())
    });
    result?;
    // Dropping the producer lets librdkafka finish what is in flight; then the spool
    // itself says what is left.
    drop(producer);
    let (_, _, recovery) =
        gateway::spool::Spool::open(&dir, 16 << 20).context("cannot read the spool")?;
    let left = recovery.pending;
    if spooled > 0 || left > 0 {
        eprintln!(
            "{delivered} records acknowledged, {spooled} spooled; {left} still in {} (sent first by the next `freshet produce --spool {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Tallies one line's outcome; a refusal by the cluster ends the command.
fn count(
    line: u64,
    outcome: Result<gateway::producer::Outcome, gateway::producer::SendError>,
    delivered: &mut u64,
    spooled: &mut u64,
) -> anyhow::Result<()> {
    match outcome {
        Ok(gateway::producer::Outcome::Delivered { .. }) => *delivered += 1,
        Ok(gateway::producer::Outcome::Spooled) => *spooled += 1,
        Err(err) => bail!("produce failed: {err} (line {line})"),
    }
    Ok(())
}

/// Reads the next stdin line (without its newline) into `line`; `false` at the end.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>, number: u64) -> anyhow::Result<bool> {
    line.clear();
    let read = std::io::Read::take(&mut *input, LINE_BYTES_MAX as u64 + 1)
        .read_until(b'\n', line)
        .context("cannot read stdin")?;
    if read == 0 {
        return Ok(false);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > LINE_BYTES_MAX {
        bail!("line {number} is longer than {LINE_BYTES_MAX} bytes");
    }
    Ok(true)
}

/// Splits a line at the first separator: `(Some(key), value)`, or `(None, line)` when
/// there is no separator flag or the line does not contain it.
fn split_key<'a>(line: &'a [u8], separator: Option<&[u8]>) -> (Option<&'a [u8]>, &'a [u8]) {
    let Some(separator) = separator else {
        return (None, line);
    };
    assert!(!separator.is_empty(), "checked when parsing the flags");
    match line
        .windows(separator.len())
        .position(|window| window == separator)
    {
        Some(at) => (Some(&line[..at]), &line[at + separator.len()..]),
        None => (None, line),
    }
}

#[cfg(test)]
mod tests {
    use super::split_key;

    #[test]
    fn key_is_text_before_the_first_separator() {
        assert_eq!(
            split_key(b"k:v:w", Some(b":")),
            (Some(&b"k"[..]), &b"v:w"[..])
        );
        assert_eq!(
            split_key(b"k::v", Some(b"::")),
            (Some(&b"k"[..]), &b"v"[..])
        );
        assert_eq!(split_key(b":v", Some(b":")), (Some(&b""[..]), &b"v"[..]));
        assert_eq!(split_key(b"v", Some(b":")), (None, &b"v"[..]));
        assert_eq!(split_key(b"k:v", None), (None, &b"k:v"[..]));
    }
}
