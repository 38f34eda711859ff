//! `freshet perf produce`: send N records as fast as allowed (or at `--rate`) from one
//! or more producer instances; report throughput and delivery latency (from handing a
//! record to librdkafka to its delivery report, so it includes client-side batching
//! and queueing, as kafka-producer-perf-test's latency does).

use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use hdrhistogram::Histogram;
use rdkafka::bindings as rdsys;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use serde_json::json;

use super::report::{self, LatencySummary, Progress};
use super::{ensure_topic, Pacer, Payloads};
use crate::tools::{describe_code, describe_error, ConnectArgs, ToolContext};

/// Sends between two non-blocking polls for delivery reports: often enough that
/// reports are timely, rarely enough that polling costs nothing at millions/s.
const SENDS_PER_POLL: u64 = 256;
/// Unpaced sends between two readings of the clock for the send time (a few µs apart
/// at a million records/s, against latencies of milliseconds); likewise for delivery
/// reports, which arrive in batches.
const CLOCK_EVERY: u64 = 16;
/// librdkafka's RD_KAFKA_PARTITION_UA (a macro the bindings do not carry): let the
/// partitioner choose.
const PARTITION_UNASSIGNED: i32 = -1;
/// How long to let librdkafka drain its queue when it is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

#[derive(clap::Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to produce to.
    #[arg(long)]
    topic: String,
    /// Number of records to send (over all producers).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value size in bytes (random letters).
    #[arg(long, default_value_t = 100, conflicts_with = "payload_file")]
    record_size: usize,
    /// Take values from the lines of this file, in turn.
    #[arg(long, value_name = "FILE")]
    payload_file: Option<PathBuf>,
    /// Target rate in records/s over all producers (default: as fast as possible).
    #[arg(long, value_parser = super::parse_rate)]
    rate: Option<f64>,
    /// Acknowledgements to wait for: 0, 1, all (same as -1).
    #[arg(long, default_value = "1", allow_hyphen_values = true, value_parser = ["0", "1", "all", "-1"])]
    acks: String,
    /// Compression codec of the record batches.
    #[arg(long, default_value = "none", value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    compression: String,
    /// Create the topic with this many partitions if it is missing; an existing topic
    /// must have exactly this many.
    #[arg(long)]
    partitions: Option<i32>,
    /// librdkafka `linger.ms`: how long to wait to fill a batch.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// librdkafka `batch.size`: largest batch in bytes.
    #[arg(long, default_value_t = 1_000_000)]
    batch_size: u64,
    /// Number of producer instances (each its own connection and thread).
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Delivery bookkeeping of one producer instance.
pub(super) struct PerfContext {
    pub(super) tool: ToolContext,
    /// The instant send times are measured from; the delivery opaque of each record is
    /// its send time in nanoseconds since then (no allocation per record).
    pub(super) epoch: Instant,
    latency: Mutex<Histogram<u64>>,
    /// Shared by all producers, for the progress display.
    pub(super) delivered: Arc<AtomicU64>,
    delivered_bytes: AtomicU64,
    pub(super) failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    /// Delivery reports seen, and the clock (ns since `epoch`) last read for one.
    reports: AtomicU64,
    report_clock_ns: AtomicU64,
}

impl PerfContext {
    pub(super) fn new(tool: ToolContext, epoch: Instant, delivered: Arc<AtomicU64>) -> PerfContext {
        PerfContext {
            tool,
            epoch,
            latency: Mutex::new(report::latency_histogram()),
            delivered,
            delivered_bytes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
            reports: AtomicU64::new(0),
            report_clock_ns: AtomicU64::new(0),
        }
    }

    /// The first delivery failure, as `NAME: description`.
    pub(super) fn first_failure(&self) -> Option<String> {
        self.first_failure
            .lock()
            .ok()
            .and_then(|first| first.clone())
    }

    /// Delivery latencies so far.
    pub(super) fn latency(&self) -> anyhow::Result<Histogram<u64>> {
        self.latency
            .lock()
            .map(|histogram| histogram.clone())
            .map_err(|_| anyhow!("latency histogram poisoned"))
    }
}

impl ClientContext for PerfContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.tool.log(level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.tool.error(error, reason);
    }
}

impl ProducerContext for PerfContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at_ns: usize) {
        match result {
            Ok(message) => {
                // Reports come in batches, all received at the same moment: reading the
                // clock once per CLOCK_EVERY reports is as exact and much cheaper.
                let seen = self.reports.fetch_add(1, Ordering::Relaxed);
                let now_ns = if seen.is_multiple_of(CLOCK_EVERY) {
                    let now_ns = self.epoch.elapsed().as_nanos() as u64;
                    self.report_clock_ns.store(now_ns, Ordering::Relaxed);
                    now_ns
                } else {
                    self.report_clock_ns.load(Ordering::Relaxed)
                };
                let latency = Duration::from_nanos(now_ns.saturating_sub(sent_at_ns as u64));
                if let Ok(mut histogram) = self.latency.lock() {
                    report::record_latency(&mut histogram, latency);
                }
                let bytes = message.payload_len() as u64;
                self.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_failure.lock() {
                    first.get_or_insert_with(|| describe_error(error));
                }
            }
        }
    }
}

