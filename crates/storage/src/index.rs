//! The sparse offset index and the time index of one segment.
//!
//! Both are kept whole in memory (a `Vec`, binary-searched) and appended to their
//! files, which exist only so that a restart need not rescan the segment. No mmap,
//! no preallocation: a file holds exactly its entries.
//!
//! - Offset index entry (8 bytes): relative offset u32 BE | file position u32 BE.
//!   The batch whose base offset is `segment base + relative offset` starts at
//!   `position`. One entry per `index_interval_bytes` of log; never one at
//!   position 0, which is implicit.
//! - Time index entry (12 bytes): timestamp i64 BE | relative offset u32 BE, added
//!   together with the offset-index entry of the same relative offset when the
//!   segment's largest timestamp grew since the last time entry. Invariant: every
//!   record of the segment below that offset has a timestamp `<=` the entry's
//!   timestamp, which lets a timestamp search start at the entry's position when
//!   the entry's timestamp is below the target.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fsutil::io_error;
use crate::Result;

pub(crate) trait IndexEntry: Copy + Eq + Debug {
    const BYTES: usize;
    fn encode(&self, out: &mut Vec<u8>);
    /// `bytes` holds exactly `BYTES` bytes.
    fn decode(bytes: &[u8]) -> Self;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp_ms: i64,
    pub relative_offset: u32,
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl IndexEntry for OffsetEntry {
    const BYTES: usize = 8;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.relative_offset.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
    }
    fn decode(bytes: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: u32::from_be_bytes(array(bytes)),
            position: u32::from_be_bytes(array(&bytes[4..])),
        }
    }
}

impl IndexEntry for TimeEntry {
    const BYTES: usize = 12;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.relative_offset.to_be_bytes());
    }
    fn decode(bytes: &[u8]) -> Self {
        TimeEntry {
            timestamp_ms: i64::from_be_bytes(array(bytes)),
            relative_offset: u32::from_be_bytes(array(&bytes[8..])),
        }
    }
}

/// What was on disk when an index file was opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Loaded<E> {
    Entries(Vec<E>),
    Missing,
    /// Not a whole number of entries.
    Damaged,
}

/// An index file and its entries. The first `synced_entries` entries in memory are
/// known to be in the file as they are; `write_pending` brings the file in line.
#[derive(Debug)]
pub(crate) struct IndexFile<E> {
    path: PathBuf,
    file: Arc<File>,
    entries: Vec<E>,
    /// Leading entries that the file holds exactly.
    file_entries: usize,
    /// Length of the file, `None` after a failed write left it unknown.
    file_bytes: Option<u64>,
}

