//! The TCP server. Each connection reads frames, dispatches each request at once
//! (a request's state change, `Reply::InOrder` work on the blocking pool, is
//! awaited before the next request is dispatched, so one connection's requests
//! take effect in the order sent: ARCHITECTURE.md), and
//! answers in request order, as Kafka requires, while later requests are already
//! being served. Limits: connections, frame size, requests in flight per
//! connection, the bytes of requests being read or awaiting answers (see
//! [`ReadBudget`]), idle time (a silent peer, a frame left half-sent, a peer that
//! stops reading), and how long shutdown waits for connections to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use bytes::{Bytes, BytesMut};
use protocol::codec::{decode_request, encode_fetch_response, encode_response, peek_preamble};
use protocol::frame::{peek_frame_size, SIZE_PREFIX_BYTES};
use protocol::{ApiKey, ResponseKind};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::api::{self, MemoryHold, Reply};
use crate::Broker;

/// What a connection may buffer of a frame before the frame holds any of the read
/// budget, and the largest frame that is "small" (see [`ReadBudget`]).
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The bytes of requests the broker reads or holds, bounded whatever the peers
/// send (Kafka's `queued.max.request.bytes` memory pool, with a lane for small
/// requests). Three parts, each bounded:
///
/// - The read buffer of a connection holds at most [`READ_BUFFER_BYTES`] of
///   frames that hold no budget yet: nothing is reserved from a size prefix, so a
///   peer announcing a 100 MiB frame and sending nothing costs at most that.
/// - A large frame (more than [`READ_BUFFER_BYTES`] with its prefix) reserves its
///   whole size from `large` (`queued_max_request_bytes`) before the connection
///   reads past the read buffer, and keeps it until its answer is written (or the
///   connection closes). A connection waiting for its reservation is not read.
///   Whole-frame reservation, as Kafka's memory pool does, rather than taking the
///   budget piece by piece as bytes arrive: with pieces, connections each holding
///   part of a frame could spend the whole budget between them and all wait for
///   more, for ever. A waiting connection holds none of `large`, and one holding a
///   reservation needs nothing more to finish its frame; a peer that stops
///   sending is closed by the idle timeout, which gives its reservation back.
/// - A small frame is copied out of the read buffer once whole (so it does not
///   keep the connection's buffer alive while it waits for an answer) and takes
///   its size from `small` (one read buffer per allowed connection) until its
///   answer is written. Small requests have their own lane so that large frames
///   left unfinished by slow or hostile peers, which may hold all of `large` until
///   they are closed as idle, never stop the small requests of other clients
///   (metadata, heartbeats, fetches, most produces). A small frame waits for
///   `small` only once it is whole, holding nothing of it, and what holds `small`
///   is requests being answered, so the wait ends.
///
/// The tokio semaphores are fair: a waiter is served before later ones.
struct ReadBudget {
    large: Arc<Semaphore>,
    small: Arc<Semaphore>,
}

