//! [`PartitionLog`]: the ordered map of segments and the offsets that tie them
//! together. Offsets, from low to high:
//!
//! ```text
//! log start  <=  high watermark  <=  log end        recovery point <= log end
//! (first readable) (replicated)     (next to append)  (known fsync'd below)
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use protocol::record_batch::{self, BatchHeader};

use crate::checkpoint::{
    self, Durability, LOG_START_OFFSET_FILE, RECOVERY_POINT_FILE, TRUNCATE_TO_FILE,
};
use crate::fsutil::{io_error, sync_dir};
use crate::records::{first_record_at_or_after, RecordSearch};
use crate::segment::{Segment, TimestampHit};
use crate::{AppendInfo, LogConfig, RecoveryReport, Result, StorageError, TimestampOffset};

// Slice lengths are bounded by a segment's size, itself bounded by u32 positions.
const _: () = assert!(usize::BITS >= u32::BITS);

/// Whole batches of one segment file, located under the partition lock and read
/// without it (the file is append-only below `position + len`; a truncation or
/// retention racing with the read makes `load` fail or see the new bytes, as in
/// Kafka).
///
/// The range starts at a batch boundary and holds at least one whole batch; it may
/// end in a partial batch when `max_bytes` cut it, which clients discard.
#[derive(Debug, Clone)]
pub struct ReadSlice {
    /// The segment file; `None` for an empty slice.
    pub file: Option<Arc<File>>,
    pub position: u64,
    pub len: usize,
}

impl ReadSlice {
    pub fn empty() -> Self {
        ReadSlice {
            file: None,
            position: 0,
            len: 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The bytes, read with one positioned read (no decode).
    pub fn load(&self) -> std::io::Result<Bytes> {
        if self.len == 0 {
            return Ok(Bytes::new());
        }
        let Some(file) = &self.file else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "non-empty read slice without a file",
            ));
        };
        // Read into uninitialised capacity: zero-filling the buffer first cost as
        // much CPU as the kernel's copy (bench/README.md, fetch profile).
        let mut buf: Vec<u8> = Vec::with_capacity(self.len);
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(file.as_ref());
        while buf.len() < self.len {
            let filled = buf.len();
            // SAFETY: the destination is the vector's spare capacity, `self.len -
            // filled` bytes allocated above; pread writes at most that many, and the
            // length grows only by the count it reports written.
            let n = unsafe {
                libc::pread(
                    fd,
                    buf.as_mut_ptr().add(filled).cast::<libc::c_void>(),
                    self.len - filled,
                    (self.position + filled as u64) as libc::off_t,
                )
            };
            let eof = io::ErrorKind::UnexpectedEof;
            let n = match crate::fsutil::transferred(n, eof, "segment shorter than the read slice")
            {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => result?,
            };
            // SAFETY: pread initialised `n` more bytes (n <= self.len - filled).
            unsafe { buf.set_len(filled + n) };
        }
        Ok(Bytes::from(buf))
    }
}

/// What [`PartitionLog::lookup_timestamp`] learns from batch headers alone.
#[derive(Debug)]
pub enum TimestampLookup {
    Found(TimestampOffset),
    NotFound,
    /// The answer is in this batch's records, or (if its header's max timestamp
    /// promised more than its records hold) after it.
    Search(BatchSearch),
}

/// A batch whose records hold the answer to a timestamp lookup. It is read from
/// its segment file, CRC-checked again and walked (decompressed if need be)
/// without the log: the file is append-only below the batch, as for
/// [`ReadSlice`].
#[derive(Debug)]
pub struct BatchSearch {
    file: Arc<File>,
    path: PathBuf,
    position: u64,
    header: BatchHeader,
    target_ms: i64,
    min_offset: i64,
}