impl<E: IndexEntry> IndexFile<E> {
    /// A new, empty index file (an existing one is emptied: it is stale).
    pub fn create(path: PathBuf) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Ok(IndexFile {
            path,
            file: Arc::new(file),
            entries: Vec::new(),
            file_entries: 0,
            file_bytes: Some(0),
        })
    }

    /// Opens (creating if missing) the index file and reports what it held. The
    /// returned index starts empty in memory: the caller checks the entries against
    /// the segment and then `adopt`s them or rebuilds.
    pub fn open(path: PathBuf) -> Result<(Self, Loaded<E>)> {
        let (file, existed) = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_error(&path))?,
                false,
            ),
            Err(e) => return Err(io_error(&path)(e)),
        };
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(io_error(&path))?;
        let loaded = if !existed {
            Loaded::Missing
        } else if bytes.len() % E::BYTES != 0 {
            Loaded::Damaged
        } else {
            Loaded::Entries(bytes.chunks_exact(E::BYTES).map(E::decode).collect())
        };
        let index = IndexFile {
            path,
            file: Arc::new(file),
            entries: Vec::new(),
            file_entries: 0,
            file_bytes: Some(bytes.len() as u64),
        };
        Ok((index, loaded))
    }

    /// Takes entries just loaded from this file as the index.
    pub fn adopt(&mut self, entries: Vec<E>) {
        assert!(self.entries.is_empty(), "adopt only right after open");
        debug_assert_eq!(self.file_bytes, Some((entries.len() * E::BYTES) as u64));
        self.file_entries = entries.len();
        self.entries = entries;
    }

    pub fn entries(&self) -> &[E] {
        &self.entries
    }
    pub fn last(&self) -> Option<E> {
        self.entries.last().copied()
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds an entry in memory only; `write_pending` writes it.
    pub fn push(&mut self, entry: E) {
        self.entries.push(entry);
    }

    /// Keeps the first `len` entries, in memory only; `write_pending` trims the file.
    pub fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
        self.file_entries = self.file_entries.min(len);
    }

    /// Makes the file hold exactly the entries in memory, writing only what changed.
    pub fn write_pending(&mut self) -> Result<()> {
        let synced_bytes = (self.file_entries * E::BYTES) as u64;
        if self.file_bytes != Some(synced_bytes) {
            self.file
                .set_len(synced_bytes)
                .map_err(io_error(&self.path))?;
            self.file_bytes = Some(synced_bytes);
        }
        if self.file_entries == self.entries.len() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity((self.entries.len() - self.file_entries) * E::BYTES);
        for entry in &self.entries[self.file_entries..] {
            entry.encode(&mut bytes);
        }
        if let Err(e) = self.file.write_all_at(&bytes, synced_bytes) {
            self.file_bytes = None;
            return Err(io_error(&self.path)(e));
        }
        self.file_entries = self.entries.len();
        self.file_bytes = Some(synced_bytes + bytes.len() as u64);
        Ok(())
    }

    /// Appends one entry to memory and file; on error neither changes.
    pub fn append(&mut self, entry: E) -> Result<()> {
        let len = self.entries.len();
        self.entries.push(entry);
        let result = self.write_pending();
        if result.is_err() {
            self.truncate(len);
        }
        result
    }
}

/// The last offset-index entry at or below `relative_offset`.
pub(crate) fn floor_offset_entry(
    entries: &[OffsetEntry],
    relative_offset: u32,
) -> Option<OffsetEntry> {
    let after = entries.partition_point(|e| e.relative_offset <= relative_offset);
    after.checked_sub(1).map(|i| entries[i])
}

/// The last time-index entry whose timestamp is below `timestamp_ms`.
pub(crate) fn last_time_entry_below(entries: &[TimeEntry], timestamp_ms: i64) -> Option<TimeEntry> {
    let after = entries.partition_point(|e| e.timestamp_ms < timestamp_ms);
    after.checked_sub(1).map(|i| entries[i])
}

/// Why an offset index does not fit its segment.
pub(crate) fn check_offset_index(
    entries: &[OffsetEntry],
    log_bytes: u64,
) -> std::result::Result<(), &'static str> {
    for pair in entries.windows(2) {
        if pair[1].relative_offset <= pair[0].relative_offset
            || pair[1].position <= pair[0].position
        {
            return Err("offset index entries do not increase");
        }
    }
    match entries.first() {
        Some(first) if first.position == 0 => {
            return Err("offset index has an entry at position 0")
        }
        _ => {}
    }
    match entries.last() {
        Some(last) if u64::from(last.position) >= log_bytes => {
            Err("offset index points past the end of the log")
        }
        _ => Ok(()),
    }
}