impl ReadBudget {
    fn new(config: &crate::BrokerConfig) -> ReadBudget {
        ReadBudget {
            large: Arc::new(Semaphore::new(config.queued_max_request_bytes)),
            small: Arc::new(Semaphore::new(
                config.max_connections.saturating_mul(READ_BUFFER_BYTES),
            )),
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then stops reading requests,
/// answers the ones in flight and returns once every connection is closed.
pub async fn run(broker: Arc<Broker>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(broker.config.max_connections));
    let budget = Arc::new(ReadBudget::new(&broker.config));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        broker.metrics.connections_refused.inc();
                        tracing::warn!(%peer, limit = broker.config.max_connections,
                            "connection limit reached; closing the new connection");
                        continue;
                    };
                    broker.metrics.connections_accepted.inc();
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(serve_connection(broker.clone(), budget.clone(), stream, peer, stop_rx.clone(), permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    // A peer that stops reading would otherwise hold its connection, and so the
    // shutdown, forever.
    let grace = Duration::from_millis(broker.config.shutdown_timeout_ms);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            timeout_ms = broker.config.shutdown_timeout_ms,
            "shutdown: closing connections that did not finish answering in time"
        );
        tasks.shutdown().await;
    }
}

/// A response in the connection's answer queue, with the read budget its request
/// holds until the answer is written.
struct Queued {
    slot: Slot,
    _budget: OwnedSemaphorePermit,
}

/// A response in the connection's answer queue.
enum Slot {
    Ready(Bytes),
    Pending(JoinHandle<Option<Encoded>>),
    /// acks=0 produce: nothing is sent back.
    Silent,
}

/// An encoded answer, as chunks to be written in order (a fetch answer's record
/// data is the buffer it was read into: see `encode_fetch_response`), and the
/// memory budget it holds until it is written.
struct Encoded {
    chunks: Vec<Bytes>,
    _hold: Held,
}

/// A fetch answer's share of `fetch_memory_bytes`, and its bytes counted in
/// `Broker::fetch_answer_bytes`, both given back when it is dropped: after the
/// write, or unwritten when the connection closes. Dropping it also lets the
/// connection's next fetch start (see [`FetchTurn`]).
#[derive(Default)]
struct Held {
    _permit: MemoryHold,
    counted: Option<(Arc<Broker>, usize)>,
    _turn_done: Option<oneshot::Sender<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((broker, bytes)) = self.counted.take() {
            broker.fetch_answer_bytes.sub(bytes);
        }
    }
}

/// Fetches on one connection run one after the other, each once the answer
/// before it is written (Kafka serves a connection one request at a time).
/// Otherwise a later fetch could take the fetch memory an earlier one needs,
/// while its own answer waits behind that earlier one: a deadlock holding the
/// budget for good.
#[derive(Default)]
struct FetchTurn {
    /// Resolves (with an error: the sender is dropped, never used) once the
    /// previous fetch's answer is written or dropped.
    previous: Option<oneshot::Receiver<()>>,
}

impl FetchTurn {
    /// The turn to wait for, and the signal that ends the new fetch's turn.
    fn next(&mut self) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (done, next) = oneshot::channel();
        (self.previous.replace(next), done)
    }
}

/// What the reader and the writer of one connection share to tell an idle
/// connection from a busy one.
struct Activity {
    started: Instant,
    /// Requests read and not yet answered (or dropped, for acks=0).
    in_flight: AtomicUsize,
    /// When an answer was last written, in ms since `started`.
    last_write_ms: AtomicU64,
}

impl Activity {
    fn last_write(&self) -> Instant {
        self.started + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }
    fn wrote(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_write_ms.store(ms, Ordering::Relaxed);
    }
}

/// One open connection in the `connections` gauge, while it lives.
struct Open(prometheus_client::metrics::gauge::Gauge);

