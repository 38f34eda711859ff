//! `freshet perf pollers`: many idle long-polling consumers at little CPU, so a benchmark
//! (`bench/longpoll`) can measure what waiting fetches cost the broker, not what a slow
//! load generator costs the machine.
//!
//! Each of `--connections` TCP connections long-polls one partition of `--topics` (all
//! their partitions, handed out round-robin, one per connection) with Fetch v4 in a
//! loop: `max_wait_ms` 500, `min_bytes` 1, `max_bytes` and `partition_max_bytes` 1 MiB,
//! from offset 0 and then from the high watermark of each answer, so a partition that
//! has records costs one answer carrying them and then waits like an idle one. All
//! connections run on one current-thread tokio runtime: the point is CPU per request.
//!
//! Unlike the other perf tools this is not a librdkafka client (librdkafka opens one
//! connection per broker, not a thousand): requests are encoded and answers decoded with
//! the `kafka-protocol` types the broker uses (`protocol` re-exports them), over plain
//! TcpStreams. The cluster's metadata (partition leaders) still comes from librdkafka.
//!
//! Output on stdout, one JSON object a line: `{"ready": ...}` once every connection has
//! had its first answer or has failed; a snapshot of the counters for every line read
//! on stdin; and the final counters when it stops (`--duration-s`, SIGTERM, SIGINT or
//! the end of stdin). A connection, frame or decoding error is counted by kind (the
//! first of each kind is described on stderr) and ends that connection; an error code
//! in an answer is counted and that partition is polled again after `max_wait_ms`.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::{Bytes, BytesMut};
use protocol::frame::{decode_frame, FrameError};
use protocol::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use protocol::kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, RequestHeader, ResponseHeader, TopicName,
};
use protocol::kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::admin::AdminClient;
use rdkafka::config::FromClientConfigAndContext;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::tools::{describe_error, ConnectArgs, ToolContext, REQUEST_TIMEOUT};

/// The Fetch version longpoll.py always sent: the oldest the broker serves, and one
/// without fetch sessions, so every request names its partition.
const FETCH_VERSION: i16 = 4;
/// Client id on every request.
const CLIENT_ID: &str = "freshet-perf-pollers";
/// Bytes read from a socket at a time; an idle answer is about 60 bytes.
const READ_CHUNK_BYTES: usize = 4096;

#[derive(clap::Args)]
pub struct PollersArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topics whose partitions are polled, comma separated; their partitions are
    /// assigned to the connections round-robin, one per connection.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "TOPIC[,..]"
    )]
    topics: Vec<String>,
    /// Connections, each long-polling one partition.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    connections: usize,
    /// Fetch `max_wait_ms`: how long the broker holds a fetch that has nothing.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    max_wait_ms: i32,
    /// Fetch `max_bytes`.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_bytes: i32,
    /// Fetch `partition_max_bytes`.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    partition_max_bytes: i32,
    /// Largest answer accepted (a larger size prefix is a frame error): Fetch v4 may
    /// exceed `max_bytes` by one record batch.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    max_answer_bytes: usize,
    /// Longest wait for a connection, and for an answer beyond `max_wait_ms`.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    /// Stop after this many seconds (default: at SIGTERM, SIGINT or the end of stdin).
    #[arg(long, value_name = "S")]
    duration_s: Option<f64>,
}

/// One connection's partition and the broker that leads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    topic: String,
    partition: i32,
    leader: SocketAddr,
}

/// The fetch every connection sends, but for its partition and offset.
#[derive(Debug, Clone, Copy)]
struct FetchShape {
    max_wait_ms: i32,
    max_bytes: i32,
    partition_max_bytes: i32,
}

