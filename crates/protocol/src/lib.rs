//! The Kafka wire protocol, as bytes in and values out.
//!
//! Owns: length-prefixed framing ([`frame`]), request decoding and response encoding
//! over the `kafka-protocol` crate ([`codec`]), and zero-copy inspection and
//! validation of v2 record batches ([`record_batch`]), which both the broker and the
//! storage layer use. It may not touch files, tokio or broker state; its one piece of
//! I/O is [`client`], a blocking request and answer on a TCP stream for the clients
//! of the workspace (never the broker's server).

pub mod client;
pub mod codec;
pub mod frame;
pub mod record_batch;

pub use kafka_protocol;
pub use kafka_protocol::error::ResponseError;
pub use kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};

/// A Kafka error code as it travels on the wire (0 = none).
pub type ErrorCode = i16;

/// The wire code of `err`, for response fields.
pub fn code(err: ResponseError) -> ErrorCode {
    err.code()
}