impl Open {
    fn count(gauge: &prometheus_client::metrics::gauge::Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Aborts the task when dropped, so that a connection task cut short at shutdown
/// takes its writer with it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_connection(
    broker: Arc<Broker>,
    budget: Arc<ReadBudget>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _open = Open::count(&broker.metrics.connections_open);
    let idle = Duration::from_millis(broker.config.connections_max_idle_ms);
    let max_frame = broker.config.max_request_bytes;
    let (mut reader, writer) = stream.into_split();
    let (slots, queue) = mpsc::channel(broker.config.max_in_flight_per_connection);
    let activity = Arc::new(Activity {
        started: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_write_ms: AtomicU64::new(0),
    });
    let mut writer = AbortOnDrop(tokio::spawn(write_responses(
        writer,
        queue,
        peer,
        activity.clone(),
        idle,
    )));
    // Grows as bytes arrive: READ_BUFFER_BYTES at most until the frame at its front
    // holds a reservation (`reserved`), then up to that frame's size.
    let mut buf = BytesMut::new();
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    // Only a whole request counts as activity: a peer trickling the bytes of one
    // frame, or stopping halfway, is idle.
    let mut last_request = Instant::now();
    let mut writer_done = false;
    let mut fetch_turn = FetchTurn::default();
    'conn: loop {
        // Serve every whole frame in the buffer; learn how much more to read.
        let read_limit = loop {
            let size = match peek_frame_size(&buf, max_frame) {
                Ok(Some(size)) => size,
                Ok(None) => break READ_BUFFER_BYTES - buf.len(),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "closing connection: bad frame");
                    break 'conn;
                }
            };
            let frame_bytes = SIZE_PREFIX_BYTES + size;
            if buf.len() < frame_bytes {
                if frame_bytes <= READ_BUFFER_BYTES {
                    break READ_BUFFER_BYTES - buf.len();
                }
                if reserved.is_none() && buf.len() < READ_BUFFER_BYTES {
                    // The first read buffer's worth of a large frame costs no
                    // budget: a peer that announces a frame and stops holds none.
                    break READ_BUFFER_BYTES - buf.len();
                }
                if reserved.is_none() {
                    // The body's size: at most max_request_bytes, which the config
                    // checks fits queued_max_request_bytes (and a u32), so the
                    // reservation can always be granted.
                    let wait = budget.large.clone().acquire_many_owned(size as u32);
                    match wait_for_budget(wait, &mut stop, &mut writer.0, &mut writer_done).await {
                        Some(permit) => reserved = Some(permit),
                        None => break 'conn,
                    }
                    last_request = Instant::now(); // muted by us, not idle
                                                   // The reservation covers the whole frame: its buffer may have
                                                   // the frame's capacity (pages are touched only as bytes arrive).
                    buf.reserve(frame_bytes - buf.len());
                }
                // Read up to the frame's end, not into the next frame, whose
                // bytes would have no budget.
                break frame_bytes - buf.len();
            }
            // A whole frame.
            let (frame, held) = match reserved.take() {
                Some(permit) => {
                    buf.advance(SIZE_PREFIX_BYTES);
                    (buf.split_to(size).freeze(), permit)
                }
                None => {
                    debug_assert!(frame_bytes <= READ_BUFFER_BYTES);
                    let wait = budget.small.clone().acquire_many_owned(frame_bytes as u32);
                    let Some(permit) =
                        wait_for_budget(wait, &mut stop, &mut writer.0, &mut writer_done).await
                    else {
                        break 'conn;
                    };
                    // Copied out, so that the read buffer is not kept alive (and
                    // reallocated) for as long as the request waits for its answer.
                    let frame = Bytes::copy_from_slice(&buf[SIZE_PREFIX_BYTES..frame_bytes]);
                    buf.advance(frame_bytes);
                    (frame, permit)
                }
            };
            last_request = Instant::now();
            match handle_frame(&broker, frame, peer, &mut fetch_turn).await {
                Some(slot) => {
                    activity.in_flight.fetch_add(1, Ordering::Relaxed);
                    let queued = Queued {
                        slot,
                        _budget: held,
                    };
                    if slots.send(queued).await.is_err() {
                        break 'conn; // the writer has stopped
                    }
                }
                None => break 'conn,
            }
        };
        debug_assert!(read_limit > 0);
        buf.reserve(read_limit);
        let idle_since = last_request.max(activity.last_write());
        let buffered = buf.len();
        let mut limited = (&mut buf).limit(read_limit);
        tokio::select! {
            read = reader.read_buf(&mut limited) => match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    break;
                }
            },
            _ = stop.changed() => break,
            // The writer gave up on the peer (it stopped reading): close.
            _ = &mut writer.0 => {
                writer_done = true;
                break;
            }
            _ = tokio::time::sleep_until(idle_since + idle) => {
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    // Waiting for our own answers (a long poll, an fsync) is not idle.
                    last_request = Instant::now();
                } else if last_request.max(activity.last_write()) + idle <= Instant::now() {
                    if buffered == 0 {
                        tracing::info!(%peer, idle_ms = idle.as_millis() as u64, "closing idle connection");
                    } else {
                        tracing::warn!(%peer, idle_ms = idle.as_millis() as u64, buffered_bytes = buffered,
                            "closing connection: request frame left unfinished");
                    }
                    break;
                }
            }
        }
    }
    drop(slots);
    drop(reserved);
    if !writer_done {
        let _ = (&mut writer.0).await;
    }
}