pub fn run(args: PollersArgs) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.max_wait_ms < 0 || args.max_bytes < 1 || args.partition_max_bytes < 1 {
        bail!("--max-wait-ms must not be negative, --max-bytes and --partition-max-bytes must be positive");
    }
    if let Some(s) = args.duration_s.filter(|s| !(*s > 0.0 && s.is_finite())) {
        bail!("--duration-s must be a positive number, got {s}");
    }
    let partitions = partition_leaders(&args.connect, &args.topics)?;
    let targets: Vec<Target> = (0..args.connections)
        .map(|i| partitions[i % partitions.len()].clone())
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| anyhow!("cannot start the tokio runtime: {err}"))?;
    let result = runtime.block_on(poll_all(args, targets));
    // The stdin reader may still be blocked in read(2); nothing waits for it.
    runtime.shutdown_background();
    result
}

/// Every partition of `topics` with the address of its leader, in topic order, then
/// partition order.
fn partition_leaders(connect: &ConnectArgs, topics: &[String]) -> anyhow::Result<Vec<Target>> {
    let config = connect.client_config(&[]);
    let admin: AdminClient<ToolContext> =
        AdminClient::from_config_and_context(&config, connect.context())
            .map_err(|err| anyhow!("cannot create Kafka admin client: {}", describe_error(&err)))?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|err| {
            admin.inner().context().explain(format!(
                "cannot read the cluster's metadata: {}",
                describe_error(&err)
            ))
        })?;
    let mut brokers = BTreeMap::new();
    for broker in metadata.brokers() {
        let address = format!("{}:{}", broker.host(), broker.port());
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(&address)
            .map_err(|err| anyhow!("cannot resolve broker {address}: {err}"))?
            .next()
            .ok_or_else(|| anyhow!("broker {address} resolves to no address"))?;
        brokers.insert(broker.id(), resolved);
    }
    let mut targets = Vec::new();
    for topic in topics {
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            bail!("topic '{topic}' is not in the cluster's metadata (create it first)");
        };
        let mut partitions: Vec<_> = found.partitions().iter().collect();
        if partitions.is_empty() {
            bail!("topic '{topic}' has no partitions in the cluster's metadata");
        }
        partitions.sort_by_key(|p| p.id());
        for partition in partitions {
            let leader = brokers.get(&partition.leader()).ok_or_else(|| {
                anyhow!(
                    "partition {topic}/{} has no known leader (broker {})",
                    partition.id(),
                    partition.leader()
                )
            })?;
            targets.push(Target {
                topic: topic.clone(),
                partition: partition.id(),
                leader: *leader,
            });
        }
    }
    Ok(targets)
}

/// What went wrong on a connection; each kind is its own counter.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("no connection to {0} within the timeout")]
    ConnectTimeout(SocketAddr),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within the timeout")]
    AnswerTimeout,
    #[error("the broker closed the connection")]
    Closed,
    #[error("bad answer frame: {0}")]
    Frame(#[from] FrameError),
    #[error("cannot decode the answer: {0}")]
    Decode(String),
    #[error("answer has correlation id {got}, expected {expected}")]
    Correlation { got: i32, expected: i32 },
    #[error("answer is not about {topic}/{partition}")]
    WrongPartition { topic: String, partition: i32 },
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

impl PollError {
    fn kind(&self) -> &'static str {
        match self {
            PollError::Connect(..) | PollError::ConnectTimeout(_) => "connect",
            PollError::Io(_) | PollError::Closed => "io",
            PollError::AnswerTimeout => "timeout",
            PollError::Frame(_) => "frame",
            PollError::Decode(_) | PollError::WrongPartition { .. } => "decode",
            PollError::Correlation { .. } => "correlation",
            PollError::Encode(_) => "encode",
        }
    }
}

/// Appends one framed Fetch request (size prefix included) for `target` at `offset`.
fn encode_fetch(
    shape: FetchShape,
    topic: &str,
    partition: i32,
    offset: i64,
    correlation_id: i32,
    out: &mut BytesMut,
) -> Result<(), PollError> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(FETCH_VERSION)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(shape.max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(shape.max_bytes)
        .with_isolation_level(0)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(shape.partition_max_bytes)])]);
    let encode = |e: anyhow::Error| PollError::Encode(e.to_string());
    let start = out.len();
    out.extend_from_slice(&[0; 4]); // size, patched below
    header
        .encode(out, ApiKey::Fetch.request_header_version(FETCH_VERSION))
        .map_err(encode)?;
    request.encode(out, FETCH_VERSION).map_err(encode)?;
    let size = i32::try_from(out.len() - start - 4)
        .map_err(|_| PollError::Encode("request larger than 2 GiB".into()))?;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

