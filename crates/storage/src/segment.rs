//! One segment: a `.log` file of whole batches in offset order, its offset index and
//! its time index. A segment knows its size, next offset and largest timestamp in
//! memory; only the active (last) segment of a log takes appends.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::record_batch::BatchHeader;
use tracing::warn;

use crate::fsutil::{
    delete_file, io_error, segment_path, write_all_vectored_at, LOG_SUFFIX, OFFSET_INDEX_SUFFIX,
    TIME_INDEX_SUFFIX,
};
use crate::index::{
    check_offset_index, check_time_index, floor_offset_entry, last_time_entry_below, IndexFile,
    Loaded, OffsetEntry, TimeEntry,
};
use crate::scan::{SegmentReader, Step, BATCH_CHUNK_BYTES, HEADER_CHUNK_BYTES};
use crate::{Result, StorageError, TimestampOffset};

/// Index entries hold positions as u32, so a segment never grows past this.
pub(crate) const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;
/// Index entries hold offsets relative to the segment base as u32; a segment's
/// next offset must stay within `base + MAX_RELATIVE_OFFSET`.
pub(crate) const MAX_RELATIVE_OFFSET: i64 = u32::MAX as i64;

/// Passed as `verify_from_offset` when no batch needs a CRC check.
pub(crate) const VERIFY_NOTHING: i64 = i64::MAX;

#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: i64,
    log_path: PathBuf,
    log: Arc<File>,
    size_bytes: u64,
    /// One past the last offset held; the base offset while empty.
    next_offset: i64,
    max_timestamp_ms: Option<i64>,
    /// When the first batch was appended (or the log was opened), for `segment_ms`.
    first_append_ms: Option<i64>,
    bytes_since_index_entry: u64,
    /// A failed append could not be cut off: the file may be longer than
    /// `size_bytes`, which must be fixed before the segment is sealed.
    file_may_exceed_size: bool,
    offset_index: IndexFile<OffsetEntry>,
    time_index: IndexFile<TimeEntry>,
}

/// What a segment's batch headers say about a timestamp lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestampHit {
    /// Known from the header alone.
    Exact(TimestampOffset),
    /// The first batch that may hold the answer: its records must be walked.
    Batch { position: u64, header: BatchHeader },
}

/// How a walk over a segment's batches ended.
#[derive(Debug)]
enum ScanEnd {
    Clean,
    /// Torn or corrupt bytes start at `position`.
    Cut {
        position: u64,
        reason: String,
    },
}

/// A segment as recovery left it.
pub(crate) struct Recovered {
    pub segment: Segment,
    /// Bytes cut off the end of the file (torn or corrupt); later segments must go.
    pub cut_bytes: u64,
    pub validated_bytes: u64,
    pub rebuilt_indexes: u32,
}

impl Segment {
    /// A new empty segment; fails if its log file already exists.
    pub fn create(dir: &Path, base_offset: i64) -> Result<Segment> {
        assert!(base_offset >= 0);
        let log_path = segment_path(dir, base_offset, LOG_SUFFIX);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let offset_index = IndexFile::create(segment_path(dir, base_offset, OFFSET_INDEX_SUFFIX))?;
        let time_index = IndexFile::create(segment_path(dir, base_offset, TIME_INDEX_SUFFIX))?;
        Ok(Segment {
            base_offset,
            log_path,
            log: Arc::new(log),
            size_bytes: 0,
            next_offset: base_offset,
            max_timestamp_ms: None,
            first_append_ms: None,
            bytes_since_index_entry: 0,
            file_may_exceed_size: false,
            offset_index,
            time_index,
        })
    }

