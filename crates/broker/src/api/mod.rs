//! Kafka API handlers, one module per API. [`dispatch`] routes a decoded request;
//! [`SUPPORTED`] is what ApiVersions advertises and exactly what is implemented.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use protocol::codec::Request;
use protocol::kafka_protocol::protocol::StrBytes;
use protocol::{ApiKey, RequestKind, ResponseError, ResponseKind};

use crate::group;
use crate::txn;
use crate::Broker;

pub mod api_versions;
pub mod configs;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_records;
pub mod delete_topics;
pub mod describe_cluster;
pub mod describe_log_dirs;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod metadata;
pub mod produce;

/// (API, lowest version, highest version) served.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::EndTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
];

pub fn is_supported(api_key: ApiKey, version: i16) -> bool {
    SUPPORTED
        .iter()
        .any(|(k, min, max)| *k == api_key && (*min..=*max).contains(&version))
}

/// What a handler gives back: an answer now, or a future one (a long-polling fetch,
/// an acks=all produce waiting for fsync, a read that touches the disk), or work
/// that changes broker state to run in the request's turn.
///
/// Architecture invariant: a request's effect on broker state happens in the
/// order the connection sent it. A handler that changes state does so either
/// synchronously in [`dispatch`] (group membership, heartbeats) or in
/// [`Reply::InOrder`] work; a `Later` future only waits (for an fsync, a
/// rebalance, new data) and reads. Never put a state change in a `Later` future:
/// it runs when first polled, after later requests' changes may have run.
/// `None` means no response is sent (acks=0).
#[allow(clippy::large_enum_variant)] // one per request; boxing buys nothing
pub enum Reply {
    Now(Option<ResponseKind>),
    Later(Pin<Box<dyn Future<Output = Option<ResponseKind>> + Send>>),
    /// A future answer that holds part of a broker-wide memory budget (a fetch's
    /// record bytes): the server keeps the hold until the encoded answer has been
    /// written to the socket, so the budget bounds what answers really occupy.
    Holding(Pin<Box<dyn Future<Output = Option<HeldAnswer>> + Send>>),
    /// Work that changes broker state (appends to a log, creates a topic), to run
    /// on the blocking pool before the connection dispatches its next request, so
    /// that one connection's changes keep the order they were sent in (idempotent
    /// producers and pipelined offset commits rely on it) while
    /// a `pwrite` held up by the disk (dirty-page throttling, a segment roll)
    /// stalls no runtime worker. Gives the reply to answer with.
    InOrder(Box<dyn FnOnce() -> Reply + Send>),
}

/// An answer and the part of a memory budget it holds.
pub type HeldAnswer = (ResponseKind, MemoryHold);

/// Part of a memory budget, released when dropped; `None` when the budget was
/// closed (shutting down) and the answer goes out regardless.
pub type MemoryHold = Option<tokio::sync::OwnedSemaphorePermit>;

impl Reply {
    fn now(body: impl Into<ResponseKind>) -> Reply {
        Reply::Now(Some(body.into()))
    }

    /// Runs `work` on the blocking pool in the request's turn: it changes broker
    /// state (and may do file I/O), so it must take effect before the next
    /// request of the connection does. Anything that only waits (an fsync) goes
    /// in the `Reply` it gives back.
    fn in_order(
        broker: &Arc<Broker>,
        work: impl FnOnce(&Arc<Broker>) -> Reply + Send + 'static,
    ) -> Reply {
        let broker = broker.clone();
        Reply::InOrder(Box::new(move || work(&broker)))
    }

    /// Runs `work`, which only reads broker state, on the blocking pool: it does
    /// file I/O. Later requests of the connection may be served meanwhile.
    fn blocking<R: Into<ResponseKind>>(
        broker: &Arc<Broker>,
        work: impl FnOnce(&Broker) -> R + Send + 'static,
    ) -> Reply {
        let broker = broker.clone();
        Reply::Later(Box::pin(async move {
            match tokio::task::spawn_blocking(move || work(&broker).into()).await {
                Ok(body) => Some(body),
                Err(e) => {
                    tracing::error!(error = %e, "request handler panicked");
                    None
                }
            }
        }))
    }
}

