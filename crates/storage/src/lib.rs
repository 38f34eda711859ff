//! The partition log: one directory per partition holding segments named by base
//! offset, each with a sparse offset index and a time index. Owns append, read by
//! offset, recovery after a crash, retention, truncation, the log start offset, the
//! high watermark and the recovery point (how far the log is known to be fsync'd).
//!
//! It never touches the network and knows nothing of topics or Kafka APIs: the
//! broker hands it validated v2 record batches and asks for byte ranges back. Time
//! is passed in (`now_ms`) so that tests control it.
//!
//! On disk, in the partition's directory:
//! - `{base_offset:020}.log`: whole v2 batches, back to back, offsets without gaps;
//! - `{base_offset:020}.index`: sparse offset index (relative offset u32 BE,
//!   position u32 BE), one entry per `index_interval_bytes` of log;
//! - `{base_offset:020}.timeindex`: time index (largest timestamp so far i64 BE,
//!   relative offset u32 BE);
//! - `log-start-offset`, `recovery-point`: checksummed offsets; `truncate-to`
//!   exists only while a truncation is in progress.
//!
//! Codemap:
//! - `log`: [`PartitionLog`], the segment map and the offsets that tie it together
//!   (log start, high watermark, recovery point), read and flush handles.
//! - `segment`: one `.log` file with its two indexes; append, locate, truncate, scan.
//! - `index`: the sparse offset index and time index, kept in memory and appended to
//!   their files; sanity checks used by recovery.
//! - `recovery`: what `open` does: clean up, trust what was fsync'd, validate the rest.
//! - `retention`: deleting old segments by time and size.
//! - `checkpoint`: the small checksummed files `log-start-offset` and `recovery-point`.
//! - `scan`: positioned, chunked reads of batch headers from a segment file.
//! - `records`: walking the records of a batch, decompressing it if need be
//!   (timestamp lookups only; the stored bytes are never rewritten).
//!
//! Architecture invariants:
//! - Batches are stored byte for byte as the producer sent them; only the base offset
//!   and partition leader epoch (not covered by the CRC) are rewritten.
//! - The storage crate never touches the network and never decodes records except to
//!   answer a timestamp lookup (decompressing a copy of the batch, within a byte
//!   limit, and never under the caller's lock when it uses `lookup_timestamp`).
//! - Bytes after the recovery point are never trusted at open: they are CRC-checked
//!   batch by batch and the log is cut at the first bad one.
//! - `log_start_offset <= high_watermark <= log_end_offset`, and the last segment (the
//!   active one, which takes appends) always exists.
//! - A failed fsync is final for the bytes it covered (PostgreSQL's "fsyncgate" rule:
//!   the kernel may have dropped the dirty pages and will report the next fsync as a
//!   success). The log cuts itself back to its recovery point, the last offset an
//!   fsync did vouch for, and goes offline: no append, read or flush until it is
//!   opened again, so no later fsync can vouch for bytes the failed one covered.

use std::io;

pub use protocol::record_batch::BatchError;

mod checkpoint;
mod fsutil;
mod index;
mod log;
mod records;
mod recovery;
mod retention;
mod scan;
mod segment;

pub use log::{BatchSearch, FlushHandle, PartitionLog, ReadSlice, TimestampLookup};

/// Per-partition settings; the broker derives them from topic configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment when the active one would grow past this.
    pub segment_bytes: u64,
    /// Roll when the active segment's first batch was appended this long ago.
    pub segment_ms: i64,
    /// Delete segments whose newest timestamp is older than this; -1 keeps forever.
    pub retention_ms: i64,
    /// Delete oldest segments while the log is larger than this; -1 = no limit.
    pub retention_bytes: i64,
    /// Bytes of log between two offset-index entries.
    pub index_interval_bytes: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            index_interval_bytes: 4096,
        }
    }
}

/// Corruption found in bytes already accepted into the log (outside recovery, which
/// repairs it) is reported as `Io` with [`io::ErrorKind::InvalidData`]: to the broker
/// it is a storage failure like any other.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("offset {requested} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        requested: i64,
        log_start: i64,
        log_end: i64,
    },
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// An fsync of this log failed: it takes no appends, serves no reads and vouches
    /// for nothing until it is opened again (see [`PartitionLog::fail`]).
    #[error("log {path} is offline after a failed fsync: {reason}")]
    Offline { path: String, reason: String },
}

impl StorageError {
    pub(crate) fn corrupt(path: &std::path::Path, message: String) -> StorageError {
        StorageError::Io {
            path: path.display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidData, message),
        }
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Bytes of torn or corrupt tail cut off the log: the cut segment's tail plus
    /// every later segment deleted because it followed the cut.
    pub truncated_bytes: u64,
    /// Bytes validated batch by batch (only the part after the recovery point).
    pub validated_bytes: u64,
    /// Index files rebuilt because they were missing or damaged.
    pub rebuilt_indexes: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_segments: u32,
    pub deleted_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampOffset {
    pub offset: i64,
    pub timestamp: i64,
}