    /// Opens an existing segment after a restart. Batches whose last offset is at or
    /// above `verify_from_offset` are CRC-checked (`VERIFY_NOTHING`: none); the
    /// others are trusted and, when the indexes are sane, not even read except for
    /// the stretch after the last index entry (needed for the next offset and the
    /// largest timestamp). A missing or damaged index is rebuilt from the batch
    /// headers. The file is cut at the first torn or corrupt batch.
    pub fn recover(
        dir: &Path,
        base_offset: i64,
        verify_from_offset: i64,
        index_interval_bytes: u32,
    ) -> Result<Recovered> {
        let log_path = segment_path(dir, base_offset, LOG_SUFFIX);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let file_bytes = log.metadata().map_err(io_error(&log_path))?.len();
        let (offset_index, offsets_loaded) =
            IndexFile::<OffsetEntry>::open(segment_path(dir, base_offset, OFFSET_INDEX_SUFFIX))?;
        let (time_index, times_loaded) =
            IndexFile::<TimeEntry>::open(segment_path(dir, base_offset, TIME_INDEX_SUFFIX))?;
        let mut segment = Segment {
            base_offset,
            log_path,
            log: Arc::new(log),
            size_bytes: file_bytes,
            next_offset: base_offset,
            max_timestamp_ms: None,
            first_append_ms: None,
            bytes_since_index_entry: 0,
            file_may_exceed_size: false,
            offset_index,
            time_index,
        };

        let offsets = match offsets_loaded {
            Loaded::Entries(entries) => match check_offset_index(&entries, file_bytes) {
                Ok(()) => Ok(entries),
                Err(why) => Err((why, entries)),
            },
            Loaded::Missing => Err(("offset index missing", Vec::new())),
            Loaded::Damaged => Err(("offset index is not a whole number of entries", Vec::new())),
        };
        // An offset index that was read whole (even if it does not fit the log) can
        // still tell whether the time index is damaged in its own right.
        let raw_offsets = match &offsets {
            Ok(entries) => Some(entries.as_slice()),
            Err((_, entries)) if !entries.is_empty() => Some(entries.as_slice()),
            Err(_) => None,
        };
        let times = match times_loaded {
            Loaded::Entries(entries) => match check_time_index(&entries, raw_offsets) {
                Ok(()) => Ok(entries),
                Err(why) => Err(why),
            },
            Loaded::Missing => Err("time index missing"),
            Loaded::Damaged => Err("time index is not a whole number of entries"),
        };

        let mut rebuilt_indexes = 0;
        let mut start_position = 0;
        match (offsets, times) {
            (Ok(offsets), Ok(times)) => {
                segment.offset_index.adopt(offsets);
                segment.time_index.adopt(times);
                // Keep the entries below the part to verify; those after it are
                // regenerated as the batches are checked.
                let keep = if verify_from_offset == VERIFY_NOTHING {
                    segment.offset_index.len()
                } else if verify_from_offset <= base_offset {
                    0
                } else {
                    let relative =
                        u32::try_from(verify_from_offset - base_offset).unwrap_or(u32::MAX);
                    segment
                        .offset_index
                        .entries()
                        .partition_point(|e| e.relative_offset <= relative)
                };
                segment.truncate_entries(keep);
                if let Some(last) = segment.offset_index.last() {
                    start_position = u64::from(last.position);
                    segment.next_offset = base_offset + i64::from(last.relative_offset);
                    if !segment.batch_starts_at(start_position, segment.next_offset)? {
                        warn!(path = %segment.log_path.display(), "offset index disagrees with the log; rebuilding it");
                        segment.reset_entries();
                        start_position = 0;
                        rebuilt_indexes = 2;
                    }
                }
                segment.max_timestamp_ms = segment.time_index.last().map(|t| t.timestamp_ms);
            }
            (offsets, times) => {
                for why in [offsets.err().map(|(why, _)| why), times.err()]
                    .into_iter()
                    .flatten()
                {
                    warn!(path = %segment.log_path.display(), why, "rebuilding index from the log");
                    rebuilt_indexes += 1;
                }
            }
        }
        let regenerate_all = rebuilt_indexes > 0;

        let mut validated_bytes = 0;
        let mut cut_bytes = 0;
        let scan = segment.scan_from(
            start_position,
            verify_from_offset,
            regenerate_all,
            index_interval_bytes,
            &mut validated_bytes,
        )?;
        if let ScanEnd::Cut { position, reason } = scan {
            cut_bytes = file_bytes - position;
            warn!(path = %segment.log_path.display(), position, cut_bytes, reason, "truncating torn or corrupt log tail");
            segment
                .log
                .set_len(position)
                .map_err(io_error(&segment.log_path))?;
            segment.size_bytes = position;
            segment.trim_entries_below(position);
        }
        segment.offset_index.write_pending()?;
        segment.time_index.write_pending()?;
        Ok(Recovered {
            segment,
            cut_bytes,
            validated_bytes,
            rebuilt_indexes,
        })
    }

    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    pub fn is_empty(&self) -> bool {
        self.size_bytes == 0
    }
    pub fn max_timestamp_ms(&self) -> Option<i64> {
        self.max_timestamp_ms
    }
    pub fn first_append_ms(&self) -> Option<i64> {
        self.first_append_ms
    }
    pub fn set_first_append_ms(&mut self, now_ms: i64) {
        if !self.is_empty() {
            self.first_append_ms = Some(now_ms);
        }
    }
    pub fn log_file(&self) -> &Arc<File> {
        &self.log
    }
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
    /// Adds the files an fsync must cover to make this segment durable: its log,
    /// and its index files when they changed since the last flush (written now).
    pub fn flush_files(&mut self, files: &mut Vec<Arc<File>>) -> Result<()> {
        files.push(Arc::clone(&self.log));
        for index in [
            self.offset_index.sync_handle()?,
            self.time_index.sync_handle()?,
        ]
        .into_iter()
        .flatten()
        {
            files.push(Arc::new(index));
        }
        Ok(())
    }