impl BatchSearch {
    /// The first record at or above the lookup's offset with a timestamp at or
    /// above its target, decompressing at most `max_decompressed_bytes`. `None`
    /// when no record of the batch qualifies: look again from
    /// [`Self::next_offset`]. A batch whose records cannot be walked (corrupt
    /// inside a valid CRC, an unknown codec, over the byte limit) is answered as
    /// well as its header allows: its first offset at or above the lookup's, with
    /// its base timestamp when that reaches the target, else its max timestamp.
    pub fn search(&self, max_decompressed_bytes: u64) -> Result<Option<TimestampOffset>> {
        let header = &self.header;
        let mut batch = vec![0u8; header.total_bytes()];
        std::os::unix::fs::FileExt::read_exact_at(self.file.as_ref(), &mut batch, self.position)
            .map_err(io_error(&self.path))?;
        // Read without the lock: make sure it is still the batch we located.
        match record_batch::validate(&batch) {
            Ok(read) if read.base_offset == header.base_offset && read.crc == header.crc => {}
            _ => {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!(
                        "batch at position {} changed during a timestamp lookup",
                        self.position
                    ),
                ))
            }
        }
        let found = match first_record_at_or_after(
            &batch,
            header,
            self.min_offset,
            self.target_ms,
            max_decompressed_bytes,
        ) {
            RecordSearch::Found {
                offset,
                timestamp_ms,
            } => TimestampOffset {
                offset,
                timestamp: timestamp_ms,
            },
            RecordSearch::NoneInBatch => return Ok(None),
            RecordSearch::Unreadable(why) => {
                tracing::warn!(path = %self.path.display(), base_offset = header.base_offset, why,
                    "timestamp lookup cannot walk a batch's records; answering its first offset");
                TimestampOffset {
                    offset: header.base_offset.max(self.min_offset),
                    timestamp: if header.base_timestamp >= self.target_ms {
                        header.base_timestamp
                    } else {
                        header.max_timestamp
                    },
                }
            }
        };
        Ok(Some(found))
    }

    /// Where to look next when [`Self::search`] found nothing in this batch.
    pub fn next_offset(&self) -> i64 {
        self.header.last_offset() + 1
    }
}

/// Files to fsync to make the log durable up to `up_to_offset` (exclusive).
#[derive(Debug, Clone)]
pub struct FlushHandle {
    /// Log and index files of every segment from the one holding the recovery
    /// point on, and the partition directory when segments were created since.
    pub files: Vec<Arc<File>>,
    pub up_to_offset: i64,
}

impl FlushHandle {
    /// fdatasync every file; called without holding the partition lock.
    pub fn sync(&self) -> std::io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        Ok(())
    }
}

/// The log of one partition, in its own directory. Not internally synchronised:
/// the broker holds it under a lock, and releases the lock to `load` a
/// [`ReadSlice`] or `sync` a [`FlushHandle`].
#[derive(Debug)]
pub struct PartitionLog {
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    /// By base offset; never empty, the last one is the active segment.
    pub(crate) segments: BTreeMap<i64, Segment>,
    pub(crate) log_start_offset: i64,
    pub(crate) high_watermark: i64,
    pub(crate) recovery_point: i64,
    /// What the `recovery-point` file says: at most `recovery_point`. It is written
    /// by [`PartitionLog::write_recovery_point`], which the caller runs off the
    /// latency path and not after every fsync (a lagging file only makes the next
    /// open validate a little more).
    pub(crate) recovery_point_on_disk: i64,
    /// Lowest offset truncated to since the last `mark_flushed`: a flush handle
    /// taken before the truncation synced files whose bytes at and above it have
    /// since been replaced, so it cannot vouch for them.
    pub(crate) truncated_since_mark: Option<i64>,
    /// Why the log is offline (a failed fsync), if it is: see [`PartitionLog::fail`].
    pub(crate) offline: Option<String>,
}