/// Waits for a share of the read budget without reading the connection (the peer's
/// bytes stay in its socket: TCP pushes back). `None` if the broker is stopping or
/// the writer gave up on the peer meanwhile. No idle timeout here: the wait is the
/// broker's doing, and what holds the budget gives it back (answers are written,
/// stalled frames are closed as idle).
async fn wait_for_budget(
    wait: impl Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>>,
    stop: &mut watch::Receiver<bool>,
    writer: &mut JoinHandle<()>,
    writer_done: &mut bool,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = wait => permit.ok(),
        _ = stop.changed() => None,
        _ = writer => {
            *writer_done = true;
            None
        }
    }
}

/// Turns one frame into a queued answer, or `None` to close the connection (what
/// Kafka does for requests it cannot parse or does not serve). Returns once the
/// request's in-order work (an append) is done, so the next frame's comes after.
async fn handle_frame(
    broker: &Arc<Broker>,
    frame: Bytes,
    peer: SocketAddr,
    fetch_turn: &mut FetchTurn,
) -> Option<Slot> {
    let preamble = match peek_preamble(&frame) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing connection: malformed request");
            return None;
        }
    };
    let Ok(api_key) = ApiKey::try_from(preamble.api_key) else {
        tracing::warn!(%peer, api_key = preamble.api_key, "closing connection: unknown API key");
        return None;
    };
    let correlation_id = preamble.correlation_id;
    let version = preamble.api_version;
    if !api::is_supported(api_key, version) {
        if api_key == ApiKey::ApiVersions {
            // KIP-511: answer in v0 with UNSUPPORTED_VERSION and our ranges, so the
            // client can retry with a version we serve.
            return encode(
                correlation_id,
                api_key,
                0,
                &api::api_versions::unsupported_version(),
                peer,
            )
            .map(Slot::Ready);
        }
        tracing::warn!(%peer, ?api_key, version, "closing connection: unsupported API version");
        return None;
    }
    let request = match decode_request(frame) {
        Ok(r) => r,
        Err(e) if api_key == ApiKey::ApiVersions => {
            tracing::warn!(%peer, error = %e, "malformed ApiVersions request");
            return encode(
                correlation_id,
                api_key,
                0,
                &api::api_versions::unsupported_version(),
                peer,
            )
            .map(Slot::Ready);
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "closing connection: malformed request");
            return None;
        }
    };
    let started = std::time::Instant::now();
    let metrics = broker.metrics.clone();
    let answered = move |body: &ResponseKind| metrics.answered(api_key, started, body);
    let mut reply = api::dispatch(broker, request, peer);
    if let Reply::InOrder(work) = reply {
        reply = match tokio::task::spawn_blocking(work).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::error!(%peer, ?api_key, error = %e, "request handler failed; closing connection");
                return None;
            }
        };
    }
    match reply {
        Reply::InOrder(_) => {
            tracing::error!(%peer, ?api_key, "in-order work gave more in-order work; closing connection");
            None
        }
        Reply::Now(Some(body)) => {
            answered(&body);
            encode(correlation_id, api_key, version, &body, peer).map(Slot::Ready)
        }
        Reply::Now(None) => Some(Slot::Silent),
        Reply::Later(future) => Some(Slot::Pending(tokio::spawn(async move {
            let body = future.await?;
            answered(&body);
            let bytes = encode(correlation_id, api_key, version, &body, peer)?;
            Some(Encoded {
                chunks: vec![bytes],
                _hold: Held::default(),
            })
        }))),
        Reply::Holding(future) => {
            let broker = broker.clone();
            let (previous, turn_done) = fetch_turn.next();
            Some(Slot::Pending(tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _waiting = broker.fetch_waiting_turn.count(1);
                    let _ = previous.await;
                }
                let (body, permit) = future.await?;
                answered(&body);
                let chunks = match &body {
                    ResponseKind::Fetch(fetch) => {
                        match encode_fetch_response(correlation_id, version, fetch) {
                            Ok(chunks) => chunks,
                            Err(e) => {
                                tracing::error!(%peer, error = %e, "cannot encode response; closing connection");
                                return None;
                            }
                        }
                    }
                    _ => vec![encode(correlation_id, api_key, version, &body, peer)?],
                };
                drop(body); // the chunks keep what they share with it
                let bytes = chunks.iter().map(Bytes::len).sum();
                broker.fetch_answer_bytes.add(bytes);
                let counted = Some((broker, bytes));
                Some(Encoded {
                    chunks,
                    _hold: Held {
                        _permit: permit,
                        counted,
                        _turn_done: Some(turn_done),
                    },
                })
            })))
        }
    }
}