/// What a connection needs from one Fetch answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    error_code: i16,
    high_watermark: i64,
    record_bytes: usize,
}

/// Decodes one Fetch v4 answer frame (without its size prefix) to `correlation_id`
/// about `topic`/`partition`.
fn parse_answer(
    frame: Bytes,
    correlation_id: i32,
    topic: &str,
    partition: i32,
) -> Result<Answer, PollError> {
    let mut buf = frame;
    let decode = |e: anyhow::Error| PollError::Decode(e.to_string());
    let header = ResponseHeader::decode(
        &mut buf,
        ApiKey::Fetch.response_header_version(FETCH_VERSION),
    )
    .map_err(decode)?;
    if header.correlation_id != correlation_id {
        return Err(PollError::Correlation {
            got: header.correlation_id,
            expected: correlation_id,
        });
    }
    let response = FetchResponse::decode(&mut buf, FETCH_VERSION).map_err(decode)?;
    let data = response
        .responses
        .iter()
        .filter(|t| t.topic.as_str() == topic)
        .flat_map(|t| t.partitions.iter())
        .find(|p| p.partition_index == partition)
        .ok_or_else(|| PollError::WrongPartition {
            topic: topic.to_owned(),
            partition,
        })?;
    Ok(Answer {
        error_code: data.error_code,
        high_watermark: data.high_watermark,
        record_bytes: data.records.as_ref().map_or(0, Bytes::len),
    })
}

/// Reads until `buf` holds one whole frame and takes it off.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_answer_bytes: usize,
) -> Result<Bytes, PollError> {
    loop {
        if let Some(frame) = decode_frame(buf, max_answer_bytes)? {
            return Ok(frame.freeze());
        }
        buf.reserve(READ_CHUNK_BYTES);
        if stream.read_buf(buf).await? == 0 {
            return Err(PollError::Closed);
        }
    }
}

/// The counters every connection adds to.
#[derive(Default)]
struct Stats {
    answers: AtomicU64,
    record_bytes: AtomicU64,
    /// Answers that carried a Kafka error code for the partition.
    answer_errors: AtomicU64,
    /// Connections that have had their first answer, or have failed before it.
    settled: AtomicUsize,
    failed: AtomicUsize,
    /// Connections that have ended with an error, by kind; with the first message.
    errors: Mutex<BTreeMap<&'static str, (u64, String)>>,
    all_settled: Notify,
}

impl Stats {
    fn settle(&self, total: usize) {
        if self.settled.fetch_add(1, Ordering::Relaxed) + 1 == total {
            self.all_settled.notify_one();
        }
    }

    fn error(&self, err: &PollError) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let entry = errors.entry(err.kind()).or_insert_with(|| {
            eprintln!("freshet perf pollers: {} error: {err}", err.kind());
            (0, err.to_string())
        });
        entry.0 += 1;
    }

    fn snapshot(&self) -> Value {
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let by_kind: BTreeMap<&str, u64> = errors.iter().map(|(k, (n, _))| (*k, *n)).collect();
        let connection_errors: u64 = by_kind.values().sum();
        let answer_errors = self.answer_errors.load(Ordering::Relaxed);
        json!({
            "answers": self.answers.load(Ordering::Relaxed),
            "record_bytes": self.record_bytes.load(Ordering::Relaxed),
            "errors": connection_errors + answer_errors,
            "answer_errors": answer_errors,
            "connection_errors": by_kind,
            "failed_connections": self.failed.load(Ordering::Relaxed),
        })
    }
}