    /// Whether a batch of `batch_bytes` ending at `last_offset` fits after the
    /// current end without breaking the limits of index entries or `segment_bytes`.
    pub fn can_hold(&self, batch_bytes: u64, last_offset: i64, segment_bytes: u64) -> bool {
        self.size_bytes + batch_bytes <= segment_bytes.min(MAX_SEGMENT_BYTES)
            && last_offset - self.base_offset < MAX_RELATIVE_OFFSET
    }

    /// Appends one batch (already validated and rewritten), given as consecutive
    /// parts, with one positioned vectored write, then the index entries it is
    /// due. On error nothing changes in memory and the written bytes are cut off
    /// again where possible.
    pub fn append(
        &mut self,
        parts: &[&[u8]],
        header: &BatchHeader,
        now_ms: i64,
        index_interval_bytes: u32,
    ) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert_eq!(header.total_bytes(), len);
        assert!(
            header.base_offset >= self.next_offset,
            "offsets must increase: {} < {}",
            header.base_offset,
            self.next_offset
        );
        assert!(self.size_bytes + len as u64 <= MAX_SEGMENT_BYTES);
        assert!(header.last_offset() - self.base_offset < MAX_RELATIVE_OFFSET);
        let position = self.size_bytes;
        let due = self.entries_due(position, header.base_offset, index_interval_bytes);
        if let Err(e) = write_all_vectored_at(&self.log, parts, position) {
            self.undo_append(position);
            return Err(io_error(&self.log_path)(e));
        }
        if let Some((offset_entry, time_entry)) = due {
            // In memory; the next flush writes them (see `index`).
            self.offset_index.push(offset_entry);
            if let Some(time_entry) = time_entry {
                self.time_index.push(time_entry);
            }
            self.bytes_since_index_entry = 0;
        }
        self.size_bytes += len as u64;
        self.account(header);
        self.first_append_ms.get_or_insert(now_ms);
        Ok(())
    }

    fn undo_append(&mut self, position: u64) {
        if let Err(e) = self.log.set_len(position) {
            warn!(path = %self.log_path.display(), error = %e, "could not cut off a failed append");
            self.file_may_exceed_size = true;
        }
    }

    /// Called when the segment stops being the active one.
    pub fn seal(&mut self) -> Result<()> {
        if self.file_may_exceed_size {
            self.log
                .set_len(self.size_bytes)
                .map_err(io_error(&self.log_path))?;
            self.file_may_exceed_size = false;
        }
        Ok(())
    }

    /// Index entries due for a batch with `base_offset` about to sit at `position`.
    fn entries_due(
        &self,
        position: u64,
        base_offset: i64,
        index_interval_bytes: u32,
    ) -> Option<(OffsetEntry, Option<TimeEntry>)> {
        if position == 0 || self.bytes_since_index_entry < u64::from(index_interval_bytes) {
            return None;
        }
        if self
            .offset_index
            .last()
            .is_some_and(|last| u64::from(last.position) >= position)
        {
            return None;
        }
        let relative_offset = u32::try_from(base_offset - self.base_offset).ok()?;
        let offset_entry = OffsetEntry {
            relative_offset,
            position: u32::try_from(position).ok()?,
        };
        let time_entry = self
            .max_timestamp_ms
            .filter(|max| {
                self.time_index
                    .last()
                    .is_none_or(|last| *max > last.timestamp_ms)
            })
            .map(|timestamp_ms| TimeEntry {
                timestamp_ms,
                relative_offset,
            });
        Some((offset_entry, time_entry))
    }

    /// Counts a batch now in the segment (its bytes are in `size_bytes`).
    fn account(&mut self, header: &BatchHeader) {
        self.next_offset = header.last_offset() + 1;
        self.max_timestamp_ms = Some(
            self.max_timestamp_ms
                .map_or(header.max_timestamp, |max| max.max(header.max_timestamp)),
        );
        self.bytes_since_index_entry += header.total_bytes() as u64;
    }

    /// Keeps the first `keep` offset-index entries and the time entries paired
    /// with them (in memory; `write_pending` updates the files).
    fn truncate_entries(&mut self, keep: usize) {
        self.offset_index.truncate(keep);
        let keep_times = match self.offset_index.last() {
            None => 0,
            Some(last) => self
                .time_index
                .entries()
                .partition_point(|t| t.relative_offset <= last.relative_offset),
        };
        self.time_index.truncate(keep_times);
    }

    fn reset_entries(&mut self) {
        self.truncate_entries(0);
        self.next_offset = self.base_offset;
        self.max_timestamp_ms = None;
        self.bytes_since_index_entry = 0;
    }

    fn trim_entries_below(&mut self, position: u64) {
        let keep = self
            .offset_index
            .entries()
            .partition_point(|e| u64::from(e.position) < position);
        self.truncate_entries(keep);
    }

    /// Whether a batch with `base_offset` starts at `position`: a check that an
    /// index entry agrees with the log before anything relies on it.
    fn batch_starts_at(&self, position: u64, base_offset: i64) -> Result<bool> {
        let mut reader = SegmentReader::new(
            &self.log,
            &self.log_path,
            self.size_bytes,
            HEADER_CHUNK_BYTES,
        );
        Ok(
            matches!(reader.header_at(position)?, Step::Batch(header) if header.base_offset == base_offset),
        )
    }

    /// Walks the batches from `start_position` (a batch start, described by the
    /// entries, `next_offset` and `max_timestamp_ms` already in memory) to the end
    /// of the file, accounting each one. Batches reaching `verify_from_offset` are
    /// CRC-checked and get index entries; with `regenerate_all`, every batch does.
    fn scan_from(
        &mut self,
        start_position: u64,
        verify_from_offset: i64,
        regenerate_all: bool,
        index_interval_bytes: u32,
        validated_bytes: &mut u64,
    ) -> Result<ScanEnd> {
        let log = Arc::clone(&self.log);
        let log_path = self.log_path.clone();
        let chunk_bytes = if verify_from_offset == VERIFY_NOTHING {
            HEADER_CHUNK_BYTES
        } else {
            BATCH_CHUNK_BYTES
        };
        let mut reader = SegmentReader::new(&log, &log_path, self.size_bytes, chunk_bytes);
        self.bytes_since_index_entry = 0;
        let mut position = start_position;
        loop {
            let header = match reader.header_at(position)? {
                Step::End => return Ok(ScanEnd::Clean),
                Step::Bad(e) => {
                    return Ok(ScanEnd::Cut {
                        position,
                        reason: e.to_string(),
                    })
                }
                Step::Batch(header) => header,
            };
            let total_bytes = header.total_bytes() as u64;
            // Freshet writes offsets without gaps, so anything else is damage (a
            // base offset is not covered by the CRC).
            if header.base_offset != self.next_offset {
                let reason = format!(
                    "base offset {} where {} was expected",
                    header.base_offset, self.next_offset
                );
                return Ok(ScanEnd::Cut { position, reason });
            }
            if header.last_offset() - self.base_offset >= MAX_RELATIVE_OFFSET
                || position + total_bytes > MAX_SEGMENT_BYTES
            {
                let reason = format!(
                    "batch at offset {} is beyond what index entries can address",
                    header.base_offset
                );
                return Ok(ScanEnd::Cut { position, reason });
            }
            let verify = header.last_offset() >= verify_from_offset;
            if verify {
                if let Err(e) = reader.validate_at(position, &header)? {
                    return Ok(ScanEnd::Cut {
                        position,
                        reason: e.to_string(),
                    });
                }
                *validated_bytes += total_bytes;
            }
            if verify || regenerate_all {
                if let Some((offset_entry, time_entry)) =
                    self.entries_due(position, header.base_offset, index_interval_bytes)
                {
                    self.offset_index.push(offset_entry);
                    if let Some(time_entry) = time_entry {
                        self.time_index.push(time_entry);
                    }
                    self.bytes_since_index_entry = 0;
                }
            }
            self.account(&header);
            position += total_bytes;
        }
    }

    /// The index's best starting point for finding `offset`: a batch position at or
    /// before it, with the base offset the batch there must have.
    fn index_floor(&self, offset: i64) -> (u64, Option<i64>) {
        if offset <= self.base_offset {
            return (0, None);
        }
        let relative = u32::try_from(offset - self.base_offset).unwrap_or(u32::MAX);
        match floor_offset_entry(self.offset_index.entries(), relative) {
            Some(entry) => (
                u64::from(entry.position),
                Some(self.base_offset + i64::from(entry.relative_offset)),
            ),
            None => (0, None),
        }
    }

    /// Walks batch headers from `start` (from `index_floor`) and returns the
    /// position and header of the first batch for which `wanted` holds, or `None`
    /// at the end of the segment. An index entry that disagrees with the log is
    /// ignored (with a warning) and the walk restarts at the segment's start.
    fn find_batch(
        &self,
        start: (u64, Option<i64>),
        mut wanted: impl FnMut(&mut SegmentReader<'_>, u64, &BatchHeader) -> Result<bool>,
    ) -> Result<Option<(u64, BatchHeader)>> {
        let (mut position, mut expected_base) = start;
        let mut reader = SegmentReader::new(
            &self.log,
            &self.log_path,
            self.size_bytes,
            HEADER_CHUNK_BYTES,
        );
        loop {
            let header = match reader.header_at(position)? {
                Step::End => return Ok(None),
                Step::Bad(e) => {
                    return Err(StorageError::corrupt(
                        &self.log_path,
                        format!("batch at position {position}: {e}"),
                    ))
                }
                Step::Batch(header) => header,
            };
            if let Some(expected) = expected_base.take() {
                if header.base_offset != expected {
                    warn!(path = %self.log_path.display(), position, expected, found = header.base_offset, "offset index disagrees with the log");
                    position = 0;
                    continue;
                }
            }
            if wanted(&mut reader, position, &header)? {
                return Ok(Some((position, header)));
            }
            position += header.total_bytes() as u64;
        }
    }

    /// Position and header of the first batch whose last offset is `>= offset`.
    pub fn locate(&self, offset: i64) -> Result<Option<(u64, BatchHeader)>> {
        self.find_batch(self.index_floor(offset), |_, _, header| {
            Ok(header.last_offset() >= offset)
        })
    }

    /// Where the first record at or above `min_offset` with a timestamp
    /// `>= target_ms` is: the first batch reaching both, from its header alone
    /// (batch headers are read, records are not). Log-append-time batches give
    /// every record the batch's max timestamp, so they answer exactly.
    pub fn find_timestamp(&self, target_ms: i64, min_offset: i64) -> Result<Option<TimestampHit>> {
        if self.max_timestamp_ms.is_none_or(|max| max < target_ms) {
            return Ok(None);
        }
        // Every record below a time entry's offset is no newer than its timestamp,
        // so the search can start there when that timestamp is below the target.
        let mut start = (0, None);
        if let Some(time_entry) = last_time_entry_below(self.time_index.entries(), target_ms) {
            if let Some(entry) =
                floor_offset_entry(self.offset_index.entries(), time_entry.relative_offset)
            {
                start = (
                    u64::from(entry.position),
                    Some(self.base_offset + i64::from(entry.relative_offset)),
                );
            }
        }
        let from_min_offset = self.index_floor(min_offset);
        if from_min_offset.0 > start.0 {
            start = from_min_offset;
        }
        let mut found = None;
        self.find_batch(start, |_, position, header| {
            if header.last_offset() < min_offset || header.max_timestamp < target_ms {
                return Ok(false);
            }
            found = Some(if header.is_log_append_time() {
                // Every record carries the batch's (append) time.
                TimestampHit::Exact(TimestampOffset {
                    offset: header.base_offset.max(min_offset),
                    timestamp: header.max_timestamp,
                })
            } else {
                TimestampHit::Batch {
                    position,
                    header: *header,
                }
            });
            Ok(true)
        })?;
        Ok(found)
    }

    /// Cuts the segment at `position` (a batch start), leaving `next_offset` as the
    /// next offset to append.
    pub fn truncate_at(&mut self, position: u64, next_offset: i64) -> Result<()> {
        assert!(position <= self.size_bytes);
        assert!(next_offset >= self.base_offset);
        self.log
            .set_len(position)
            .map_err(io_error(&self.log_path))?;
        self.size_bytes = position;
        self.file_may_exceed_size = false;
        self.trim_entries_below(position);
        self.offset_index.write_pending()?;
        self.time_index.write_pending()?;
        // Recompute the largest timestamp from the last index entry on.
        let start_position = match self.offset_index.last() {
            Some(last) => {
                self.next_offset = self.base_offset + i64::from(last.relative_offset);
                u64::from(last.position)
            }
            None => {
                self.next_offset = self.base_offset;
                0
            }
        };
        self.max_timestamp_ms = self.time_index.last().map(|t| t.timestamp_ms);
        if let ScanEnd::Cut { position, reason } =
            self.scan_from(start_position, VERIFY_NOTHING, false, 0, &mut 0)?
        {
            return Err(StorageError::corrupt(
                &self.log_path,
                format!("batch at position {position}: {reason}"),
            ));
        }
        assert!(
            self.next_offset <= next_offset,
            "truncation must not drop below the kept batches"
        );
        self.next_offset = next_offset;
        if self.is_empty() {
            self.first_append_ms = None;
        }
        Ok(())
    }

    /// Deletes the segment's files (log first: a leftover index is debris).
    pub fn delete_files(&self) -> Result<()> {
        delete_file(&self.log_path)?;
        delete_file(self.offset_index.path())?;
        delete_file(self.time_index.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::{build_simple_batch, set_base_offset, validate};

    /// Appends batches of `records` records each with the given timestamps.
    fn fill(segment: &mut Segment, timestamps: &[i64], interval: u32) -> Vec<(u64, i64)> {
        let mut starts = Vec::new();
        for ts in timestamps {
            let mut batch = build_simple_batch(*ts, &[b"abc", b"def"]);
            set_base_offset(&mut batch, segment.next_offset());
            let header = validate(&batch).unwrap();
            starts.push((segment.size_bytes(), header.base_offset));
            segment.append(&[&batch], &header, 0, interval).unwrap();
        }
        starts
    }

    #[test]
    fn index_entries_follow_interval_and_growing_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 100).unwrap();
        let batch_bytes = build_simple_batch(0, &[b"abc", b"def"]).len() as u64;
        // An entry every 2 batches; timestamps grow only now and then.
        let interval = (2 * batch_bytes) as u32;
        let starts = fill(&mut segment, &[5, 5, 9, 9, 9, 9, 9, 12, 3], interval);
        let offsets = segment.offset_index.entries().to_vec();
        let expected: Vec<OffsetEntry> = [2usize, 4, 6, 8]
            .iter()
            .map(|&i| OffsetEntry {
                relative_offset: (starts[i].1 - 100) as u32,
                position: starts[i].0 as u32,
            })
            .collect();
        assert_eq!(offsets, expected);
        // Largest timestamp before batches 2, 4, 6, 8: 5, 9, 9 (no growth), 12.
        let times: Vec<(i64, u32)> = segment
            .time_index
            .entries()
            .iter()
            .map(|t| (t.timestamp_ms, t.relative_offset))
            .collect();
        assert_eq!(times, vec![(5, 4), (9, 8), (12, 16)]);
        assert_eq!(
            (segment.next_offset(), segment.max_timestamp_ms()),
            (118, Some(12))
        );

        for (position, base_offset) in &starts {
            for offset in [*base_offset, base_offset + 1] {
                let (found, header) = segment.locate(offset).unwrap().unwrap();
                assert_eq!((found, header.base_offset), (*position, *base_offset));
            }
        }
        assert!(segment.locate(118).unwrap().is_none());

        // Index entries reach their files when the log is flushed.
        let mut segment = segment;
        segment.flush_files(&mut Vec::new()).unwrap();
        // Reopened as trusted: same entries, same summary, nothing rebuilt.
        drop(segment);
        let recovered = Segment::recover(dir.path(), 100, VERIFY_NOTHING, interval).unwrap();
        assert_eq!(
            (
                recovered.rebuilt_indexes,
                recovered.cut_bytes,
                recovered.validated_bytes
            ),
            (0, 0, 0)
        );
        let segment = recovered.segment;
        assert_eq!(segment.offset_index.entries(), expected.as_slice());
        assert_eq!(segment.time_index.len(), 3);
        assert_eq!(
            (segment.next_offset(), segment.max_timestamp_ms()),
            (118, Some(12))
        );

        // Validating from offset 109 (inside batch 4) checks batches 4.. only and
        // regenerates the entries after the one at offset 108.
        drop(segment);
        let recovered = Segment::recover(dir.path(), 100, 109, interval).unwrap();
        assert_eq!(recovered.validated_bytes, 5 * batch_bytes);
        assert_eq!(
            recovered.segment.offset_index.entries(),
            expected.as_slice()
        );
        assert_eq!(recovered.segment.time_index.len(), 3);
    }

    #[test]
    fn truncate_at_recomputes_summary() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0).unwrap();
        let starts = fill(&mut segment, &[1, 7, 3, 9, 2, 4], 1);
        let (position, base_offset) = starts[3];
        segment.truncate_at(position, base_offset).unwrap();
        assert_eq!(
            (
                segment.size_bytes(),
                segment.next_offset(),
                segment.max_timestamp_ms()
            ),
            (position, 6, Some(7))
        );
        assert!(segment
            .offset_index
            .entries()
            .iter()
            .all(|e| u64::from(e.position) < position));
        assert_eq!(
            std::fs::metadata(segment.log_path()).unwrap().len(),
            position
        );
        segment.truncate_at(0, 0).unwrap();
        assert!(segment.is_empty());
        assert_eq!(
            (
                segment.next_offset(),
                segment.max_timestamp_ms(),
                segment.first_append_ms()
            ),
            (0, None, None)
        );
        assert_eq!(segment.offset_index.len() + segment.time_index.len(), 0);
    }
}