/// What one producer instance did.
struct Outcome {
    sent: u64,
    delivered_bytes: u64,
    failed: u64,
    first_failure: Option<String>,
    latency: Histogram<u64>,
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    if args.producers == 0 {
        bail!("--producers must be at least 1");
    }
    if args.records == 0 {
        bail!("--records must be at least 1");
    }
    let payloads = Arc::new(match &args.payload_file {
        Some(path) => Payloads::from_file(path)?,
        None => Payloads::random(args.record_size),
    });
    let partitions = ensure_topic(&args.connect, &args.topic, args.partitions)?;

    let linger = args.linger_ms.to_string();
    let batch_size = args.batch_size.to_string();
    let config = args.connect.client_config(&[
        ("acks", args.acks.as_str()),
        ("compression.type", args.compression.as_str()),
        ("linger.ms", linger.as_str()),
        ("batch.size", batch_size.as_str()),
        // Let a batch hold as many records as batch.size allows (the default caps a
        // batch at 10,000 records, 1 MB of 100-byte records, which is fine, but small
        // records would otherwise be cut before batch.size).
        ("batch.num.messages", "1000000"),
        // Room for a second of sends at millions per second before backpressure.
        ("queue.buffering.max.messages", "2000000"),
    ]);

    let delivered = Arc::new(AtomicU64::new(0));
    let quiet = args.json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut producers = Vec::with_capacity(args.producers as usize);
    for _ in 0..args.producers {
        let context = PerfContext::new(args.connect.context(), Instant::now(), delivered.clone());
        let producer: BaseProducer<PerfContext> =
            BaseProducer::from_config_and_context(&config, context)
                .map_err(|err| anyhow!("cannot create Kafka producer: {}", describe_error(&err)))?;
        producers.push(producer);
    }