impl PartitionLog {
    /// Opens (creating if needed) the log in `dir`, recovering after a crash.
    ///
    /// Only the part after the recovery point is validated (CRC of every batch);
    /// the log is cut at the first torn or corrupt batch and later segments are
    /// deleted. Missing or damaged index files are rebuilt. Anything recovery
    /// validated is fsync'd before `open` returns, so the next open trusts it.
    pub fn open(
        dir: &Path,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(PartitionLog, RecoveryReport)> {
        crate::recovery::open(dir, config, now_ms)
    }

    pub(crate) fn active(&self) -> &Segment {
        self.segments
            .last_key_value()
            .map(|(_, segment)| segment)
            .expect("a log always has an active segment")
    }
    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_entry()
            .map(|entry| entry.into_mut())
            .expect("a log always has an active segment")
    }
    pub(crate) fn first_base_offset(&self) -> i64 {
        *self
            .segments
            .keys()
            .next()
            .expect("a log always has an active segment")
    }

    /// Appends exactly one v2 batch at the log end offset: validates it (CRC), rolls
    /// the segment if needed, writes it with its base offset and leader epoch
    /// rewritten, updates indexes. The batch is written as it lies in the request
    /// buffer: the rewritten fields (which the CRC does not cover) go in a 16-byte
    /// prefix of their own, so appending costs no copy of the batch.
    pub fn append(&mut self, batch: &[u8], leader_epoch: i32, now_ms: i64) -> Result<AppendInfo> {
        self.check_online()?;
        let header = record_batch::validate(batch)?;
        let base_offset = self.log_end_offset();
        let last_offset = base_offset + i64::from(header.last_offset_delta);
        let mut prefix = [0u8; record_batch::REWRITTEN_PREFIX_BYTES];
        prefix.copy_from_slice(&batch[..record_batch::REWRITTEN_PREFIX_BYTES]);
        record_batch::set_base_offset(&mut prefix, base_offset);
        record_batch::set_partition_leader_epoch(&mut prefix, leader_epoch);
        let rest = &batch[record_batch::REWRITTEN_PREFIX_BYTES..];
        let header = BatchHeader {
            base_offset,
            partition_leader_epoch: leader_epoch,
            ..header
        };
        debug_assert_eq!(
            record_batch::validate(&[&prefix[..], rest].concat()).ok(),
            Some(header),
            "the CRC must not cover offset and epoch"
        );

        if self.should_roll(batch.len() as u64, last_offset, now_ms) {
            self.roll()?;
        }
        let index_interval_bytes = self.config.index_interval_bytes;
        self.active_mut()
            .append(&[&prefix, rest], &header, now_ms, index_interval_bytes)?;
        debug_assert_eq!(self.log_end_offset(), last_offset + 1);
        Ok(AppendInfo {
            base_offset,
            last_offset,
            max_timestamp: header.max_timestamp,
        })
    }

    fn should_roll(&self, batch_bytes: u64, last_offset: i64, now_ms: i64) -> bool {
        let active = self.active();
        if active.is_empty() {
            return false;
        }
        let too_old = active
            .first_append_ms()
            .is_some_and(|first| now_ms.saturating_sub(first) >= self.config.segment_ms);
        too_old || !active.can_hold(batch_bytes, last_offset, self.config.segment_bytes)
    }

    /// Starts a new active segment at the log end, so that every segment before it
    /// holds only what was appended so far (and can be deleted whole once the log
    /// start passes it). Nothing happens while the active segment is empty.
    pub fn roll(&mut self) -> Result<()> {
        self.check_online()?;
        if self.active().is_empty() {
            return Ok(());
        }
        let base_offset = self.log_end_offset();
        self.active_mut().seal()?;
        let segment = Segment::create(&self.dir, base_offset)?;
        self.segments.insert(base_offset, segment);
        Ok(())
    }

