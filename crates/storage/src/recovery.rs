//! What `PartitionLog::open` does after a clean shutdown or a crash.
//!
//! 1. Remove debris: temporary files, files being deleted, indexes without a log.
//! 2. Read `log-start-offset` and `recovery-point`; a missing or corrupt recovery
//!    point means nothing is known to be fsync'd, so every segment is validated.
//! 3. Segments wholly below the log start are deleted (a crash interrupted that).
//! 4. Sealed segments below the recovery point are trusted: with sane indexes only
//!    the stretch after their last index entry is read (headers only), to learn
//!    their next offset and largest timestamp. Damaged indexes are rebuilt.
//! 5. From the recovery point on, every batch is CRC-checked, starting at the
//!    recovery point's position (found through the index), so the work is
//!    proportional to the unflushed tail. At the first torn or corrupt batch the
//!    file is cut and every later segment deleted.
//! 6. A pending `truncate-to` is finished, then what was validated is fsync'd and
//!    the recovery point moved to the log end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tracing::{info, warn};

use crate::checkpoint::{
    self, Checkpoint, Durability, LOG_START_OFFSET_FILE, RECOVERY_POINT_FILE, TRUNCATE_TO_FILE,
};
use crate::fsutil::{
    delete_file, io_error, parse_base_offset, remove_if_exists, segment_path, DELETED_SUFFIX,
    LOG_SUFFIX, OFFSET_INDEX_SUFFIX, TEMP_SUFFIX, TIME_INDEX_SUFFIX,
};
use crate::segment::{Segment, VERIFY_NOTHING};
use crate::{LogConfig, PartitionLog, RecoveryReport, Result};

pub(crate) fn open(
    dir: &Path,
    config: LogConfig,
    now_ms: i64,
) -> Result<(PartitionLog, RecoveryReport)> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let bases = clean_directory(dir)?;

    let log_start_checkpoint = read_checkpoint(dir, LOG_START_OFFSET_FILE)?;
    let recovery_point_checkpoint = read_checkpoint(dir, RECOVERY_POINT_FILE)?;
    let truncate_to = read_checkpoint(dir, TRUNCATE_TO_FILE)?;
    if recovery_point_checkpoint.is_none() && !bases.is_empty() {
        warn!(dir = %dir.display(), "no valid recovery point: validating every segment");
    }
    // Without a recovery point nothing is known to be durable.
    let verify_from = recovery_point_checkpoint.unwrap_or(i64::MIN);

    let mut report = RecoveryReport::default();
    let mut segments: BTreeMap<i64, Segment> = BTreeMap::new();
    for (i, &base) in bases.iter().enumerate() {
        let next_base = bases.get(i + 1).copied();
        if let (Some(log_start), Some(next_base)) = (log_start_checkpoint, next_base) {
            if next_base <= log_start {
                info!(dir = %dir.display(), base, "deleting segment below the log start");
                delete_segment_files(dir, base)?;
                continue;
            }
        }
        let flushed = next_base.is_some_and(|next_base| next_base <= verify_from);
        let verify_from_offset = if flushed { VERIFY_NOTHING } else { verify_from };
        if let Some((_, previous)) = segments.last_key_value() {
            let previous_end = previous.next_offset();
            if previous_end != base && !flushed {
                // Unflushed segments must continue the log exactly; a gap means
                // the segment before lost its tail, so this one cannot follow it.
                warn!(dir = %dir.display(), base, previous_end, "segment does not continue the log; deleting it and later ones");
                for &later in &bases[i..] {
                    let path = segment_path(dir, later, LOG_SUFFIX);
                    report.truncated_bytes +=
                        std::fs::metadata(&path).map_err(io_error(&path))?.len();
                    delete_segment_files(dir, later)?;
                }
                break;
            }
        }
        let recovered =
            Segment::recover(dir, base, verify_from_offset, config.index_interval_bytes)?;
        report.validated_bytes += recovered.validated_bytes;
        report.rebuilt_indexes += recovered.rebuilt_indexes;
        report.truncated_bytes += recovered.cut_bytes;
        segments.insert(base, recovered.segment);
        if recovered.cut_bytes > 0 {
            // Nothing after a cut can be trusted to follow it.
            for &later in &bases[i + 1..] {
                let path = segment_path(dir, later, LOG_SUFFIX);
                let bytes = std::fs::metadata(&path).map_err(io_error(&path))?.len();
                warn!(path = %path.display(), bytes, "deleting segment after a truncated one");
                report.truncated_bytes += bytes;
                delete_segment_files(dir, later)?;
            }
            break;
        }
    }
    if segments.is_empty() {
        let base = log_start_checkpoint.unwrap_or(0);
        segments.insert(base, Segment::create(dir, base)?);
    }
    if let Some((_, active)) = segments.last_key_value() {
        // The first append's time is not on disk; the roll timer restarts with the broker.
        if !active.is_empty() {
            if let Some(mut entry) = segments.last_entry() {
                entry.get_mut().set_first_append_ms(now_ms);
            }
        }
    }

    let first_base = *segments.keys().next().expect("at least one segment");
    let log_end = segments
        .values()
        .next_back()
        .expect("at least one segment")
        .next_offset();
    let log_start = log_start_checkpoint.unwrap_or(first_base).max(first_base);
    let mut log = PartitionLog {
        dir: dir.to_path_buf(),
        config,
        segments,
        log_start_offset: log_start.min(log_end),
        high_watermark: log_end,
        recovery_point: recovery_point_checkpoint.map_or(first_base, |rp| rp.min(log_end)),
        recovery_point_on_disk: recovery_point_checkpoint.map_or(i64::MIN, |rp| rp.min(log_end)),
        truncated_since_mark: None,
        offline: None,
    };
    if log_start > log_end {
        // Recovery cut below a log start that was moved up before the crash; keep
        // offsets monotonic by restarting there (as Kafka does).
        warn!(dir = %dir.display(), log_start, log_end, "log start beyond recovered log end: restarting the log there");
        log.truncate_fully_and_start_at(log_start)?;
    }
    if let Some(offset) = truncate_to {
        info!(dir = %dir.display(), offset, "finishing an interrupted truncation");
        log.truncate_to(offset)?;
        checkpoint::remove(dir, TRUNCATE_TO_FILE)?;
    } else {
        remove_if_exists(&dir.join(TRUNCATE_TO_FILE))?;
    }
    if log.recovery_point < log.log_end_offset() {
        log.flush()?;
    } else if recovery_point_checkpoint != Some(log.recovery_point) {
        checkpoint::write(
            dir,
            RECOVERY_POINT_FILE,
            log.recovery_point,
            Durability::Lazy,
        )?;
        log.recovery_point_on_disk = log.recovery_point;
    }
    debug_assert!(
        log.log_start_offset <= log.high_watermark && log.high_watermark <= log.log_end_offset()
    );
    Ok((log, report))
}

