//! The spool: records the gateway answered `2xx` for while the cluster could not yet
//! acknowledge them, kept on local disk until it does. A record's entry is fsync'd
//! before its request is answered; a delivered record is marked done; a segment whose
//! entries are all done is deleted. At start-up every entry not marked done is handed
//! back (in the order it was spooled) to be sent again.
//!
//! Why not `storage::PartitionLog`: that log holds Kafka v2 batches for one partition
//! and has no notion of an entry being done out of order (records for different
//! partitions are acknowledged in any order). The spool needs a topic and a pinned
//! partition per entry and a done mark per entry, and nothing of indexes, retention
//! or offsets; the shared part (CRC-framed entries, a torn tail cut at open) is small.
//!
//! On disk, in the spool directory:
//! - `{first_seq:020}.spool`: entries back to back, each
//!   `len u32 | crc32c(body) u32 | body`, little-endian, body =
//!   `seq u64 | timestamp_ms i64 | partition i32 (-1: any) | topic (u16 len) |
//!   key (i32 len, -1: null) | value (i32 len, -1: null) | header count u16 |
//!   headers (u16 name len, name, i32 value len, value)`;
//! - `{first_seq:020}.done`: the seqs of delivered entries, u64 each. Written without
//!   fsync: a process kill keeps them (the page cache survives it), a machine crash
//!   may lose the last ones, and their records are then sent again (at least once).
//!
//! Invariants: seqs increase through the files; a segment is fsync'd before the next
//! one is started, so only the last segment can have a torn tail; an entry is only
//! reported durable after an fsync that covers it.
//!
//! **A failed fsync is final** (PostgreSQL's "fsyncgate" rule): after one, the page
//! cache cannot be trusted for the bytes it covered (Linux marks the pages clean and a
//! later fsync reports success without writing them). So the first failed fsync
//! poisons the spool: every entry it covered, and every entry not yet covered by an
//! earlier successful fsync, is answered with an error (`503`), never as durable; no
//! later fsync is attempted, so none can vouch for them; and every later append is
//! refused until the process restarts. Records handed to librdkafka before the
//! failure may still reach the cluster (a `503` means "fate unknown"; an
//! `Idempotency-Key` retry is answered once). At restart the files are read back and
//! CRC-checked as after a crash: whatever is read back whole is sent (at least once).

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::producer::Record;

const SEGMENT_SUFFIX: &str = "spool";
const DONE_SUFFIX: &str = "done";
const SEQ_DIGITS: usize = 20;
/// Framing before the body: length and CRC.
const FRAME_BYTES: usize = 8;
/// An entry body larger than this is corrupt (record limits are far below it).
const BODY_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error on {path}: {source}")]
    Io { path: String, source: io::Error },
    /// An fsync failed earlier: the spool takes nothing more until a restart.
    #[error("the spool is out of service after a failed fsync ({0}); restart the gateway")]
    Poisoned(String),
}

/// How a segment's bytes are made durable: `File::sync_data`, or a test's stand-in.
pub type SyncFile = Arc<dyn Fn(&File) -> io::Result<()> + Send + Sync>;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One spooled record.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub record: Record,
}

/// What `open` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Entries not yet delivered, handed back in spool order.
    pub pending: usize,
    /// Bytes of torn or corrupt tail cut off.
    pub truncated_bytes: u64,
    /// Segments deleted because every entry in them was delivered.
    pub deleted_segments: usize,
}

/// How much the spool holds, for `/health` and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub records: u64,
    pub bytes: u64,
    /// Timestamp of the oldest undelivered record, if any.
    pub oldest_timestamp_ms: Option<i64>,
}

pub struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Serialises fsyncs; whoever holds it syncs everything written so far, so the
    /// callers queued behind it usually find their entry already covered.
    sync_lock: tokio::sync::Mutex<()>,
    /// Logical bytes appended since open, and how many of them are known durable.
    written: AtomicU64,
    synced: AtomicU64,
    sync_file: SyncFile,
    /// Set by the first failed fsync of a segment, for good.
    poisoned: Mutex<Option<String>>,
}

