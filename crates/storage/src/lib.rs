//! The partition log: one directory per partition holding segments named by base
//! offset, each with a sparse offset index and a time index. Owns append, read by
//! offset, recovery after a crash, retention, truncation, the log start offset, the
//! high watermark and the recovery point (how far the log is known to be fsync'd).
//!
//! It never touches the network and knows nothing of topics or Kafka APIs: the
//! broker hands it validated v2 record batches and asks for byte ranges back. Time
//! is passed in (`now_ms`) so that tests control it.
//!
//! API CONTRACT (stub: implementation in progress, see module docs as they land).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
pub use protocol::record_batch::BatchError;

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

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("offset {requested} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange { requested: i64, log_start: i64, log_end: i64 },
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
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
    /// Bytes of torn or corrupt tail cut off the active segment.
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

/// Whole batches of one segment file, located under the partition lock and read
/// without it (the file is append-only below `position + len`).
#[derive(Debug, Clone)]
pub struct ReadSlice {
    pub file: Arc<File>,
    pub position: u64,
    pub len: usize,
}

impl ReadSlice {
    pub fn empty() -> Self {
        todo!()
    }
    /// The bytes, read with one positioned read (no decode).
    pub fn load(&self) -> std::io::Result<Bytes> {
        todo!()
    }
}

/// Files to fsync to make the log durable up to `up_to_offset` (exclusive).
#[derive(Debug, Clone)]
pub struct FlushHandle {
    pub files: Vec<Arc<File>>,
    pub up_to_offset: i64,
}

impl FlushHandle {
    /// fdatasync every file; called without holding the partition lock.
    pub fn sync(&self) -> std::io::Result<()> {
        todo!()
    }
}

pub struct PartitionLog {}

impl PartitionLog {
    /// Opens (creating if needed) the log in `dir`, recovering after a crash.
    pub fn open(_dir: &Path, _config: LogConfig, _now_ms: i64) -> Result<(PartitionLog, RecoveryReport)> {
        todo!()
    }
    /// Appends exactly one v2 batch at the log end offset: validates it (CRC), rewrites
    /// base offset and leader epoch, rolls the segment if needed, updates indexes.
    pub fn append(&mut self, _batch: &mut [u8], _leader_epoch: i32, _now_ms: i64) -> Result<AppendInfo> {
        todo!()
    }
    /// Whole batches from the one holding `offset`, up to `max_bytes` (but at least one
    /// whole batch when any is there), never a batch starting at or after `max_offset`.
    pub fn read(&self, _offset: i64, _max_bytes: usize, _max_offset: i64) -> Result<ReadSlice> {
        todo!()
    }
    pub fn log_start_offset(&self) -> i64 {
        todo!()
    }
    pub fn log_end_offset(&self) -> i64 {
        todo!()
    }
    pub fn high_watermark(&self) -> i64 {
        todo!()
    }
    pub fn set_high_watermark(&mut self, _hw: i64) {
        todo!()
    }
    pub fn recovery_point(&self) -> i64 {
        todo!()
    }
    pub fn truncate_to(&mut self, _offset: i64) -> Result<()> {
        todo!()
    }
    pub fn delete_records_before(&mut self, _offset: i64) -> Result<i64> {
        todo!()
    }
    pub fn offset_for_timestamp(&self, _timestamp: i64) -> Result<Option<TimestampOffset>> {
        todo!()
    }
    pub fn flush_handle(&self) -> FlushHandle {
        todo!()
    }
    pub fn mark_flushed(&mut self, _up_to_offset: i64) -> Result<()> {
        todo!()
    }
    pub fn flush(&mut self) -> Result<()> {
        todo!()
    }
    pub fn apply_retention(&mut self, _now_ms: i64) -> Result<RetentionReport> {
        todo!()
    }
    pub fn config(&self) -> &LogConfig {
        todo!()
    }
    pub fn set_config(&mut self, _config: LogConfig) {
        todo!()
    }
    pub fn size_bytes(&self) -> u64 {
        todo!()
    }
    pub fn segment_count(&self) -> usize {
        todo!()
    }
    pub fn close(self) -> Result<()> {
        todo!()
    }
    pub fn delete(self) -> Result<()> {
        todo!()
    }
}