/// Why a time index is damaged: its entries must increase and, when the offset
/// index is known (`offsets`), each must sit at the relative offset of an
/// offset-index entry (they are written in pairs), and the first offset-index
/// entry must have one (some batch precedes it, so the largest timestamp grew).
pub(crate) fn check_time_index(
    entries: &[TimeEntry],
    offsets: Option<&[OffsetEntry]>,
) -> std::result::Result<(), &'static str> {
    for pair in entries.windows(2) {
        if pair[1].relative_offset <= pair[0].relative_offset
            || pair[1].timestamp_ms <= pair[0].timestamp_ms
        {
            return Err("time index entries do not increase");
        }
    }
    let Some(offsets) = offsets else {
        return Ok(());
    };
    if entries.iter().any(|t| {
        offsets
            .binary_search_by_key(&t.relative_offset, |o| o.relative_offset)
            .is_err()
    }) {
        return Err("time index entry without an offset index entry");
    }
    match (offsets.first(), entries.first()) {
        (Some(o), Some(t)) if o.relative_offset != t.relative_offset => {
            Err("time index lost its first entry")
        }
        (Some(_), None) => Err("time index is empty but the offset index is not"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(relative_offset: u32, position: u32) -> OffsetEntry {
        OffsetEntry {
            relative_offset,
            position,
        }
    }
    fn t(timestamp_ms: i64, relative_offset: u32) -> TimeEntry {
        TimeEntry {
            timestamp_ms,
            relative_offset,
        }
    }

    #[test]
    fn entries_encode_big_endian() {
        let mut out = Vec::new();
        o(0x01020304, 0x0a0b0c0d).encode(&mut out);
        assert_eq!(out, [1, 2, 3, 4, 0xa, 0xb, 0xc, 0xd]);
        assert_eq!(OffsetEntry::decode(&out), o(0x01020304, 0x0a0b0c0d));
        let mut out = Vec::new();
        t(-2, 7).encode(&mut out);
        assert_eq!(out.len(), TimeEntry::BYTES);
        assert_eq!(TimeEntry::decode(&out), t(-2, 7));
    }

    #[test]
    fn file_follows_memory_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.index");
        let (mut index, loaded) = IndexFile::<OffsetEntry>::open(path.clone()).unwrap();
        assert_eq!(loaded, Loaded::Missing);
        index.append(o(1, 10)).unwrap();
        index.push(o(2, 20));
        index.push(o(3, 30));
        index.write_pending().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
        index.truncate(1);
        index.push(o(5, 50));
        index.write_pending().unwrap();
        let (_, loaded) = IndexFile::<OffsetEntry>::open(path.clone()).unwrap();
        assert_eq!(loaded, Loaded::Entries(vec![o(1, 10), o(5, 50)]));
        std::fs::write(&path, [0u8; 9]).unwrap();
        let (_, loaded) = IndexFile::<OffsetEntry>::open(path).unwrap();
        assert_eq!(loaded, Loaded::Damaged);
    }

    #[test]
    fn lookups() {
        let offsets = [o(3, 100), o(7, 200), o(9, 300)];
        assert_eq!(floor_offset_entry(&offsets, 2), None);
        assert_eq!(floor_offset_entry(&offsets, 3), Some(o(3, 100)));
        assert_eq!(floor_offset_entry(&offsets, 8), Some(o(7, 200)));
        assert_eq!(floor_offset_entry(&offsets, u32::MAX), Some(o(9, 300)));
        let times = [t(10, 3), t(20, 9)];
        assert_eq!(last_time_entry_below(&times, 10), None);
        assert_eq!(last_time_entry_below(&times, 11), Some(t(10, 3)));
        assert_eq!(last_time_entry_below(&times, 21), Some(t(20, 9)));
    }

    #[test]
    fn sanity_checks() {
        assert!(check_offset_index(&[o(3, 100), o(7, 200)], 201).is_ok());
        assert!(check_offset_index(&[o(3, 100), o(7, 200)], 200).is_err());
        assert!(check_offset_index(&[o(3, 100), o(3, 200)], 500).is_err());
        assert!(check_offset_index(&[o(3, 100), o(4, 100)], 500).is_err());
        assert!(check_offset_index(&[o(0, 0)], 500).is_err());
        let offsets = [o(3, 100), o(7, 200)];
        let offsets = Some(offsets.as_slice());
        assert!(check_time_index(&[t(5, 3), t(6, 7)], offsets).is_ok());
        assert!(check_time_index(&[t(5, 3)], offsets).is_ok());
        assert!(check_time_index(&[], offsets).is_err());
        assert!(check_time_index(&[t(5, 7)], offsets).is_err());
        assert!(check_time_index(&[t(5, 3), t(5, 7)], offsets).is_err());
        assert!(check_time_index(&[t(5, 3), t(6, 8)], offsets).is_err());
        assert!(check_time_index(&[], Some(&[])).is_ok());
        assert!(
            check_time_index(&[t(5, 7)], None).is_ok(),
            "alone, only the order is checked"
        );
        assert!(check_time_index(&[t(6, 3), t(5, 7)], None).is_err());
    }
}