async fn poll_one(
    target: Target,
    shape: FetchShape,
    timeout: Duration,
    max_answer_bytes: usize,
    total: usize,
    stats: Arc<Stats>,
) {
    let mut answered = false;
    if let Err(err) = poll_loop(
        &target,
        shape,
        timeout,
        max_answer_bytes,
        total,
        &stats,
        &mut answered,
    )
    .await
    {
        stats.error(&err);
        stats.failed.fetch_add(1, Ordering::Relaxed);
        if !answered {
            stats.settle(total);
        }
    }
}

async fn poll_loop(
    target: &Target,
    shape: FetchShape,
    timeout: Duration,
    max_answer_bytes: usize,
    total: usize,
    stats: &Stats,
    answered: &mut bool,
) -> Result<(), PollError> {
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(target.leader))
        .await
        .map_err(|_| PollError::ConnectTimeout(target.leader))?
        .map_err(|err| PollError::Connect(target.leader, err))?;
    stream.set_nodelay(true)?;
    let answer_timeout = Duration::from_millis(shape.max_wait_ms as u64) + timeout;
    let mut request = BytesMut::new();
    let mut received = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut offset = 0i64;
    let mut correlation_id = 0i32;
    loop {
        correlation_id = correlation_id.wrapping_add(1);
        request.clear();
        encode_fetch(
            shape,
            &target.topic,
            target.partition,
            offset,
            correlation_id,
            &mut request,
        )?;
        stream.write_all(&request).await?;
        let frame = tokio::time::timeout(
            answer_timeout,
            read_frame(&mut stream, &mut received, max_answer_bytes),
        )
        .await
        .map_err(|_| PollError::AnswerTimeout)??;
        let answer = parse_answer(frame, correlation_id, &target.topic, target.partition)?;
        stats.answers.fetch_add(1, Ordering::Relaxed);
        stats
            .record_bytes
            .fetch_add(answer.record_bytes as u64, Ordering::Relaxed);
        if !*answered {
            *answered = true;
            stats.settle(total);
        }
        if answer.error_code == 0 {
            offset = offset.max(answer.high_watermark);
        } else {
            stats.answer_errors.fetch_add(1, Ordering::Relaxed);
            // Backoff, not synchronisation: a partition in error answers at once, and
            // asking again without a pause would spin.
            tokio::time::sleep(Duration::from_millis(shape.max_wait_ms as u64)).await;
        }
    }
}

