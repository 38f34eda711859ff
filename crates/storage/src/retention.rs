//! Deleting whole old segments, by age and by total size. The active segment is
//! never deleted, nor a segment holding offsets at or above the high watermark
//! (not yet replicated), as in Kafka.

use crate::{PartitionLog, Result, RetentionReport};

impl PartitionLog {
    /// Deletes the oldest segments while they are older than `retention_ms`
    /// (largest timestamp below `now_ms - retention_ms`), then while the log
    /// without the oldest segment is still at least `retention_bytes`. The log
    /// start offset moves up to the first remaining segment. It is not written to
    /// `log-start-offset`: `open` derives it from the first segment anyway.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        if self.config.retention_ms >= 0 {
            let cutoff_ms = now_ms.saturating_sub(self.config.retention_ms);
            while self.oldest_is_deletable(|oldest| {
                oldest.max_timestamp_ms().is_none_or(|max| max < cutoff_ms)
            }) {
                self.delete_oldest(&mut report)?;
            }
        }
        if self.config.retention_bytes >= 0 {
            let retention_bytes = self.config.retention_bytes as u64;
            loop {
                let total_bytes = self.size_bytes();
                if !self.oldest_is_deletable(|oldest| {
                    total_bytes - oldest.size_bytes() >= retention_bytes
                }) {
                    break;
                }
                self.delete_oldest(&mut report)?;
            }
        }
        let first_base = self.first_base_offset();
        if first_base > self.log_start_offset {
            self.log_start_offset = first_base;
        }
        debug_assert!(self.log_start_offset <= self.high_watermark);
        Ok(report)
    }

    fn oldest_is_deletable(&self, expired: impl Fn(&crate::segment::Segment) -> bool) -> bool {
        let Some((_, oldest)) = self.segments.first_key_value() else {
            return false;
        };
        self.segments.len() > 1 && oldest.next_offset() <= self.high_watermark && expired(oldest)
    }

    fn delete_oldest(&mut self, report: &mut RetentionReport) -> Result<()> {
        assert!(
            self.segments.len() > 1,
            "the active segment is never deleted"
        );
        if let Some((_, oldest)) = self.segments.pop_first() {
            report.deleted_segments += 1;
            report.deleted_bytes += oldest.size_bytes();
            oldest.delete_files()?;
        }
        Ok(())
    }
}