/// Routes a request whose API and version [`is_supported`].
/// `peer` is the client's address (DescribeGroups reports it as `client_host`).
pub fn dispatch(broker: &Arc<Broker>, request: Request, peer: std::net::SocketAddr) -> Reply {
    let v = request.header.request_api_version;
    match request.body {
        RequestKind::ApiVersions(r) => Reply::now(api_versions::handle(&r, v)),
        // Metadata may create topics (auto-create): in order.
        RequestKind::Metadata(r) => {
            Reply::in_order(broker, move |b| Reply::now(metadata::handle(b, r, v)))
        }
        RequestKind::Produce(r) => Reply::in_order(broker, move |b| produce::handle(b, r)),
        RequestKind::Fetch(r) => fetch::handle(broker, r, v),
        RequestKind::ListOffsets(r) => {
            Reply::blocking(broker, move |b| list_offsets::handle(b, r, v))
        }
        RequestKind::CreateTopics(r) => {
            Reply::in_order(broker, move |b| Reply::now(create_topics::handle(b, r, v)))
        }
        RequestKind::DeleteTopics(r) => {
            Reply::in_order(broker, move |b| Reply::now(delete_topics::handle(b, r, v)))
        }
        RequestKind::CreatePartitions(r) => {
            Reply::in_order(broker, move |b| Reply::now(create_partitions::handle(b, r)))
        }
        RequestKind::DeleteRecords(r) => {
            Reply::in_order(broker, move |b| Reply::now(delete_records::handle(b, r)))
        }
        RequestKind::DescribeConfigs(r) => Reply::now(configs::describe(broker, r, v)),
        RequestKind::DescribeLogDirs(r) => Reply::now(describe_log_dirs::handle(broker, r)),
        RequestKind::AlterConfigs(r) => {
            Reply::in_order(broker, move |b| Reply::now(configs::alter(b, r)))
        }
        RequestKind::IncrementalAlterConfigs(r) => Reply::in_order(broker, move |b| {
            Reply::now(configs::incremental_alter(b, r))
        }),
        RequestKind::DescribeCluster(r) => Reply::now(describe_cluster::handle(broker, r)),
        RequestKind::FindCoordinator(r) => {
            Reply::now(group::find_coordinator::handle(broker, r, v))
        }
        RequestKind::JoinGroup(r) => {
            let client_id = request
                .header
                .client_id
                .as_deref()
                .unwrap_or_default()
                .to_string();
            // Kafka reports the host as `/ip`.
            group::join::handle(broker, client_id, format!("/{}", peer.ip()), r, v)
        }
        RequestKind::SyncGroup(r) => group::sync::handle(broker, r, v),
        RequestKind::Heartbeat(r) => Reply::now(group::heartbeat::handle(broker, r, v)),
        RequestKind::LeaveGroup(r) => Reply::now(group::leave::handle(broker, r, v)),
        RequestKind::OffsetCommit(r) => {
            Reply::in_order(broker, move |b| group::offset_commit::handle(b, r, v))
        }
        RequestKind::OffsetFetch(r) => Reply::now(group::offset_fetch::handle(broker, r, v)),
        RequestKind::ListGroups(r) => Reply::now(group::list_groups::handle(broker, r, v)),
        RequestKind::DescribeGroups(r) => Reply::now(group::describe_groups::handle(broker, r, v)),
        RequestKind::DeleteGroups(r) => {
            Reply::in_order(broker, move |b| group::delete_groups::handle(b, r))
        }
        RequestKind::OffsetDelete(r) => {
            Reply::in_order(broker, move |b| group::offset_delete::handle(b, r))
        }
        RequestKind::InitProducerId(r) => Reply::in_order(broker, move |b| {
            Reply::now(init_producer_id::handle(b, r, v))
        }),
        // The transaction requests change the coordinator's state, and may fsync
        // (EndTxn waits for its markers): in order, on the blocking pool.
        RequestKind::AddPartitionsToTxn(r) => Reply::in_order(broker, move |b| {
            Reply::now(txn::add_partitions::handle(b, r, v))
        }),
        RequestKind::AddOffsetsToTxn(r) => Reply::in_order(broker, move |b| {
            Reply::now(txn::add_offsets::handle(b, r, v))
        }),
        RequestKind::EndTxn(r) => {
            Reply::in_order(broker, move |b| Reply::now(txn::end::handle(b, r, v)))
        }
        RequestKind::TxnOffsetCommit(r) => Reply::in_order(broker, move |b| {
            Reply::now(txn::offset_commit::handle(b, r, v))
        }),
        other => {
            // is_supported() admitted it, so SUPPORTED and this match disagree.
            unreachable!("dispatch has no handler for {other:?}")
        }
    }
}

#[cfg(test)]
mod every_version;

pub(crate) fn code(err: ResponseError) -> i16 {
    err.code()
}

pub(crate) fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}
