//! The TCP server. Each connection reads frames, dispatches each request at once
//! (so appends from one connection happen in the order they were sent), and
//! answers in request order, as Kafka requires, while later requests are already
//! being served. Limits: connections, frame size, requests in flight per
//! connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use protocol::codec::{decode_request, encode_response, peek_preamble};
use protocol::frame::decode_frame;
use protocol::{ApiKey, ResponseKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::api::{self, Reply};
use crate::Broker;

const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `listener` until `shutdown` resolves, then stops reading requests,
/// answers the ones in flight and returns once every connection is closed.
pub async fn run(broker: Arc<Broker>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(broker.config.max_connections));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, limit = broker.config.max_connections,
                            "connection limit reached; closing the new connection");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(serve_connection(broker.clone(), stream, peer, stop_rx.clone(), permit));
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
    while tasks.join_next().await.is_some() {}
}

/// A response in the connection's answer queue.
enum Slot {
    Ready(BytesMut),
    Pending(JoinHandle<Option<BytesMut>>),
    /// acks=0 produce: nothing is sent back.
    Silent,
}

async fn serve_connection(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let (mut reader, writer) = stream.into_split();
    let (slots, queue) = mpsc::channel(broker.config.max_in_flight_per_connection);
    let writer = tokio::spawn(write_responses(writer, queue, peer));
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    'conn: loop {
        loop {
            match decode_frame(&mut buf, broker.config.max_request_bytes) {
                Ok(Some(frame)) => match handle_frame(&broker, frame.freeze(), peer) {
                    Some(slot) => {
                        if slots.send(slot).await.is_err() {
                            break 'conn; // the writer has stopped
                        }
                    }
                    None => break 'conn,
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "closing connection: bad frame");
                    break 'conn;
                }
            }
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(slots);
    let _ = writer.await;
}

/// Turns one frame into a queued answer, or `None` to close the connection (what
/// Kafka does for requests it cannot parse or does not serve).
fn handle_frame(broker: &Arc<Broker>, frame: Bytes, peer: SocketAddr) -> Option<Slot> {
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
    match api::dispatch(broker, request, peer) {
        Reply::Now(Some(body)) => {
            encode(correlation_id, api_key, version, &body, peer).map(Slot::Ready)
        }
        Reply::Now(None) => Some(Slot::Silent),
        Reply::Later(future) => Some(Slot::Pending(tokio::spawn(async move {
            let body = future.await?;
            encode(correlation_id, api_key, version, &body, peer)
        }))),
    }
}

fn encode(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    body: &ResponseKind,
    peer: SocketAddr,
) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    match encode_response(correlation_id, api_key, version, body, &mut out) {
        Ok(()) => Some(out),
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot encode response; closing connection");
            None
        }
    }
}

async fn write_responses(
    writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Slot>,
    peer: SocketAddr,
) {
    let mut writer = BufWriter::with_capacity(READ_BUFFER_BYTES, writer);
    while let Some(slot) = queue.recv().await {
        let bytes = match slot {
            Slot::Ready(bytes) => bytes,
            Slot::Silent => continue,
            Slot::Pending(handle) => match handle.await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "request handler failed; closing connection");
                    break;
                }
            },
        };
        if writer.write_all(&bytes).await.is_err() {
            break;
        }
        if queue.is_empty() && writer.flush().await.is_err() {
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}