struct Inner {
    active: Option<Active>,
    segments: BTreeMap<u64, SegmentState>,
    /// Undelivered seq -> (segment, entry bytes, timestamp).
    pending: BTreeMap<u64, (u64, u64, i64)>,
    pending_bytes: u64,
    next_seq: u64,
}

struct Active {
    first_seq: u64,
    file: Arc<File>,
    bytes: u64,
}

struct SegmentState {
    pending: usize,
    done: Option<File>,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, cuts any torn tail, and returns every
    /// undelivered entry in spool order.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Spool, Vec<Entry>, Recovery), SpoolError> {
        Spool::open_with_sync(dir, segment_bytes, Arc::new(File::sync_data))
    }

    /// [`Spool::open`] with segments fsync'd by `sync_file` (tests inject failures).
    pub fn open_with_sync(
        dir: &Path,
        segment_bytes: u64,
        sync_file: SyncFile,
    ) -> Result<(Spool, Vec<Entry>, Recovery), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut pending_map = BTreeMap::new();
        let mut pending_bytes = 0;
        let mut pending_entries = Vec::new();
        let mut next_seq = 0u64;
        for first_seq in list_segments(dir)? {
            let path = segment_path(dir, first_seq, SEGMENT_SUFFIX);
            let (entries, truncated) = read_segment(&path)?;
            if truncated > 0 {
                tracing::warn!(path = %path.display(), bytes = truncated, "spool: cut a torn or corrupt tail");
                recovery.truncated_bytes += truncated;
            }
            let done = read_done(&segment_path(dir, first_seq, DONE_SUFFIX))?;
            let mut left = 0;
            for (entry, bytes) in entries {
                next_seq = next_seq.max(entry.seq + 1);
                if done.contains(&entry.seq) {
                    continue;
                }
                left += 1;
                pending_bytes += bytes;
                pending_map.insert(entry.seq, (first_seq, bytes, entry.record.timestamp_ms));
                pending_entries.push(entry);
            }
            if left == 0 {
                delete_segment(dir, first_seq)?;
                recovery.deleted_segments += 1;
                continue;
            }
            let done_path = segment_path(dir, first_seq, DONE_SUFFIX);
            let done_file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&done_path)
                .map_err(io_error(&done_path))?;
            segments.insert(
                first_seq,
                SegmentState {
                    pending: left,
                    done: Some(done_file),
                },
            );
        }
        sync_dir(dir)?;
        recovery.pending = pending_entries.len();
        let spool = Spool {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            inner: Mutex::new(Inner {
                active: None,
                segments,
                pending: pending_map,
                pending_bytes,
                next_seq,
            }),
            sync_lock: tokio::sync::Mutex::new(()),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_file,
            poisoned: Mutex::new(None),
        };
        Ok((spool, pending_entries, recovery))
    }

    /// The first seq not used by any entry on disk: the caller numbers from here.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Writes `entry` (to the page cache) and returns the ticket to pass to
    /// [`Spool::sync`]. Entries must come in increasing seq order.
    pub fn append(&self, entry: &Entry) -> Result<u64, SpoolError> {
        let body = encode_body(entry);
        let mut frame = Vec::with_capacity(FRAME_BYTES + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        let bytes = frame.len() as u64;
        let mut inner = self.lock();
        self.check_poisoned()?;
        assert!(entry.seq >= inner.next_seq, "spool seqs increase");
        let roll = match &inner.active {
            None => true,
            Some(active) => active.bytes > 0 && active.bytes + bytes > self.segment_bytes,
        };
        if roll {
            self.roll(&mut inner, entry.seq)?;
        }
        let active = inner.active.as_mut().expect("rolled above");
        let path = segment_path(&self.dir, active.first_seq, SEGMENT_SUFFIX);
        (&*active.file).write_all(&frame).map_err(io_error(&path))?;
        active.bytes += bytes;
        let first_seq = active.first_seq;
        inner.next_seq = entry.seq + 1;
        inner
            .pending
            .insert(entry.seq, (first_seq, bytes, entry.record.timestamp_ms));
        inner.pending_bytes += bytes;
        inner
            .segments
            .get_mut(&first_seq)
            .expect("the active segment is tracked")
            .pending += 1;
        Ok(self.written.fetch_add(bytes, Ordering::SeqCst) + bytes)
    }

    /// The ticket covering everything appended so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Returns once everything appended up to `ticket` is fsync'd. Concurrent callers
    /// share one fsync (group commit).
    pub async fn sync(&self, ticket: u64) -> Result<(), SpoolError> {
        if self.synced.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        let _turn = self.sync_lock.lock().await;
        if self.synced.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        self.check_poisoned()?;
        // Everything written before this point is in the active file: a roll fsyncs
        // the segment it leaves.
        let (target, file) = {
            let inner = self.lock();
            let target = self.written.load(Ordering::SeqCst);
            (
                target,
                inner.active.as_ref().map(|a| (a.file.clone(), a.first_seq)),
            )
        };
        if let Some((file, first_seq)) = file {
            let path = segment_path(&self.dir, first_seq, SEGMENT_SUFFIX);
            let sync_file = self.sync_file.clone();
            let synced = tokio::task::spawn_blocking(move || sync_file(&file))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            self.after_fsync(&path, synced)?;
        }
        self.synced.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// Poisons the spool if the fsync failed (see the module doc).
    fn after_fsync(&self, path: &Path, synced: io::Result<()>) -> Result<(), SpoolError> {
        let Err(source) = synced else {
            return Ok(());
        };
        let why = format!("{}: {source}", path.display());
        tracing::error!(
            "spool: fsync failed ({why}): the spool takes no more records until a restart"
        );
        self.poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        Err(io_error(path)(source))
    }

    fn check_poisoned(&self) -> Result<(), SpoolError> {
        match &*self.poisoned.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(SpoolError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Why the spool is out of service, if it is (a failed fsync).
    pub fn failure(&self) -> Option<String> {
        self.poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Blocking form of [`Spool::sync`] for threads outside the runtime.
    pub fn sync_blocking(&self) -> Result<(), SpoolError> {
        let inner = self.lock();
        self.check_poisoned()?;
        let target = self.written.load(Ordering::SeqCst);
        if let Some(active) = &inner.active {
            let path = segment_path(&self.dir, active.first_seq, SEGMENT_SUFFIX);
            self.after_fsync(&path, (self.sync_file)(&active.file))?;
        }
        self.synced.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// Marks `seq` delivered; deletes its segment once nothing in it is pending
    /// (unless it is the one taking appends). An unknown seq is ignored.
    pub fn delivered(&self, seq: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let Some((first_seq, bytes, _)) = inner.pending.remove(&seq) else {
            return Ok(());
        };
        inner.pending_bytes -= bytes;
        let active_seq = inner.active.as_ref().map(|a| a.first_seq);
        let segment = inner
            .segments
            .get_mut(&first_seq)
            .expect("a pending entry's segment is tracked");
        segment.pending -= 1;
        if segment.pending == 0 && active_seq != Some(first_seq) {
            inner.segments.remove(&first_seq);
            delete_segment(&self.dir, first_seq)?;
            return Ok(());
        }
        if let Some(done) = &segment.done {
            let path = segment_path(&self.dir, first_seq, DONE_SUFFIX);
            (&*done)
                .write_all(&seq.to_le_bytes())
                .map_err(io_error(&path))?;
        }
        Ok(())
    }

    pub fn depth(&self) -> Depth {
        let inner = self.lock();
        Depth {
            records: inner.pending.len() as u64,
            bytes: inner.pending_bytes,
            oldest_timestamp_ms: inner.pending.values().map(|(_, _, ts)| *ts).min(),
        }
    }

    fn roll(&self, inner: &mut Inner, first_seq: u64) -> Result<(), SpoolError> {
        if let Some(old) = inner.active.take() {
            let path = segment_path(&self.dir, old.first_seq, SEGMENT_SUFFIX);
            if let Err(err) = self.after_fsync(&path, (self.sync_file)(&old.file)) {
                // Keep it active: nothing more is appended anyway (poisoned).
                inner.active = Some(old);
                return Err(err);
            }
            if inner
                .segments
                .get(&old.first_seq)
                .is_some_and(|s| s.pending == 0)
            {
                inner.segments.remove(&old.first_seq);
                delete_segment(&self.dir, old.first_seq)?;
            }
        }
        let path = segment_path(&self.dir, first_seq, SEGMENT_SUFFIX);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let done_path = segment_path(&self.dir, first_seq, DONE_SUFFIX);
        let done = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&done_path)
            .map_err(io_error(&done_path))?;
        sync_dir(&self.dir)?;
        inner.segments.insert(
            first_seq,
            SegmentState {
                pending: 0,
                done: Some(done),
            },
        );
        inner.active = Some(Active {
            first_seq,
            file: Arc::new(file),
            bytes: 0,
        });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn segment_path(dir: &Path, first_seq: u64, suffix: &str) -> PathBuf {
    dir.join(format!("{first_seq:0SEQ_DIGITS$}.{suffix}"))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut seqs = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let item = item.map_err(io_error(dir))?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, suffix)) = name.split_once('.') else {
            continue;
        };
        if suffix == DONE_SUFFIX
            && stem.len() == SEQ_DIGITS
            && !segment_path(dir, stem.parse().unwrap_or(u64::MAX), SEGMENT_SUFFIX).exists()
        {
            // A done file whose segment is gone: debris of a deletion.
            let path = item.path();
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            continue;
        }
        if suffix != SEGMENT_SUFFIX
            || stem.len() != SEQ_DIGITS
            || !stem.bytes().all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(seq) = stem.parse() {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Every whole, valid entry of a segment with its size; a torn or corrupt tail is cut
/// off the file and its length returned.
fn read_segment(path: &Path) -> Result<(Vec<(Entry, u64)>, u64), SpoolError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_error(path))?;
    let (entries, valid) = decode_entries(&data);
    let cut = (data.len() - valid) as u64;
    if cut > 0 {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        file.set_len(valid as u64).map_err(io_error(path))?;
        file.sync_all().map_err(io_error(path))?;
    }
    Ok((entries, cut))
}

/// The entries at the start of `data` up to the first torn or corrupt one, and the
/// length of that valid prefix.
pub fn decode_entries(data: &[u8]) -> (Vec<(Entry, u64)>, usize) {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut last_seq = None;
    while data.len() - at >= FRAME_BYTES {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > BODY_BYTES_MAX || data.len() - at - FRAME_BYTES < len {
            break;
        }
        let body = &data[at + FRAME_BYTES..at + FRAME_BYTES + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let Some(entry) = decode_body(body) else {
            break;
        };
        if last_seq.is_some_and(|last| entry.seq <= last) {
            break;
        }
        last_seq = Some(entry.seq);
        let bytes = (FRAME_BYTES + len) as u64;
        entries.push((entry, bytes));
        at += FRAME_BYTES + len;
    }
    (entries, at)
}

fn read_done(path: &Path) -> Result<HashSet<u64>, SpoolError> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(io_error(path)(e)),
    };
    // A torn last mark is simply not there.
    Ok(data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn delete_segment(dir: &Path, first_seq: u64) -> Result<(), SpoolError> {
    // The segment first: a done file left alone is recognised as debris at open.
    for suffix in [SEGMENT_SUFFIX, DONE_SUFFIX] {
        let path = segment_path(dir, first_seq, suffix);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn encode_body(entry: &Entry) -> Vec<u8> {
    let r = &entry.record;
    let mut out = Vec::with_capacity(
        64 + r.topic.len()
            + r.key.as_ref().map_or(0, Vec::len)
            + r.value.as_ref().map_or(0, Vec::len)
            + r.headers
                .iter()
                .map(|(k, v)| 6 + k.len() + v.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(&entry.seq.to_le_bytes());
    out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&r.partition.unwrap_or(-1).to_le_bytes());
    put_short_bytes(&mut out, r.topic.as_bytes());
    put_bytes(&mut out, r.key.as_deref());
    put_bytes(&mut out, r.value.as_deref());
    assert!(
        r.headers.len() <= u16::MAX as usize,
        "header count is bounded by the HTTP side"
    );
    out.extend_from_slice(&(r.headers.len() as u16).to_le_bytes());
    for (name, value) in &r.headers {
        put_short_bytes(&mut out, name.as_bytes());
        put_bytes(&mut out, Some(value));
    }
    out
}

fn put_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    assert!(
        bytes.len() <= u16::MAX as usize,
        "topic and header names are short"
    );
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        Some(bytes) => {
            out.extend_from_slice(&(bytes.len() as i32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

/// A bounds-checked reader: every `take` fails rather than panics on short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn short_string(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn bytes(&mut self) -> Option<Option<Vec<u8>>> {
        match self.i32()? {
            -1 => Some(None),
            len if len >= 0 => Some(Some(self.take(len as usize)?.to_vec())),
            _ => None,
        }
    }
}

fn decode_body(body: &[u8]) -> Option<Entry> {
    let mut r = Reader(body);
    let seq = r.i64()? as u64;
    let timestamp_ms = r.i64()?;
    let partition = match r.i32()? {
        -1 => None,
        p if p >= 0 => Some(p),
        _ => return None,
    };
    let topic = r.short_string()?;
    let key = r.bytes()?;
    let value = r.bytes()?;
    let count = r.u16()? as usize;
    let mut headers = Vec::with_capacity(count.min(body.len()));
    for _ in 0..count {
        let name = r.short_string()?;
        let value = r.bytes()?.unwrap_or_default();
        headers.push((name, value));
    }
    if !r.0.is_empty() {
        return None;
    }
    Some(Entry {
        seq,
        record: Record {
            topic,
            partition,
            key,
            value,
            headers,
            timestamp_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(i: u64) -> Record {
        Record {
            topic: format!("t{}", i % 3),
            partition: if i.is_multiple_of(2) {
                Some((i % 5) as i32)
            } else {
                None
            },
            key: if i.is_multiple_of(4) {
                None
            } else {
                Some(format!("k{i}").into_bytes())
            },
            value: Some(vec![i as u8; (i % 50) as usize]),
            headers: vec![("h".into(), format!("{i}").into_bytes())],
            timestamp_ms: 1_700_000_000_000 + i as i64,
        }
    }

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            record: record(seq),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn undelivered_entries_come_back_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        {
            let (spool, pending, _) = Spool::open(dir.path(), 300).unwrap();
            assert!(pending.is_empty());
            let mut ticket = 0;
            for seq in 10..30 {
                ticket = spool.append(&entry(seq)).unwrap();
            }
            rt.block_on(spool.sync(ticket)).unwrap();
            for seq in (10..30).filter(|s| s % 3 == 0) {
                spool.delivered(seq).unwrap();
            }
            let depth = spool.depth();
            assert_eq!(
                depth.records,
                (10..30).filter(|s| s % 3 != 0).count() as u64
            );
            assert_eq!(depth.oldest_timestamp_ms, Some(record(10).timestamp_ms));
        }
        let (spool, pending, recovery) = Spool::open(dir.path(), 300).unwrap();
        let seqs: Vec<u64> = pending.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (10..30).filter(|s| s % 3 != 0).collect();
        assert_eq!(seqs, want);
        assert_eq!(recovery.pending, want.len());
        assert_eq!(recovery.truncated_bytes, 0);
        for e in &pending {
            assert_eq!(e.record, record(e.seq));
        }
        assert_eq!(spool.next_seq(), 30);
        // Delivering everything deletes every segment but the active one, and a reopen
        // finds nothing.
        for seq in want {
            spool.delivered(seq).unwrap();
        }
        assert_eq!(spool.depth(), Depth::default());
        drop(spool);
        let (_, pending, _) = Spool::open(dir.path(), 300).unwrap();
        assert!(pending.is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let path = {
            let (spool, _, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            let mut ticket = 0;
            for seq in 0..5 {
                ticket = spool.append(&entry(seq)).unwrap();
            }
            rt.block_on(spool.sync(ticket)).unwrap();
            segment_path(dir.path(), 0, SEGMENT_SUFFIX)
        };
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        let (spool, pending, recovery) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(spool.next_seq(), 4);
        spool.append(&entry(4)).unwrap();
        spool.sync_blocking().unwrap();
        drop(spool);
        let (_, pending, recovery) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(pending.len(), 5);
        assert_eq!(recovery.truncated_bytes, 0);
    }

    #[test]
    fn a_failed_fsync_is_final() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let failing = Arc::new(AtomicBool::new(false));
        let fail = failing.clone();
        let sync_file: SyncFile = Arc::new(move |file: &File| {
            if fail.load(Ordering::SeqCst) {
                Err(io::Error::from_raw_os_error(5)) // EIO
            } else {
                file.sync_data()
            }
        });
        let (spool, _, _) = Spool::open_with_sync(dir.path(), 1 << 20, sync_file).unwrap();
        let before = spool.append(&entry(0)).unwrap();
        rt.block_on(spool.sync(before)).unwrap();
        failing.store(true, Ordering::SeqCst);
        let covered = spool.append(&entry(1)).unwrap();
        assert!(
            rt.block_on(spool.sync(covered)).is_err(),
            "the failed fsync is reported"
        );
        assert!(spool.failure().is_some());
        // The disk works again: still nothing written before the failure is vouched
        // for, and nothing new is taken.
        failing.store(false, Ordering::SeqCst);
        assert!(rt.block_on(spool.sync(covered)).is_err());
        assert!(spool.sync_blocking().is_err());
        assert!(matches!(
            spool.append(&entry(2)),
            Err(SpoolError::Poisoned(_))
        ));
        // What an earlier fsync covered stays durable.
        rt.block_on(spool.sync(before)).unwrap();
        drop(spool);
        // A restart reads back what is whole, as after a crash.
        let (spool, pending, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(spool.failure().is_none());
        spool.append(&entry(2)).unwrap();
        spool.sync_blocking().unwrap();
    }

    #[test]
    fn a_failed_fsync_at_a_roll_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        // Every fsync fails; the first one happens when the first segment is left.
        let sync_file: SyncFile = Arc::new(move |_: &File| {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(5))
        });
        let (spool, _, _) = Spool::open_with_sync(dir.path(), 200, sync_file).unwrap();
        let mut seq = 0;
        let err = loop {
            match spool.append(&entry(seq)) {
                Ok(_) => seq += 1,
                Err(err) => break err,
            }
            assert!(seq < 100, "a roll must have happened");
        };
        assert!(matches!(err, SpoolError::Io { .. }), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(
            spool.append(&entry(seq + 1)),
            Err(SpoolError::Poisoned(_))
        ));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no fsync after the failed one"
        );
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (entries, valid) = decode_entries(&data);
            prop_assert!(valid <= data.len());
            prop_assert!(entries.len() <= data.len() / FRAME_BYTES);
        }

        #[test]
        fn a_damaged_segment_yields_a_prefix(n in 1u64..20, cut in 0usize..2000, flip in any::<Option<usize>>()) {
            let mut data = Vec::new();
            let mut ends = Vec::new();
            for seq in 0..n {
                let body = encode_body(&entry(seq));
                data.extend_from_slice(&(body.len() as u32).to_le_bytes());
                data.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
                data.extend_from_slice(&body);
                ends.push(data.len());
            }
            let (all, valid) = decode_entries(&data);
            prop_assert_eq!(all.len() as u64, n);
            prop_assert_eq!(valid, data.len());
            let cut = cut.min(data.len());
            data.truncate(cut);
            if let Some(at) = flip {
                if !data.is_empty() {
                    let at = at % data.len();
                    data[at] ^= 0x40;
                }
            }
            let (entries, valid) = decode_entries(&data);
            // Whatever survives is a prefix of what was written, ending on an entry boundary.
            prop_assert!(valid == 0 || ends.contains(&valid));
            for (i, (e, _)) in entries.iter().enumerate() {
                prop_assert_eq!(e, &entry(i as u64));
            }
        }
    }
}