    let progress = Progress::start(
        "records delivered",
        Some(args.records),
        delivered.clone(),
        quiet,
    );
    let start = Instant::now();
    let per_producer_rate = args.rate.map(|rate| rate / f64::from(args.producers));
    let outcomes: Vec<anyhow::Result<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = producers
            .into_iter()
            .enumerate()
            .map(|(index, producer)| {
                // Spread the records evenly; the first ones take the remainder.
                let base = args.records / u64::from(args.producers);
                let extra = u64::from((index as u64) < args.records % u64::from(args.producers));
                let count = base + extra;
                let payloads = payloads.clone();
                let topic = args.topic.as_str();
                scope.spawn(move || produce(producer, topic, count, per_producer_rate, &payloads))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a producer thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    progress.finish();

    let mut sent = 0;
    let mut bytes = 0;
    let mut failed = 0;
    let mut first_failure = None;
    let mut latency = report::latency_histogram();
    for outcome in outcomes {
        let outcome = outcome?;
        sent += outcome.sent;
        bytes += outcome.delivered_bytes;
        failed += outcome.failed;
        first_failure = first_failure.or(outcome.first_failure);
        latency
            .add(&outcome.latency)
            .map_err(|err| anyhow!("merging latency histograms: {err:?}"))?;
    }
    let delivered = delivered.load(Ordering::Relaxed);
    assert_eq!(
        delivered + failed,
        sent,
        "every record sent got exactly one delivery report"
    );
    let (records_per_s, mb_per_s) = report::rates(delivered, bytes, elapsed);
    let summary = LatencySummary::of(&latency);
    let value = json!({
        "tool": "produce",
        "topic": args.topic,
        "partitions": partitions,
        "producers": args.producers,
        "acks": args.acks,
        "compression": args.compression,
        "record_bytes": if args.payload_file.is_some() { None } else { Some(args.record_size) },
        "rate_target": args.rate,
        "records": delivered,
        "failed": failed,
        "bytes": bytes,
        "elapsed_s": report::round3(elapsed.as_secs_f64()),
        "records_per_s": records_per_s.round(),
        "mb_per_s": report::round3(mb_per_s),
        "latency_ms": summary.to_json(),
    });
    let text = format!(
        "{} records ({} MB) to '{}' ({partitions} partitions, acks={}) in {:.2} s: {} records/s, {:.1} MB/s\ndelivery latency: {}\n",
        report::thousands(delivered),
        report::round3(bytes as f64 / 1e6),
        args.topic,
        args.acks,
        elapsed.as_secs_f64(),
        report::thousands(records_per_s as u64),
        mb_per_s,
        summary.line(),
    );
    report::print_result(args.json, &value, &text);
    if failed > 0 {
        bail!(
            "{failed} of {sent} records not delivered, first: {}",
            first_failure.unwrap_or_default()
        );
    }
    Ok(())
}

/// One producer instance: sends `count` records, then waits for every delivery report.
fn produce(
    producer: BaseProducer<PerfContext>,
    topic: &str,
    count: u64,
    rate: Option<f64>,
    payloads: &Payloads,
) -> anyhow::Result<Outcome> {
    let pacer = rate.map(Pacer::new);
    let epoch = producer.context().epoch;
    let handle = TopicHandle::new(&producer, topic)?;
    let mut sent_at_ns = 0;
    for index in 0..count {
        match &pacer {
            Some(pacer) => {
                wait_until(&producer, pacer.due(index));
                sent_at_ns = epoch.elapsed().as_nanos() as usize;
            }
            // Unpaced, records leave microseconds apart: reading the clock for every
            // one would cost the sending thread more than the send itself.
            None if index.is_multiple_of(CLOCK_EVERY) => {
                sent_at_ns = epoch.elapsed().as_nanos() as usize;
            }
            None => {}
        }
        loop {
            match handle.send(payloads.get(index), sent_at_ns) {
                Ok(()) => break,
                Err(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(QUEUE_FULL_WAIT);
                }
                Err(code) => {
                    return Err(producer
                        .context()
                        .tool
                        .explain(format!("produce failed: {}", describe_code(code))));
                }
            }
        }
        if index.is_multiple_of(SENDS_PER_POLL) {
            producer.poll(Duration::ZERO);
        }
    }
    drop(handle);
    // `message.timeout.ms` bounds how long any record can stay undelivered.
    producer.flush(Timeout::Never).map_err(|err| {
        producer
            .context()
            .tool
            .explain(format!("produce failed: {}", describe_error(&err)))
    })?;
    let context = producer.context();
    Ok(Outcome {
        sent: count,
        delivered_bytes: context.delivered_bytes.load(Ordering::Relaxed),
        failed: context.failed.load(Ordering::Relaxed),
        first_failure: context.first_failure(),
        latency: context.latency()?,
    })
}

/// librdkafka's handle of one topic, to send with `rd_kafka_produce`.
/// `BaseProducer::send` goes through `rd_kafka_producev`, which copies the topic name
/// into a new C string and looks the topic up by name for every record: at a million
/// records a second that is a large part of the sending thread, and the tool would
/// measure itself instead of the cluster. Delivery reports still arrive through
/// `BaseProducer::poll` and [`PerfContext::delivery`], with the opaque given here.
struct TopicHandle<'a> {
    ptr: *mut rdsys::rd_kafka_topic_t,
    /// The handle must not outlive the client it belongs to.
    _producer: PhantomData<&'a BaseProducer<PerfContext>>,
}

impl<'a> TopicHandle<'a> {
    fn new(
        producer: &'a BaseProducer<PerfContext>,
        topic: &str,
    ) -> anyhow::Result<TopicHandle<'a>> {
        let name = CString::new(topic).map_err(|_| anyhow!("topic name contains a NUL byte"))?;
        // SAFETY: the client pointer is live for 'a; librdkafka copies the name; a null
        // topic configuration means the client's defaults.
        let ptr = unsafe {
            rdsys::rd_kafka_topic_new(
                producer.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if ptr.is_null() {
            // SAFETY: reads librdkafka's thread-local last error, always valid.
            let code = RDKafkaErrorCode::from(unsafe { rdsys::rd_kafka_last_error() });
            bail!(
                "cannot create a topic handle for '{topic}': {}",
                describe_code(code)
            );
        }
        Ok(TopicHandle {
            ptr,
            _producer: PhantomData,
        })
    }

    /// Enqueues one record (no key, partition chosen by the partitioner); librdkafka
    /// copies the payload. `opaque` comes back with its delivery report.
    fn send(&self, payload: &[u8], opaque: usize) -> Result<(), RDKafkaErrorCode> {
        // SAFETY: the handle is live (it is destroyed only on drop); the payload is
        // only read, during the call (RD_KAFKA_MSG_F_COPY), so the cast to *mut is
        // never written through; a null key of length 0 means no key.
        let result = unsafe {
            rdsys::rd_kafka_produce(
                self.ptr,
                PARTITION_UNASSIGNED,
                rdsys::RD_KAFKA_MSG_F_COPY,
                payload.as_ptr() as *mut c_void,
                payload.len(),
                std::ptr::null(),
                0,
                opaque as *mut c_void,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            // SAFETY: as above.
            Err(RDKafkaErrorCode::from(unsafe {
                rdsys::rd_kafka_last_error()
            }))
        }
    }
}

impl Drop for TopicHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_topic_new and destroyed once, before its client.
        unsafe { rdsys::rd_kafka_topic_destroy(self.ptr) };
    }
}

/// Serves delivery reports until `due`. librdkafka's poll has millisecond resolution,
/// so the last stretch is a plain sleep.
pub(super) fn wait_until<C: ProducerContext>(producer: &BaseProducer<C>, due: Instant) {
    const POLL_RESOLUTION: Duration = Duration::from_millis(1);
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > 2 * POLL_RESOLUTION {
            producer.poll(left - POLL_RESOLUTION);
        } else {
            std::thread::sleep(left);
            producer.poll(Duration::ZERO);
        }
    }
}
