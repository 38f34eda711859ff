//! Small checksummed files holding one offset: `log-start-offset` and
//! `recovery-point`. A file is written whole to a temporary name and renamed into
//! place, so a reader sees the old value or the new one; the checksum catches the
//! case where a crash persisted the rename but not the bytes.
//!
//! Layout (16 bytes): magic `FCP1` | offset i64 BE | CRC-32C of the first 12 bytes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::fsutil::{io_error, sync_dir};
use crate::Result;

pub(crate) const LOG_START_OFFSET_FILE: &str = "log-start-offset";
pub(crate) const RECOVERY_POINT_FILE: &str = "recovery-point";
/// Present only while `truncate_to` runs: the offset it truncates to, so that a
/// crash midway is finished by the next `open` instead of leaving a partly
/// truncated log whose stale tail would validate as good batches.
pub(crate) const TRUNCATE_TO_FILE: &str = "truncate-to";

const MAGIC: [u8; 4] = *b"FCP1";
const FILE_BYTES: usize = 16;
const CRC_AT: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checkpoint {
    Missing,
    /// Torn, truncated or not ours: the value is unknown.
    Corrupt,
    Offset(i64),
}

pub(crate) use common::Durability;

fn encode(offset: i64) -> [u8; FILE_BYTES] {
    let mut out = [0u8; FILE_BYTES];
    out[..4].copy_from_slice(&MAGIC);
    out[4..CRC_AT].copy_from_slice(&offset.to_be_bytes());
    let crc = crc32c::crc32c(&out[..CRC_AT]);
    out[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Checkpoint {
    let Ok(bytes) = <&[u8; FILE_BYTES]>::try_from(bytes) else {
        return Checkpoint::Corrupt;
    };
    let [m0, m1, m2, m3, o0, o1, o2, o3, o4, o5, o6, o7, c0, c1, c2, c3] = *bytes;
    let offset = i64::from_be_bytes([o0, o1, o2, o3, o4, o5, o6, o7]);
    let stored_crc = u32::from_be_bytes([c0, c1, c2, c3]);
    if [m0, m1, m2, m3] != MAGIC || crc32c::crc32c(&bytes[..CRC_AT]) != stored_crc || offset < 0 {
        return Checkpoint::Corrupt;
    }
    Checkpoint::Offset(offset)
}

pub(crate) fn read(dir: &Path, name: &str) -> Result<Checkpoint> {
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::Missing),
        Err(e) => return Err(io_error(&path)(e)),
    };
    // One byte more than a valid file so that an overlong file reads as corrupt
    // without reading all of it.
    let mut bytes = Vec::with_capacity(FILE_BYTES + 1);
    file.take(FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(&path))?;
    Ok(decode(&bytes))
}

/// Replaces the checkpoint `name` in `dir` through the one durable write
/// ([`common::write_file_atomically`]).
pub(crate) fn write(dir: &Path, name: &str, offset: i64, durability: Durability) -> Result<()> {
    assert!(offset >= 0, "checkpointed offsets are never negative");
    let path = dir.join(name);
    common::write_file_atomically(&path, &encode(offset), durability).map_err(io_error(&path))
}

/// Removes a checkpoint file durably (a missing one is fine).
pub(crate) fn remove(dir: &Path, name: &str) -> Result<()> {
    crate::fsutil::remove_if_exists(&dir.join(name))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
            Checkpoint::Missing
        );
        write(dir.path(), RECOVERY_POINT_FILE, 1234, Durability::Lazy).unwrap();
        assert_eq!(
            read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
            Checkpoint::Offset(1234)
        );
        write(dir.path(), RECOVERY_POINT_FILE, 99, Durability::Durable).unwrap();
        assert_eq!(
            read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
            Checkpoint::Offset(99)
        );
        assert!(!dir.path().join("recovery-point.tmp").exists());

        let path = dir.path().join(RECOVERY_POINT_FILE);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(
                read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
                Checkpoint::Corrupt,
                "flip at {i}"
            );
        }
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            assert_eq!(
                read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
                Checkpoint::Corrupt,
                "torn at {len}"
            );
        }
        std::fs::write(&path, [good.as_slice(), b"x"].concat()).unwrap();
        assert_eq!(
            read(dir.path(), RECOVERY_POINT_FILE).unwrap(),
            Checkpoint::Corrupt
        );
    }
}