/// Why the run ends, or a request for a snapshot.
enum Control {
    Snapshot,
    Stop(&'static str),
}

async fn poll_all(args: PollersArgs, targets: Vec<Target>) -> anyhow::Result<()> {
    let started = Instant::now();
    let stats = Arc::new(Stats::default());
    let shape = FetchShape {
        max_wait_ms: args.max_wait_ms,
        max_bytes: args.max_bytes,
        partition_max_bytes: args.partition_max_bytes,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let total = targets.len();
    for target in targets {
        tokio::spawn(poll_one(
            target,
            shape,
            timeout,
            args.max_answer_bytes,
            total,
            stats.clone(),
        ));
    }

    let (control, mut controls) = mpsc::unbounded_channel();
    // stdin is read on a plain thread: a line asks for a snapshot, its end stops the run.
    let stdin_control = control.clone();
    std::thread::spawn(move || {
        // Newlines are counted in fixed-size reads rather than lines being collected,
        // so a stdin that never sends one (e.g. /dev/zero) costs no memory.
        let mut stdin = std::io::stdin().lock();
        let mut chunk = [0u8; 256];
        loop {
            match stdin.read(&mut chunk) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => {
                    let _ = stdin_control.send(Control::Stop("stdin closed"));
                    return;
                }
                Ok(n) => {
                    for _ in chunk[..n].iter().filter(|b| **b == b'\n') {
                        if stdin_control.send(Control::Snapshot).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| anyhow!("cannot watch for SIGTERM: {err}"))?;
    let deadline = args
        .duration_s
        .map(|s| started + Duration::from_secs_f64(s));
    let until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);

    let mut ready_at: Option<(Instant, u64)> = None;
    let reason = loop {
        tokio::select! {
            _ = stats.all_settled.notified(), if ready_at.is_none() => {
                let now = Instant::now();
                ready_at = Some((now, stats.answers.load(Ordering::Relaxed)));
                let failed = stats.failed.load(Ordering::Relaxed);
                print_line(&json!({
                    "ready": true,
                    "connections": total,
                    "polling": total - failed,
                    "failed": failed,
                    "after_ms": now.duration_since(started).as_millis() as u64,
                }));
            }
            Some(message) = controls.recv() => match message {
                Control::Snapshot => {
                    let mut snapshot = stats.snapshot();
                    snapshot["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
                    print_line(&snapshot);
                }
                Control::Stop(reason) => break reason,
            },
            _ = terminate.recv() => break "SIGTERM",
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            _ = &mut until_deadline => break "duration",
        }
    };
    drop(control);

    let now = Instant::now();
    let mut report = stats.snapshot();
    report["done"] = json!(reason);
    report["connections"] = json!(total);
    report["elapsed_ms"] = json!(now.duration_since(started).as_millis() as u64);
    // The rate over the steady state: from the ready line to the end.
    if let Some((at, answers_then)) = ready_at {
        let window_s = now.duration_since(at).as_secs_f64();
        let answers = stats.answers.load(Ordering::Relaxed) - answers_then;
        report["window_s"] = json!((window_s * 1000.0).round() / 1000.0);
        report["answers_per_s"] = json!(if window_s > 0.0 {
            (answers as f64 / window_s).round()
        } else {
            0.0
        });
    }
    print_line(&report);
    Ok(())
}

/// One JSON line on stdout, flushed so a parent reading the pipe sees it at once.
fn print_line(value: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout (the parent went away) is not worth an error of ours.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::codec::{decode_request, encode_response};
    use protocol::kafka_protocol::messages::fetch_response::{
        FetchableTopicResponse, PartitionData,
    };
    use protocol::{RequestKind, ResponseKind};

    const SHAPE: FetchShape = FetchShape {
        max_wait_ms: 500,
        max_bytes: 1 << 20,
        partition_max_bytes: 1 << 20,
    };

    /// A framed Fetch v4 answer as the broker encodes it.
    fn answer_frame(
        correlation_id: i32,
        topic: &str,
        partition: i32,
        error_code: i16,
        records: Option<&'static [u8]>,
    ) -> BytesMut {
        let body = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partitions(vec![PartitionData::default()
                .with_partition_index(partition)
                .with_error_code(error_code)
                .with_high_watermark(42)
                .with_last_stable_offset(42)
                .with_records(records.map(Bytes::from_static))])]);
        let mut out = BytesMut::new();
        encode_response(
            correlation_id,
            ApiKey::Fetch,
            FETCH_VERSION,
            &ResponseKind::Fetch(body),
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn the_request_decodes_as_the_broker_reads_it() {
        let mut out = BytesMut::new();
        encode_fetch(SHAPE, "idle-3", 7, 42, 9, &mut out).unwrap();
        let size = i32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(size, out.len() - 4);
        let request = decode_request(out.split_off(4).freeze()).unwrap();
        assert_eq!(request.api_key, ApiKey::Fetch);
        assert_eq!(request.header.request_api_version, 4);
        assert_eq!(request.header.correlation_id, 9);
        let RequestKind::Fetch(fetch) = request.body else {
            panic!("decoded as {:?}", request.body);
        };
        assert_eq!(
            (fetch.max_wait_ms, fetch.min_bytes, fetch.max_bytes),
            (500, 1, 1 << 20)
        );
        assert_eq!(fetch.replica_id, BrokerId(-1));
        assert_eq!(fetch.topics.len(), 1);
        assert_eq!(fetch.topics[0].topic.as_str(), "idle-3");
        let partition = &fetch.topics[0].partitions[0];
        assert_eq!(
            (
                partition.partition,
                partition.fetch_offset,
                partition.partition_max_bytes
            ),
            (7, 42, 1 << 20)
        );
    }

    #[test]
    fn an_idle_answer_decodes() {
        let mut buf = answer_frame(5, "idle-0", 3, 0, None);
        let frame = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        let answer = parse_answer(frame.freeze(), 5, "idle-0", 3).unwrap();
        assert_eq!(
            answer,
            Answer {
                error_code: 0,
                high_watermark: 42,
                record_bytes: 0
            }
        );
    }

    #[test]
    fn an_answer_with_records_and_an_error_code_decodes() {
        let mut buf = answer_frame(6, "idle-0", 3, 6, Some(b"0123456789"));
        let frame = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        let answer = parse_answer(frame.freeze(), 6, "idle-0", 3).unwrap();
        assert_eq!((answer.error_code, answer.record_bytes), (6, 10));
    }

    #[test]
    fn a_wrong_correlation_id_or_partition_is_an_error() {
        let mut buf = answer_frame(5, "idle-0", 3, 0, None);
        let frame = decode_frame(&mut buf, 1 << 20).unwrap().unwrap().freeze();
        assert!(matches!(
            parse_answer(frame.clone(), 4, "idle-0", 3),
            Err(PollError::Correlation {
                got: 5,
                expected: 4
            })
        ));
        assert!(matches!(
            parse_answer(frame.clone(), 5, "idle-0", 4),
            Err(PollError::WrongPartition { .. })
        ));
        assert!(matches!(
            parse_answer(frame, 5, "idle-1", 3),
            Err(PollError::WrongPartition { .. })
        ));
    }

    #[test]
    fn a_short_frame_is_an_error_not_a_panic() {
        let mut buf = answer_frame(5, "idle-0", 3, 0, None);
        let frame = decode_frame(&mut buf, 1 << 20).unwrap().unwrap().freeze();
        for cut in 0..frame.len() {
            let err = parse_answer(frame.slice(..cut), 5, "idle-0", 3).unwrap_err();
            assert_eq!(err.kind(), "decode", "cut at {cut}: {err}");
        }
    }

    #[test]
    fn a_partial_or_oversized_frame_waits_or_is_refused() {
        let whole = answer_frame(5, "idle-0", 3, 0, None);
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(decode_frame(&mut partial, 1 << 20), Ok(None));
        let mut buf = whole.clone();
        assert!(matches!(
            decode_frame(&mut buf, 8),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_poller_follows_the_high_watermark_and_counts_answers() {
        // A fake broker that answers two fetches, checks their offsets, then hangs up.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let mut offsets = Vec::new();
            while offsets.len() < 2 {
                socket.read_buf(&mut buf).await.unwrap();
                while let Some(frame) = decode_frame(&mut buf, 1 << 20).unwrap() {
                    let request = decode_request(frame.freeze()).unwrap();
                    let RequestKind::Fetch(fetch) = request.body else {
                        panic!("not a fetch")
                    };
                    offsets.push(fetch.topics[0].partitions[0].fetch_offset);
                    let answer = answer_frame(request.header.correlation_id, "idle-0", 3, 0, None);
                    socket.write_all(&answer).await.unwrap();
                }
            }
            offsets
        });
        let target = Target {
            topic: "idle-0".into(),
            partition: 3,
            leader: address,
        };
        let stats = Arc::new(Stats::default());
        poll_one(
            target,
            SHAPE,
            Duration::from_secs(10),
            1 << 20,
            1,
            stats.clone(),
        )
        .await;
        assert_eq!(server.await.unwrap(), vec![0, 42]);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot["answers"], 2);
        assert_eq!(snapshot["connection_errors"]["io"], 1, "{snapshot}");
        assert_eq!(snapshot["failed_connections"], 1);
        assert_eq!(stats.settled.load(Ordering::Relaxed), 1);
    }
}