fn read_checkpoint(dir: &Path, name: &str) -> Result<Option<i64>> {
    Ok(match checkpoint::read(dir, name)? {
        Checkpoint::Offset(offset) => Some(offset),
        Checkpoint::Missing => None,
        Checkpoint::Corrupt => {
            warn!(dir = %dir.display(), name, "checkpoint file is corrupt; ignoring it");
            None
        }
    })
}

fn delete_segment_files(dir: &Path, base: i64) -> Result<()> {
    for suffix in [LOG_SUFFIX, OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
        delete_file(&segment_path(dir, base, suffix))?;
    }
    Ok(())
}

/// Removes crash debris and returns the base offsets of the segments, sorted.
fn clean_directory(dir: &Path) -> Result<Vec<i64>> {
    let mut logs = BTreeSet::new();
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some((stem, suffix)) = name.rsplit_once('.') else {
            continue;
        };
        if suffix == TEMP_SUFFIX || suffix == DELETED_SUFFIX {
            info!(path = %path.display(), "removing leftover file");
            remove_if_exists(&path)?;
            continue;
        }
        let base = parse_base_offset(stem);
        match (suffix, base) {
            (LOG_SUFFIX, Some(base)) => {
                logs.insert(base);
            }
            (OFFSET_INDEX_SUFFIX | TIME_INDEX_SUFFIX, Some(base)) => indexes.push((base, path)),
            (LOG_SUFFIX | OFFSET_INDEX_SUFFIX | TIME_INDEX_SUFFIX, None) => {
                warn!(path = %path.display(), "ignoring a file not named like a segment");
            }
            _ => {}
        }
    }
    for (base, path) in indexes {
        if !logs.contains(&base) {
            info!(path = %path.display(), "removing index without a log");
            remove_if_exists(&path)?;
        }
    }
    Ok(logs.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::build_simple_batch;

    #[test]
    fn open_finishes_an_interrupted_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 200,
            index_interval_bytes: 1,
            ..LogConfig::default()
        };
        let (mut log, _) = PartitionLog::open(dir.path(), config.clone(), 0).unwrap();
        for i in 0..10 {
            log.append(&build_simple_batch(i, &[b"x", b"y"]), 0, 0)
                .unwrap();
        }
        log.close().unwrap();
        // As if truncate_to(7) crashed right after recording its target.
        checkpoint::write(dir.path(), TRUNCATE_TO_FILE, 7, Durability::Durable).unwrap();
        let (log, _) = PartitionLog::open(dir.path(), config.clone(), 0).unwrap();
        assert_eq!(
            log.log_end_offset(),
            6,
            "offset 7 is inside the batch 6..=7"
        );
        assert_eq!(log.recovery_point(), 6);
        assert!(!dir.path().join(TRUNCATE_TO_FILE).exists());
        drop(log);
        let (log, report) = PartitionLog::open(dir.path(), config, 0).unwrap();
        assert_eq!((log.log_end_offset(), report.validated_bytes), (6, 0));
    }
}