fn encode(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    body: &ResponseKind,
    peer: SocketAddr,
) -> Option<Bytes> {
    let mut out = BytesMut::new();
    match encode_response(correlation_id, api_key, version, body, &mut out) {
        Ok(()) => Some(out.freeze()),
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot encode response; closing connection");
            None
        }
    }
}

async fn write_responses(
    writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Queued>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    idle: Duration,
) {
    let mut writer = BufWriter::with_capacity(READ_BUFFER_BYTES, writer);
    // Each request's read budget (`_budget`) goes when the loop body ends: after its
    // answer is written, or when the connection closes without writing it.
    while let Some(Queued { slot, _budget }) = queue.recv().await {
        let answer = match slot {
            Slot::Ready(bytes) => Encoded {
                chunks: vec![bytes],
                _hold: Held::default(),
            },
            Slot::Silent => {
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            Slot::Pending(handle) => match handle.await {
                Ok(Some(answer)) => answer,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "request handler failed; closing connection");
                    break;
                }
            },
        };
        // A peer that stops reading must not hold the answer (and its share of
        // fetch memory) for ever: an answer not written within `idle` closes
        // the connection.
        if !write_within(idle, write_chunks(&mut writer, &answer.chunks), peer).await {
            break;
        }
        drop(answer); // the bytes are in the socket (or the 64 KiB buffer): release the hold
        activity.wrote();
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        if queue.is_empty() && !write_within(idle, writer.flush(), peer).await {
            break;
        }
    }
    let _ = tokio::time::timeout(idle, async {
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Writes `chunks` in order with vectored writes. Through the `BufWriter`, an
/// answer smaller than its buffer is copied into it (several small answers go out
/// in one write), a larger one goes to the socket straight from its chunks.
async fn write_chunks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: &[Bytes],
) -> std::io::Result<()> {
    let mut chunks = chunks;
    let mut skip = 0; // bytes of chunks[0] already written
    while !chunks.is_empty() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks
            .iter()
            .take(64)
            .enumerate()
            .map(|(i, c)| std::io::IoSlice::new(if i == 0 { &c[skip..] } else { c }))
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while let Some(first) = chunks.first() {
            let left = first.len() - skip;
            if n < left {
                skip += n;
                break;
            }
            n -= left;
            skip = 0;
            chunks = &chunks[1..];
        }
    }
    Ok(())
}

/// Runs one write; false (with a log line) if it failed or did not finish in `idle`.
async fn write_within(
    idle: Duration,
    write: impl Future<Output = std::io::Result<()>>,
    peer: SocketAddr,
) -> bool {
    match tokio::time::timeout(idle, write).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "write failed");
            false
        }
        Err(_) => {
            tracing::warn!(%peer, idle_ms = idle.as_millis() as u64, "closing connection: peer stopped reading answers");
            false
        }
    }
}