    /// Whole batches from the one holding `offset`, up to `max_bytes` (but at least one
    /// whole batch when any is there), never a batch starting at or after `max_offset`.
    ///
    /// The slice lies within one segment. It also never holds the batch that
    /// contains `max_offset` (its records at and above `max_offset` must not be
    /// served), so it is empty when the batch holding `offset` also holds
    /// `max_offset`; in practice `max_offset` (high watermark, last stable offset)
    /// is a batch boundary.
    pub fn read(&self, offset: i64, max_bytes: usize, max_offset: i64) -> Result<ReadSlice> {
        self.check_online()?;
        let log_end = self.log_end_offset();
        if offset < self.log_start_offset || offset > log_end {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                log_start: self.log_start_offset,
                log_end,
            });
        }
        if offset >= max_offset || offset == log_end {
            return Ok(ReadSlice::empty());
        }
        let floor_base = self
            .segments
            .range(..=offset)
            .next_back()
            .map_or(i64::MIN, |(base, _)| *base);
        for segment in self
            .segments
            .range(floor_base..)
            .map(|(_, segment)| segment)
        {
            let Some((position, header)) = segment.locate(offset)? else {
                continue;
            };
            let end_position = if max_offset < log_end && max_offset < segment.next_offset() {
                segment
                    .locate(max_offset)?
                    .map_or(segment.size_bytes(), |(end, _)| end)
            } else {
                segment.size_bytes()
            };
            if end_position <= position {
                return Ok(ReadSlice::empty());
            }
            let first_batch_bytes = header.total_bytes() as u64;
            let len = (end_position - position).min((max_bytes as u64).max(first_batch_bytes));
            debug_assert!(position + len <= segment.size_bytes());
            return Ok(ReadSlice {
                file: Some(Arc::clone(segment.log_file())),
                position,
                len: len as usize,
            });
        }
        // Below the log end there is always a batch; only a damaged log lands here.
        Err(StorageError::corrupt(
            &self.dir,
            format!("no batch holds offset {offset} below log end {log_end}"),
        ))
    }

    /// Calls `f` with every whole batch from the one holding `from` up to `end`
    /// (exclusive), in order, reading `read_bytes` at a time: for replaying a log
    /// into memory at start-up. A read of `read_bytes` may end inside a batch (as a
    /// fetch does); that batch is read again whole with the next read, never
    /// passed on cut. The first batch may start below `from`.
    pub fn for_each_batch(
        &self,
        from: i64,
        end: i64,
        read_bytes: usize,
        mut f: impl FnMut(&BatchHeader, &[u8]),
    ) -> Result<()> {
        let mut offset = from.max(self.log_start_offset);
        while offset < end {
            let slice = self.read(offset, read_bytes, end)?;
            if slice.len == 0 {
                break;
            }
            let bytes = slice.load().map_err(io_error(&self.dir))?;
            let before = offset;
            for item in record_batch::batches(&bytes) {
                // A read holds at least its first batch whole: an error is the
                // partial batch at its end.
                let Ok((header, batch)) = item else { break };
                f(&header, batch);
                offset = offset.max(header.last_offset() + 1);
            }
            if offset == before {
                return Err(StorageError::corrupt(
                    &self.dir,
                    format!("no whole batch at offset {offset} below {end}"),
                ));
            }
        }
        Ok(())
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }
    pub fn log_end_offset(&self) -> i64 {
        self.active().next_offset()
    }
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }
    /// Clamped to `[log start, log end]`.
    pub fn set_high_watermark(&mut self, hw: i64) {
        self.high_watermark = hw.clamp(self.log_start_offset, self.log_end_offset());
    }
    pub fn recovery_point(&self) -> i64 {
        self.recovery_point
    }

    /// Drops every batch at or after `offset`; when `offset` falls inside a batch,
    /// the whole batch goes (the log end becomes its base offset). Below the first
    /// segment, the log is emptied and restarts at `offset`. Crash-safe: the target
    /// is recorded durably first and a later `open` finishes the job.
    pub fn truncate_to(&mut self, offset: i64) -> Result<()> {
        self.cut_to(offset, Durability::Durable)
    }

    /// [`Self::truncate_to`]; with [`Durability::Lazy`] nothing is fsync'd and the
    /// `truncate-to` marker stays, so the next open cuts there again (for
    /// [`Self::fail`], when fsync cannot be trusted).
    fn cut_to(&mut self, offset: i64, durability: Durability) -> Result<()> {
        let offset = offset.max(0);
        if offset >= self.log_end_offset() {
            return Ok(());
        }
        if offset < self.first_base_offset() {
            if durability == Durability::Lazy {
                return Err(StorageError::corrupt(
                    &self.dir,
                    format!("cannot cut below the first segment to {offset} without fsync"),
                ));
            }
            return self.truncate_fully_and_start_at(offset);
        }
        let floor_base = *self
            .segments
            .range(..=offset)
            .next_back()
            .expect("offset is at or above the first segment")
            .0;
        let floor = &self.segments[&floor_base];
        let (position, new_end) = match floor.locate(offset)? {
            Some((position, header)) => (position, header.base_offset.min(offset)),
            None => (floor.size_bytes(), offset),
        };
        checkpoint::write(&self.dir, TRUNCATE_TO_FILE, new_end, durability)?;
        // Newest first, so that a crash midway leaves a log that is still a prefix.
        let later: Vec<i64> = self
            .segments
            .range(floor_base + 1..)
            .map(|(base, _)| *base)
            .collect();
        for base in later.into_iter().rev() {
            if let Some(segment) = self.segments.remove(&base) {
                segment.delete_files()?;
            }
        }
        let floor = self
            .segments
            .get_mut(&floor_base)
            .expect("the floor segment stays");
        floor.truncate_at(position, new_end)?;
        if durability == Durability::Lazy {
            assert_eq!(self.log_end_offset(), new_end);
            self.high_watermark = self.high_watermark.min(new_end);
            return Ok(());
        }
        floor
            .log_file()
            .sync_data()
            .map_err(io_error(floor.log_path()))?;
        assert_eq!(self.log_end_offset(), new_end);
        self.after_truncation(new_end)?;
        checkpoint::remove(&self.dir, TRUNCATE_TO_FILE)
    }

    /// Deletes every segment and restarts the log, empty, at `offset` (which
    /// becomes log start, high watermark, recovery point and log end). For a
    /// follower whose log is entirely behind or beside the leader's.
    pub fn truncate_fully_and_start_at(&mut self, offset: i64) -> Result<()> {
        assert!(offset >= 0);
        checkpoint::write(&self.dir, TRUNCATE_TO_FILE, offset, Durability::Durable)?;
        checkpoint::write(
            &self.dir,
            LOG_START_OFFSET_FILE,
            offset,
            Durability::Durable,
        )?;
        self.log_start_offset = offset;
        while let Some((_, segment)) = self.segments.pop_last() {
            segment.delete_files()?;
        }
        let segment = Segment::create(&self.dir, offset)?;
        self.segments.insert(offset, segment);
        self.high_watermark = offset;
        self.after_truncation(offset)?;
        // Flush so that the recovery point may be `offset` even when that is
        // higher than before: the new empty segment and its name are durable.
        self.flush()?;
        checkpoint::remove(&self.dir, TRUNCATE_TO_FILE)
    }

    /// Lowers what must follow the log end down to `new_end`.
    fn after_truncation(&mut self, new_end: i64) -> Result<()> {
        self.high_watermark = self.high_watermark.min(new_end);
        if self.log_start_offset > new_end {
            checkpoint::write(
                &self.dir,
                LOG_START_OFFSET_FILE,
                new_end,
                Durability::Durable,
            )?;
            self.log_start_offset = new_end;
        }
        // Durably: new batches will reuse these offsets, and a stale higher
        // recovery point would let recovery trust them unchecked.
        if self.recovery_point > new_end {
            checkpoint::write(&self.dir, RECOVERY_POINT_FILE, new_end, Durability::Durable)?;
            self.recovery_point = new_end;
            self.recovery_point_on_disk = new_end;
        }
        self.truncated_since_mark = Some(
            self.truncated_since_mark
                .map_or(new_end, |t| t.min(new_end)),
        );
        Ok(())
    }

    /// Moves the log start offset up to `offset` (never down, never past the high
    /// watermark), durably, and deletes the segments wholly below it. Returns the
    /// new log start offset.
    pub fn delete_records_before(&mut self, offset: i64) -> Result<i64> {
        let target = offset.min(self.high_watermark);
        if target <= self.log_start_offset {
            return Ok(self.log_start_offset);
        }
        checkpoint::write(
            &self.dir,
            LOG_START_OFFSET_FILE,
            target,
            Durability::Durable,
        )?;
        self.log_start_offset = target;
        self.delete_segments_below_log_start()?;
        Ok(target)
    }

    /// Deletes sealed segments holding only offsets below the log start.
    pub(crate) fn delete_segments_below_log_start(&mut self) -> Result<()> {
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.first_entry() else {
                break;
            };
            if oldest.get().next_offset() > self.log_start_offset {
                break;
            }
            oldest.remove().delete_files()?;
        }
        Ok(())
    }

    /// The earliest offset at or above `from_offset` (and the log start) whose
    /// record timestamp is `>= timestamp`, as far as batch headers tell: found, not
    /// there, or a batch whose records must be walked ([`BatchSearch`]), which the
    /// caller does after releasing whatever lock guards this log.
    pub fn lookup_timestamp(&self, timestamp: i64, from_offset: i64) -> Result<TimestampLookup> {
        let min_offset = from_offset.max(self.log_start_offset);
        for segment in self.segments.values() {
            if segment.next_offset() <= min_offset {
                continue;
            }
            match segment.find_timestamp(timestamp, min_offset)? {
                None => continue,
                Some(TimestampHit::Exact(found)) => return Ok(TimestampLookup::Found(found)),
                Some(TimestampHit::Batch { position, header }) => {
                    return Ok(TimestampLookup::Search(BatchSearch {
                        file: Arc::clone(segment.log_file()),
                        path: segment.log_path().to_path_buf(),
                        position,
                        header,
                        target_ms: timestamp,
                        min_offset,
                    }))
                }
            }
        }
        Ok(TimestampLookup::NotFound)
    }

    /// The earliest offset whose record timestamp is `>= timestamp` (ListOffsets),
    /// at or above the log start; `None` when no record is that new. Exact for
    /// every codec (see [`BatchSearch::search`]). Offsets above the high watermark
    /// may be returned; the caller filters by isolation. For a log behind a lock,
    /// [`Self::lookup_timestamp`] lets the records be walked outside it.
    pub fn offset_for_timestamp(
        &self,
        timestamp: i64,
        max_decompressed_bytes: u64,
    ) -> Result<Option<TimestampOffset>> {
        let mut from_offset = self.log_start_offset;
        loop {
            match self.lookup_timestamp(timestamp, from_offset)? {
                TimestampLookup::Found(found) => return Ok(Some(found)),
                TimestampLookup::NotFound => return Ok(None),
                TimestampLookup::Search(batch) => match batch.search(max_decompressed_bytes)? {
                    Some(found) => return Ok(Some(found)),
                    None => from_offset = batch.next_offset(),
                },
            }
        }
    }

    /// What to fsync to make everything appended so far durable; an error once the
    /// log is offline, so that nothing is acknowledged as durable after a failed fsync.
    ///
    /// Index entries are kept in memory as batches are appended and written here, so
    /// the files the handle names are opened for it (the indexes written since the
    /// last handle, the directory when segments were created since) and closed when
    /// it is dropped; only each segment's log stays open.
    pub fn flush_handle(&mut self) -> Result<FlushHandle> {
        self.check_online()?;
        let up_to_offset = self.log_end_offset();
        if self.recovery_point >= up_to_offset {
            return Ok(FlushHandle {
                files: Vec::new(),
                up_to_offset,
            });
        }
        let floor_base = self
            .segments
            .range(..=self.recovery_point)
            .next_back()
            .map_or(i64::MIN, |(base, _)| *base);
        let mut files = Vec::new();
        let mut created_since = false;
        for (base, segment) in self.segments.range_mut(floor_base..) {
            segment.flush_files(&mut files)?;
            created_since |= *base >= self.recovery_point;
        }
        if created_since {
            files.push(Arc::new(crate::fsutil::open_dir(&self.dir)?));
        }
        Ok(FlushHandle {
            files,
            up_to_offset,
        })
    }

    /// Records that a [`FlushHandle`] up to `up_to_offset` was synced: raises the
    /// recovery point (in memory; [`PartitionLog::write_recovery_point`] writes it
    /// down). One flush at a time per log.
    pub fn mark_flushed(&mut self, up_to_offset: i64) {
        if self.offline.is_some() {
            return; // a handle synced after the failure cannot vouch for anything
        }
        let mut up_to_offset = up_to_offset.min(self.log_end_offset());
        if let Some(truncated) = self.truncated_since_mark.take() {
            up_to_offset = up_to_offset.min(truncated);
        }
        if up_to_offset > self.recovery_point {
            self.recovery_point = up_to_offset;
        }
    }

    /// Writes the recovery point to `recovery-point` if it moved since the last
    /// write. No fsync: it names only data already synced, and a lost or torn file
    /// just makes the next open validate more.
    pub fn write_recovery_point(&mut self) -> Result<()> {
        if self.offline.is_some() || self.recovery_point <= self.recovery_point_on_disk {
            return Ok(());
        }
        checkpoint::write(
            &self.dir,
            RECOVERY_POINT_FILE,
            self.recovery_point,
            Durability::Lazy,
        )?;
        self.recovery_point_on_disk = self.recovery_point;
        Ok(())
    }

    /// `flush_handle`, `sync`, `mark_flushed` and `write_recovery_point` in one go,
    /// under the caller's lock.
    pub fn flush(&mut self) -> Result<()> {
        let handle = self.flush_handle()?;
        if let Err(e) = handle.sync() {
            let reason = format!("fsync failed: {e}");
            self.fail(&reason);
            return Err(io_error(&self.dir)(e));
        }
        // The handle was taken after any truncation, so it vouches for everything.
        self.truncated_since_mark = None;
        self.mark_flushed(handle.up_to_offset);
        self.write_recovery_point()
    }

    /// An fsync of this log's files failed (of a [`FlushHandle`] synced without the
    /// lock, or inside [`Self::flush`]). The page cache cannot be trusted for what it
    /// covered: the kernel may have dropped the dirty pages and will call the next
    /// fsync a success. So the log is cut back to its recovery point (what the last
    /// successful fsync covered: everything acknowledged as durable stays) and goes
    /// offline: appends, reads and flush handles fail with
    /// [`StorageError::Offline`] until the log is opened again, which validates it
    /// from the recovery point on. A cut that fails too (the disk is gone) is
    /// logged; the next open then validates those bytes like any torn tail.
    pub fn fail(&mut self, reason: &str) {
        if self.offline.is_some() {
            return;
        }
        let keep = self.recovery_point;
        let cut = self.log_end_offset() - keep;
        tracing::error!(dir = %self.dir.display(), reason, recovery_point = keep,
            offsets_cut = cut, "fsync failed: the log is cut back to its recovery point and offline until reopened");
        if let Err(e) = self.cut_to(keep, Durability::Lazy) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot cut the log back to its recovery point");
        }
        self.offline = Some(reason.to_string());
    }

    /// `Some(reason)` once an fsync failed (see [`Self::fail`]).
    pub fn offline_reason(&self) -> Option<&str> {
        self.offline.as_deref()
    }

    fn check_online(&self) -> Result<()> {
        match &self.offline {
            None => Ok(()),
            Some(reason) => Err(StorageError::Offline {
                path: self.dir.display().to_string(),
                reason: reason.clone(),
            }),
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }
    /// Applies to future rolls, index entries and retention runs.
    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::size_bytes).sum()
    }
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Flushes everything, so that the next open validates nothing.
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        sync_dir(&self.dir)
    }
    /// Removes the log and its directory.
    pub fn delete(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(io_error(&dir))
    }
}
