//! The broker: Kafka API handlers over the storage layer, the topic registry and
//! topic configs, group commit (the flusher), long-polling fetches and the TCP
//! server with its limits.
//!
//! Owns: everything a Kafka client can ask of a single node. It may not parse
//! record batches itself (that is `protocol::record_batch`) nor lay out files
//! (that is `storage`, and the registry's metadata files in [`topics`]).

pub mod api;
pub mod broker;
pub mod config;
pub mod flusher;
pub mod group;
pub mod idempotence;
pub mod metrics;
pub mod server;
pub mod topic_config;
pub mod topics;
pub mod txn;

pub use broker::{Broker, Clock, SystemClock};
pub use config::BrokerConfig;
