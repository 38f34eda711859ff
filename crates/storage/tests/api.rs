//! One test per operation of `PartitionLog`, through its public API only.

mod common;

use common::*;
use protocol::record_batch::{batches, validate, BatchError};
use storage::{LogConfig, PartitionLog, ReadSlice, StorageError, TimestampOffset};

fn open(dir: &std::path::Path, config: LogConfig) -> PartitionLog {
    PartitionLog::open(dir, config, 0).unwrap().0
}

/// A timestamp lookup's answer: the first offset at or after the target, and the
/// timestamp it has.
/// `batch` as the log stores it: base offset and leader epoch rewritten.
fn as_stored(batch: &[u8], base_offset: i64, epoch: i32) -> Vec<u8> {
    let mut stored = batch.to_vec();
    protocol::record_batch::set_base_offset(&mut stored, base_offset);
    protocol::record_batch::set_partition_leader_epoch(&mut stored, epoch);
    stored
}

fn found(offset: i64, timestamp: i64) -> Option<TimestampOffset> {
    Some(TimestampOffset { offset, timestamp })
}

/// Takes a flush handle, syncs it, and marks the log flushed up to it: what the
/// broker's flusher does, off the log's lock.
fn sync_and_mark_flushed(log: &mut PartitionLog) {
    let handle = log.flush_handle().unwrap();
    handle.sync().unwrap();
    log.mark_flushed(handle.up_to_offset);
}

/// Batches whose records are out of timestamp order, inside and across batches.
const UNORDERED_TIMESTAMPS: [&[i64]; 6] = [
    &[10, 30, 20],
    &[25, 40],
    &[35, 35, 50, 45],
    &[60],
    &[55, 70],
    &[72, 65, 71],
];

#[test]
fn open_creates_directory_and_starts_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("topic-0");
    let (log, report) = PartitionLog::open(&dir, config(1 << 20, 4096), 0).unwrap();
    assert!(dir.is_dir());
    assert_eq!(report, Default::default());
    assert_eq!(
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.high_watermark()
        ),
        (0, 0, 0)
    );
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.size_bytes(), 0);
    assert_eq!(log.read(0, 100, 0).unwrap().len, 0);
    assert!(matches!(
        log.read(1, 100, 1),
        Err(StorageError::OffsetOutOfRange {
            requested: 1,
            log_start: 0,
            log_end: 0
        })
    ));
    assert_eq!(ReadSlice::empty().load().unwrap().len(), 0);
}

#[test]
fn append_rewrites_offset_and_epoch_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    let first = batch(1_000, &[b"a", b"b", b"c"]);
    let info = log.append(&first, 7, 0).unwrap();
    assert_eq!(
        (info.base_offset, info.last_offset, info.max_timestamp),
        (0, 2, 1_000)
    );
    let second = batch(2_000, &[b"d"]);
    let info = log.append(&second, 8, 0).unwrap();
    assert_eq!((info.base_offset, info.last_offset), (3, 3));
    assert_eq!(log.log_end_offset(), 4);
    // The caller's buffer is left as it was; the stored copy is rewritten and
    // still validates.
    assert_eq!(validate(&second).unwrap().base_offset, 0);
    let stored = read_all(&log);
    let h = validate(&stored[1]).unwrap();
    assert_eq!((h.base_offset, h.partition_leader_epoch), (3, 8));
    assert_eq!(
        stored,
        vec![as_stored(&first, 0, 7), as_stored(&second, 3, 8)]
    );
    assert_eq!(log.size_bytes(), (first.len() + second.len()) as u64);
}

#[test]
fn invalid_batches_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch(1, &[b"ok"]), 0, 0).unwrap();
    let size = log.size_bytes();

    let mut corrupt = batch(1, &[b"payload"]);
    let last = corrupt.len() - 2;
    corrupt[last] ^= 1;
    assert!(matches!(
        log.append(&corrupt, 0, 0),
        Err(StorageError::InvalidBatch(BatchError::CrcMismatch { .. }))
    ));
    let two = [batch(1, &[b"x"]), batch(2, &[b"y"])].concat();
    assert!(matches!(
        log.append(&two, 0, 0),
        Err(StorageError::InvalidBatch(BatchError::TrailingBytes(_)))
    ));
    let short = batch(1, &[b"x"])[..40].to_vec();
    assert!(matches!(
        log.append(&short, 0, 0),
        Err(StorageError::InvalidBatch(_))
    ));

    assert_eq!(log.size_bytes(), size);
    assert_eq!(log.log_end_offset(), 1);
    assert_eq!(
        std::fs::metadata(log_path(tmp.path(), 0)).unwrap().len(),
        size
    );
}

#[test]
fn read_returns_at_least_one_batch_and_honours_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 1));
    let mut stored = Vec::new();
    for i in 0..5 {
        let b = batch_of(3, i);
        let info = log.append(&b, 0, 0).unwrap();
        stored.push(as_stored(&b, info.base_offset, 0));
    }
    let size = stored[0].len();
    // Offset inside the second batch: the slice starts at that batch.
    let slice = log.read(4, 1, 15).unwrap();
    assert_eq!(
        slice.load().unwrap().as_ref(),
        stored[1].as_slice(),
        "max_bytes below one batch still gives one"
    );
    // max_bytes cutting inside the third batch gives a partial trailing batch.
    let slice = log.read(3, size + 10, 15).unwrap();
    assert_eq!(slice.len, size + 10);
    let bytes = slice.load().unwrap();
    assert_eq!(&bytes[..size], stored[1].as_slice());
    assert_eq!(&bytes[size..], &stored[2][..10]);
    // max_offset at a batch boundary excludes that batch and all later ones.
    let slice = log.read(0, 1 << 20, 9).unwrap();
    assert_eq!(
        slice.load().unwrap().as_ref(),
        stored[..3].concat().as_slice()
    );
    // max_offset inside a batch excludes that batch too.
    let slice = log.read(0, 1 << 20, 10).unwrap();
    assert_eq!(slice.len, 3 * size);
    let slice = log.read(9, 1 << 20, 10).unwrap();
    assert!(
        slice.is_empty(),
        "the batch holding offset also holds max_offset"
    );
    assert!(log.read(6, 100, 6).unwrap().is_empty());
    assert!(log.read(15, 100, 15).unwrap().is_empty());
    assert!(log.read(15, 100, 100).unwrap().is_empty());
    assert!(matches!(
        log.read(16, 100, 100),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert!(matches!(
        log.read(-1, 100, 100),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
}

/// A replay reading a few bytes at a time sees every batch whole, once, in order,
/// whatever the read size: reads that end inside a batch, segments that end
/// inside a read.
#[test]
fn for_each_batch_passes_whole_batches_whatever_the_read_size() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(2, 0).len() as u64;
    let mut log = open(tmp.path(), config(3 * one, 4096));
    for i in 0..12 {
        log.append(&batch_of(1 + i % 3, i as i64), 0, 0).unwrap();
    }
    assert!(log.segment_count() > 2);
    let all = read_all(&log);
    let end = log.log_end_offset();
    for read_bytes in [
        1,
        10,
        one as usize - 1,
        one as usize + 7,
        5 * one as usize,
        1 << 20,
    ] {
        let mut seen = Vec::new();
        log.for_each_batch(0, end, read_bytes, |header, batch| {
            assert_eq!(header.total_bytes(), batch.len());
            seen.push(batch.to_vec());
        })
        .unwrap();
        assert_eq!(seen, all, "read {read_bytes} bytes at a time");
        // From inside a batch: that batch first; up to an earlier end: fewer.
        let third = header(&all[2]);
        let mut from_inside = Vec::new();
        log.for_each_batch(
            third.base_offset + 1,
            third.last_offset() + 1,
            read_bytes,
            |h, _| from_inside.push(h.base_offset),
        )
        .unwrap();
        assert_eq!(from_inside, vec![third.base_offset], "read {read_bytes}");
    }
}

#[test]
fn reads_stay_within_one_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(2, 0).len() as u64;
    let mut log = open(tmp.path(), config(2 * one, 4096));
    for _ in 0..5 {
        log.append(&batch_of(2, 0), 0, 0).unwrap();
    }
    assert_eq!(segment_bases(tmp.path()), vec![0, 4, 8]);
    assert_eq!(log.segment_count(), 3);
    let slice = log.read(1, 1 << 20, 10).unwrap();
    assert_eq!(slice.len as u64, 2 * one);
    let slice = log.read(4, 1 << 20, 10).unwrap();
    assert_eq!((slice.position, slice.len as u64), (0, 2 * one));
    let headers: Vec<_> = batches(&slice.load().unwrap())
        .map(|b| b.unwrap().0.base_offset)
        .collect();
    assert_eq!(headers, vec![4, 6]);
}

/// Descriptors this process holds on files under `dir`.
fn descriptors_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}

#[test]
fn a_log_keeps_one_descriptor_per_segment() {
    // Thousands of partitions must fit in a process's descriptor limit: each keeps
    // its segments' logs open, and opens its index files and directory only to
    // write and fsync them.
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(2, 0).len() as u64;
    // An index entry every batch, so every flush has index bytes to write.
    let mut log = open(tmp.path(), config(2 * one, 1));
    for _ in 0..5 {
        log.append(&batch_of(2, 0), 0, 0).unwrap();
        sync_and_mark_flushed(&mut log);
    }
    assert_eq!(log.segment_count(), 3);
    let mut held = descriptors_under(tmp.path());
    held.sort();
    let logs: Vec<_> = [0, 4, 8]
        .iter()
        .map(|base| log_path(tmp.path(), *base))
        .collect();
    assert_eq!(held, logs);
    // The index files hold what the flushes wrote: reopened as trusted, the log
    // reads every offset.
    drop(log);
    let log = open(tmp.path(), config(2 * one, 1));
    assert_eq!(read_all(&log).len(), 5);
    assert_eq!(descriptors_under(tmp.path()).len(), 3);
}

#[test]
fn rolls_by_time() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(
        tmp.path(),
        LogConfig {
            segment_ms: 100,
            ..config(1 << 20, 4096)
        },
    );
    log.append(&batch_of(1, 0), 0, 1_000).unwrap();
    log.append(&batch_of(1, 0), 0, 1_099).unwrap();
    assert_eq!(log.segment_count(), 1);
    log.append(&batch_of(1, 0), 0, 1_100).unwrap();
    assert_eq!(segment_bases(tmp.path()), vec![0, 2]);
    // The new segment's clock starts at its own first append.
    log.append(&batch_of(1, 0), 0, 1_150).unwrap();
    assert_eq!(log.segment_count(), 2);
    // set_config applies to the next roll decision.
    log.set_config(LogConfig {
        segment_ms: 10,
        ..log.config().clone()
    });
    log.append(&batch_of(1, 0), 0, 1_150).unwrap();
    assert_eq!(segment_bases(tmp.path()), vec![0, 2, 4]);
}

#[test]
fn high_watermark_is_clamped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(5, 0), 0, 0).unwrap();
    assert_eq!(log.high_watermark(), 0, "starts at the log end of open");
    log.set_high_watermark(3);
    assert_eq!(log.high_watermark(), 3);
    log.set_high_watermark(99);
    assert_eq!(log.high_watermark(), 5);
    log.set_high_watermark(-4);
    assert_eq!(log.high_watermark(), 0);
    drop(log);
    assert_eq!(open(tmp.path(), config(1 << 20, 4096)).high_watermark(), 5);
}

#[test]
fn truncate_mid_batch_then_append() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(3, 0).len() as u64;
    let mut log = open(tmp.path(), config(3 * one, 1));
    let mut stored = Vec::new();
    for i in 0..7 {
        let b = batch_of(3, i);
        let info = log.append(&b, 1, 0).unwrap();
        stored.push(as_stored(&b, info.base_offset, 1));
    }
    log.set_high_watermark(21);
    log.flush().unwrap();
    assert_eq!(segment_bases(tmp.path()), vec![0, 9, 18]);
    // Offset 10 is inside the batch 9..=11: that whole batch goes.
    log.truncate_to(10).unwrap();
    assert_eq!(log.log_end_offset(), 9);
    assert_eq!(log.high_watermark(), 9);
    assert_eq!(log.recovery_point(), 9);
    assert_eq!(segment_bases(tmp.path()), vec![0, 9]);
    assert_eq!(read_all(&log), stored[..3].to_vec());
    let info = log.append(&batch_of(2, 50), 2, 0).unwrap();
    assert_eq!((info.base_offset, info.last_offset), (9, 10));
    // Truncating at the log end is a no-op; at a batch boundary keeps that batch out.
    log.truncate_to(11).unwrap();
    assert_eq!(log.log_end_offset(), 11);
    log.truncate_to(3).unwrap();
    assert_eq!(log.log_end_offset(), 3);
    assert_eq!(read_all(&log), stored[..1].to_vec());
    drop(log);
    let (log, report) = PartitionLog::open(tmp.path(), config(3 * one, 1), 0).unwrap();
    assert_eq!(log.log_end_offset(), 3);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&log), stored[..1].to_vec());
}

#[test]
fn truncate_below_first_segment_restarts_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(1, 0).len() as u64;
    let mut log = open(tmp.path(), config(one, 4096));
    for _ in 0..4 {
        log.append(&batch_of(1, 0), 0, 0).unwrap();
    }
    log.set_high_watermark(4);
    assert_eq!(log.delete_records_before(2).unwrap(), 2);
    assert_eq!(segment_bases(tmp.path()), vec![2, 3]);
    log.truncate_to(1).unwrap();
    assert_eq!(
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.high_watermark()
        ),
        (1, 1, 1)
    );
    assert_eq!(segment_bases(tmp.path()), vec![1]);
    log.append(&batch_of(1, 0), 0, 0).unwrap();
    drop(log);
    let log = open(tmp.path(), config(one, 4096));
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (1, 2));
}

#[test]
fn delete_records_before_clamps_persists_and_deletes_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(2, 0).len() as u64;
    let mut log = open(tmp.path(), config(one, 4096));
    for _ in 0..4 {
        log.append(&batch_of(2, 0), 0, 0).unwrap();
    }
    log.set_high_watermark(6);
    assert_eq!(
        log.delete_records_before(100).unwrap(),
        6,
        "clamped to the high watermark"
    );
    assert_eq!(log.delete_records_before(3).unwrap(), 6, "never moves down");
    assert_eq!(segment_bases(tmp.path()), vec![6]);
    assert!(matches!(
        log.read(5, 100, 8),
        Err(StorageError::OffsetOutOfRange { log_start: 6, .. })
    ));
    drop(log);
    let log = open(tmp.path(), config(one, 4096));
    assert_eq!(log.log_start_offset(), 6);

    // Inside a segment: the segment stays, reads below the log start do not.
    let mut log = log;
    log.append(&batch_of(4, 0), 0, 0).unwrap();
    log.set_high_watermark(12);
    assert_eq!(log.delete_records_before(9).unwrap(), 9);
    assert!(matches!(
        log.read(8, 100, 12),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    let first = header(&log.read(9, 1, 12).unwrap().load().unwrap());
    assert_eq!(
        first.base_offset, 8,
        "the batch holding the log start is served whole"
    );
    drop(log);
    assert_eq!(open(tmp.path(), config(one, 4096)).log_start_offset(), 9);
}

#[test]
fn retention_by_time_never_deletes_active_or_unreplicated() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(1, 0).len() as u64;
    let mut log = open(
        tmp.path(),
        LogConfig {
            retention_ms: 1_000,
            ..config(one, 4096)
        },
    );
    for ts in [100, 200, 300, 5_000] {
        log.append(&batch_of(1, ts), 0, 0).unwrap();
    }
    log.set_high_watermark(1);
    let report = log.apply_retention(1_250).unwrap();
    assert_eq!(
        report.deleted_segments, 1,
        "segment 1 is expired but not below the high watermark"
    );
    log.set_high_watermark(4);
    let report = log.apply_retention(1_250).unwrap();
    assert_eq!((report.deleted_segments, report.deleted_bytes), (1, one));
    assert_eq!(log.log_start_offset(), 2);
    assert_eq!(segment_bases(tmp.path()), vec![2, 3]);
    let report = log.apply_retention(100_000).unwrap();
    assert_eq!(
        report.deleted_segments, 1,
        "the active segment stays however old"
    );
    assert_eq!((log.log_start_offset(), log.segment_count()), (3, 1));
    drop(log);
    assert_eq!(open(tmp.path(), config(one, 4096)).log_start_offset(), 3);
}

#[test]
fn retention_by_size() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(1, 0).len() as u64;
    let mut log = open(
        tmp.path(),
        LogConfig {
            retention_bytes: (2 * one + 1) as i64,
            ..config(one, 4096)
        },
    );
    for _ in 0..5 {
        log.append(&batch_of(1, 0), 0, 0).unwrap();
    }
    log.set_high_watermark(5);
    let report = log.apply_retention(0).unwrap();
    // 5 segments; deleting while (total - oldest) >= 2*one+1 leaves 3.
    assert_eq!(
        (report.deleted_segments, report.deleted_bytes),
        (2, 2 * one)
    );
    assert_eq!(
        (
            log.segment_count(),
            log.size_bytes(),
            log.log_start_offset()
        ),
        (3, 3 * one, 2)
    );
    assert_eq!(log.apply_retention(0).unwrap().deleted_segments, 0);
    log.set_config(LogConfig {
        retention_bytes: 0,
        ..log.config().clone()
    });
    assert_eq!(log.apply_retention(0).unwrap().deleted_segments, 2);
    assert_eq!(log.segment_count(), 1);
}

#[test]
fn offset_for_timestamp_finds_exact_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(300, 1));
    let timestamps = &UNORDERED_TIMESTAMPS[..5];
    for ts in timestamps {
        log.append(&batch_with_timestamps(ts[0], ts), 0, 0).unwrap();
    }
    assert!(log.segment_count() > 1);
    let flat: Vec<i64> = timestamps.concat();
    for target in 0..75 {
        // Kafka semantics: the first offset (in log order) whose timestamp reaches the target.
        let expected = flat
            .iter()
            .position(|ts| *ts >= target)
            .map(|i| TimestampOffset {
                offset: i as i64,
                timestamp: flat[i],
            });
        assert_eq!(
            log.offset_for_timestamp(target, NO_LIMIT).unwrap(),
            expected,
            "target {target}"
        );
    }
    log.set_high_watermark(log.log_end_offset());
    log.delete_records_before(4).unwrap();
    assert_eq!(log.offset_for_timestamp(0, NO_LIMIT).unwrap(), found(4, 40));
    assert_eq!(
        log.offset_for_timestamp(41, NO_LIMIT).unwrap(),
        found(7, 50)
    );
}

#[test]
fn offset_for_timestamp_is_exact_inside_compressed_batches() {
    let timestamps = &UNORDERED_TIMESTAMPS;
    let flat: Vec<i64> = timestamps.concat();
    for codec in CODECS {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = open(tmp.path(), config(400, 1));
        for (i, ts) in timestamps.iter().enumerate() {
            // Mixed with uncompressed batches, as a producer switching codecs would.
            let batch = if i % 3 == 1 {
                batch_with_timestamps(ts[0], ts)
            } else {
                compressed_batch_with_timestamps(codec, ts[0], ts, b"some value")
            };
            log.append(&batch, 0, 0).unwrap();
        }
        assert!(log.segment_count() > 1);
        let model = |from: usize, target: i64| {
            (from..flat.len())
                .find(|i| flat[*i] >= target)
                .map(|i| TimestampOffset {
                    offset: i as i64,
                    timestamp: flat[i],
                })
        };
        for target in 0..80 {
            assert_eq!(
                log.offset_for_timestamp(target, NO_LIMIT).unwrap(),
                model(0, target),
                "codec {codec}, target {target}"
            );
        }
        // From inside a compressed batch: records below the log start never answer.
        log.set_high_watermark(log.log_end_offset());
        log.delete_records_before(1).unwrap();
        for target in 0..80 {
            assert_eq!(
                log.offset_for_timestamp(target, NO_LIMIT).unwrap(),
                model(1, target),
                "codec {codec}, target {target}, log start 1"
            );
        }
    }
}

#[test]
fn raw_snappy_as_librdkafka_writes_it_is_walked_too() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    // librdkafka sends snappy without the Java framing: one raw block.
    let records = records_with_timestamps(5, &[5, 9, 7], b"value");
    let raw = snap::raw::Encoder::new().compress_vec(&records).unwrap();
    log.append(&raw_batch(SNAPPY, 5, 9, 3, &raw), 0, 0).unwrap();
    assert_eq!(log.offset_for_timestamp(6, NO_LIMIT).unwrap(), found(1, 9));
}

#[test]
fn a_batch_whose_header_promises_too_much_is_passed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    // The header says a record reaches 100; none does (Kafka moves on too).
    let records = records_with_timestamps(1, &[1, 2], b"v");
    log.append(&raw_batch(ZSTD, 1, 100, 2, &compress(ZSTD, &records)), 0, 0)
        .unwrap();
    log.append(
        &compressed_batch_with_timestamps(ZSTD, 50, &[50, 150], b"v"),
        0,
        0,
    )
    .unwrap();
    assert_eq!(
        log.offset_for_timestamp(100, NO_LIMIT).unwrap(),
        found(3, 150)
    );
}

#[test]
fn timestamp_lookup_decompresses_no_more_than_its_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    // 3 MB of records that zstd squeezes into a few hundred bytes.
    let big = vec![0u8; 1 << 20];
    let bomb = compressed_batch_with_timestamps(ZSTD, 10, &[10, 20, 30], &big);
    assert!(bomb.len() < 4096, "{} bytes", bomb.len());
    log.append(&bomb, 0, 0).unwrap();
    assert_eq!(
        log.offset_for_timestamp(25, NO_LIMIT).unwrap(),
        found(2, 30)
    );
    // Over the limit: answered from the header, as well as it can be.
    assert_eq!(log.offset_for_timestamp(25, 100_000).unwrap(), found(0, 30));
}

#[test]
fn a_located_batch_is_searched_without_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(
        &compressed_batch_with_timestamps(LZ4, 10, &[10, 30, 20], b"v"),
        0,
        0,
    )
    .unwrap();
    let storage::TimestampLookup::Search(batch) = log.lookup_timestamp(15, 0).unwrap() else {
        panic!("the answer is inside a compressed batch: its records must be walked")
    };
    // Appends go on meanwhile; the located batch is not disturbed by them.
    for i in 0..5 {
        log.append(&batch_of(2, 100 + i), 0, 0).unwrap();
    }
    drop(log);
    assert_eq!(batch.search(NO_LIMIT).unwrap(), found(1, 30));
    assert_eq!(batch.next_offset(), 3);
}

#[test]
fn offset_for_timestamp_answers_unwalkable_batches_from_their_header() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&compressed_batch(100, 200, 3), 0, 0).unwrap();
    log.append(&compressed_batch(300, 400, 2), 0, 0).unwrap();
    assert_eq!(
        log.offset_for_timestamp(50, NO_LIMIT).unwrap(),
        found(0, 100)
    );
    assert_eq!(
        log.offset_for_timestamp(150, NO_LIMIT).unwrap(),
        found(0, 200)
    );
    assert_eq!(
        log.offset_for_timestamp(201, NO_LIMIT).unwrap(),
        found(3, 300)
    );
    assert_eq!(log.offset_for_timestamp(401, NO_LIMIT).unwrap(), None);
    // Malformed records in an "uncompressed" batch are treated the same way.
    let bad = raw_batch_uncompressed_garbage();
    log.append(&bad, 0, 0).unwrap();
    assert_eq!(
        log.offset_for_timestamp(450, NO_LIMIT).unwrap(),
        found(5, 500)
    );
}

fn raw_batch_uncompressed_garbage() -> Vec<u8> {
    raw_batch(0, 500, 600, 2, &[0xff; 20])
}

#[test]
fn close_then_open_validates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(500, 64));
    for i in 0..20 {
        log.append(&batch_of(3, i), 0, 0).unwrap();
    }
    let expected = read_all(&log);
    log.close().unwrap();
    let (log, report) = PartitionLog::open(tmp.path(), config(500, 64), 0).unwrap();
    assert_eq!(report, Default::default());
    assert_eq!(log.recovery_point(), 60);
    assert_eq!(read_all(&log), expected);
}

#[test]
fn crash_validates_exactly_the_unflushed_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(400, 64));
    for i in 0..30 {
        log.append(&batch_of(2, i), 0, 0).unwrap();
    }
    log.flush().unwrap();
    assert_eq!(log.recovery_point(), 60);
    assert!(
        log.flush_handle().unwrap().files.is_empty(),
        "nothing left to sync"
    );
    let mut unflushed = 0;
    for i in 0..5 {
        let b = batch_of(2, i);
        unflushed += b.len() as u64;
        log.append(&b, 0, 0).unwrap();
    }
    assert!(!log.flush_handle().unwrap().files.is_empty());
    let expected = read_all(&log);
    drop(log); // a crash: no close
    let (log, report) = PartitionLog::open(tmp.path(), config(400, 64), 0).unwrap();
    assert_eq!(report.validated_bytes, unflushed);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(read_all(&log), expected);
    // Recovery fsync'd what it validated: the next open trusts it.
    drop(log);
    let (_, report) = PartitionLog::open(tmp.path(), config(400, 64), 0).unwrap();
    assert_eq!(report.validated_bytes, 0);
}

#[test]
fn flush_handle_and_mark_flushed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(2, 0), 0, 0).unwrap();
    let handle = log.flush_handle().unwrap();
    assert_eq!(handle.up_to_offset, 2);
    log.append(&batch_of(2, 0), 0, 0).unwrap();
    handle.sync().unwrap();
    log.mark_flushed(handle.up_to_offset);
    assert_eq!(log.recovery_point(), 2);
    log.mark_flushed(1);
    assert_eq!(log.recovery_point(), 2, "never moves down");
    log.mark_flushed(100);
    assert_eq!(log.recovery_point(), 4, "clamped to the log end");
}

#[test]
fn the_recovery_point_file_is_written_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(3, 0), 0, 0).unwrap();
    log.flush().unwrap();
    log.append(&batch_of(4, 0), 0, 0).unwrap();
    sync_and_mark_flushed(&mut log);
    assert_eq!(log.recovery_point(), 7);
    drop(log);
    // The file still says 3: the next open validates the 4 records after it.
    let (log, report) = PartitionLog::open(tmp.path(), config(1 << 20, 4096), 0).unwrap();
    assert!(report.validated_bytes > 0, "{report:?}");
    assert_eq!(log.log_end_offset(), 7);
    let mut log = log;
    log.append(&batch_of(1, 0), 0, 0).unwrap();
    sync_and_mark_flushed(&mut log);
    log.write_recovery_point().unwrap();
    drop(log);
    let (_, report) = PartitionLog::open(tmp.path(), config(1 << 20, 4096), 0).unwrap();
    assert_eq!(report.validated_bytes, 0, "{report:?}");
}

#[test]
fn stale_flush_handle_cannot_vouch_for_rewritten_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(10, 0), 0, 0).unwrap();
    log.flush().unwrap();
    log.append(&batch_of(10, 0), 0, 0).unwrap();
    let stale = log.flush_handle().unwrap();
    log.truncate_to(10).unwrap();
    log.append(&batch_of(15, 0), 1, 0).unwrap();
    stale.sync().unwrap();
    log.mark_flushed(stale.up_to_offset);
    assert_eq!(
        log.recovery_point(),
        10,
        "offsets 10..20 were rewritten after the handle was taken"
    );
    log.flush().unwrap();
    assert_eq!(log.recovery_point(), 25);
}

#[test]
fn missing_recovery_point_validates_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(300, 64));
    for _ in 0..10 {
        log.append(&batch_of(2, 0), 0, 0).unwrap();
    }
    let total = log.size_bytes();
    log.close().unwrap();
    std::fs::write(tmp.path().join("recovery-point"), b"garbage").unwrap();
    let (_, report) = PartitionLog::open(tmp.path(), config(300, 64), 0).unwrap();
    assert_eq!(report.validated_bytes, total);
    std::fs::remove_file(tmp.path().join("recovery-point")).unwrap();
    let (log, report) = PartitionLog::open(tmp.path(), config(300, 64), 0).unwrap();
    assert_eq!(report.validated_bytes, total);
    assert_eq!(log.log_end_offset(), 20);
}

#[test]
fn torn_tail_is_cut_and_later_segments_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let one = batch_of(1, 0).len() as u64;
    let mut log = open(tmp.path(), config(2 * one, 4096));
    for _ in 0..3 {
        log.append(&batch_of(1, 0), 0, 0).unwrap();
    }
    log.flush().unwrap();
    for _ in 0..3 {
        log.append(&batch_of(1, 0), 0, 0).unwrap();
    }
    assert_eq!(segment_bases(tmp.path()), vec![0, 2, 4]);
    drop(log);
    // Corrupt the batch at offset 3 (second in segment 2): it and segment 4 go.
    let path = log_path(tmp.path(), 2);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = one as usize + 40;
    bytes[at] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let (mut log, report) = PartitionLog::open(tmp.path(), config(2 * one, 4096), 0).unwrap();
    assert_eq!(report.truncated_bytes, 3 * one);
    assert_eq!(log.log_end_offset(), 3);
    assert_eq!(segment_bases(tmp.path()), vec![0, 2]);
    let info = log.append(&batch_of(1, 0), 0, 0).unwrap();
    assert_eq!(info.base_offset, 3);

    // Half a batch at the end of the active segment.
    drop(log);
    let path = log_path(tmp.path(), 2);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (log, report) = PartitionLog::open(tmp.path(), config(2 * one, 4096), 0).unwrap();
    assert_eq!(report.truncated_bytes, one - 5);
    assert_eq!(log.log_end_offset(), 3);
}

#[test]
fn damaged_indexes_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(2_000, 100);
    let mut log = open(tmp.path(), cfg.clone());
    for i in 0..60 {
        log.append(&batch_of(2, i), 0, 0).unwrap();
    }
    let expected = read_all(&log);
    let segments = segment_bases(tmp.path());
    assert!(segments.len() >= 3);
    log.close().unwrap();
    let index = |base: i64, ext: &str| tmp.path().join(format!("{base:020}.{ext}"));
    std::fs::remove_file(index(segments[0], "index")).unwrap();
    std::fs::write(index(segments[1], "timeindex"), [1, 2, 3]).unwrap();
    let (log, report) = PartitionLog::open(tmp.path(), cfg.clone(), 0).unwrap();
    assert_eq!(report.rebuilt_indexes, 2);
    assert_eq!(
        report.validated_bytes, 0,
        "a rebuild reads headers, it does not validate"
    );
    assert_eq!(read_all(&log), expected);
    for target in [0, 10, 33, 59] {
        assert_eq!(
            log.offset_for_timestamp(target, NO_LIMIT)
                .unwrap()
                .map(|t| t.offset),
            Some(target * 2)
        );
    }
    drop(log);
    let (_, report) = PartitionLog::open(tmp.path(), cfg, 0).unwrap();
    assert_eq!(report.rebuilt_indexes, 0, "rebuilt files were written back");
}

#[test]
fn open_removes_debris() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(1, 0), 0, 0).unwrap();
    log.close().unwrap();
    let debris = [
        "recovery-point.tmp",
        "00000000000000000000.log.deleted",
        "00000000000000000099.index",
        "00000000000000000099.timeindex",
    ];
    for name in debris {
        std::fs::write(tmp.path().join(name), b"junk").unwrap();
    }
    std::fs::write(tmp.path().join("notes.txt"), b"not ours").unwrap();
    let log = open(tmp.path(), config(1 << 20, 4096));
    for name in debris {
        assert!(!tmp.path().join(name).exists(), "{name}");
    }
    assert!(
        tmp.path().join("notes.txt").exists(),
        "unknown files are left alone"
    );
    assert_eq!(log.log_end_offset(), 1);
}

#[test]
fn log_start_beyond_recovered_end_restarts_there() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), config(1 << 20, 4096));
    log.append(&batch_of(5, 0), 0, 0).unwrap();
    log.flush().unwrap();
    log.append(&batch_of(5, 0), 0, 0).unwrap();
    log.set_high_watermark(10);
    log.delete_records_before(8).unwrap();
    drop(log);
    // Lose the unflushed batch 5..=9 as a power cut would.
    let path = log_path(tmp.path(), 0);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let (mut log, _) = PartitionLog::open(tmp.path(), config(1 << 20, 4096), 0).unwrap();
    assert_eq!(
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.high_watermark()
        ),
        (8, 8, 8)
    );
    assert_eq!(log.append(&batch_of(1, 0), 0, 0).unwrap().base_offset, 8);
}

#[test]
fn delete_removes_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let mut log = open(&dir, config(1 << 20, 4096));
    log.append(&batch_of(1, 0), 0, 0).unwrap();
    log.delete().unwrap();
    assert!(!dir.exists());
}

#[test]
fn a_failed_fsync_cuts_back_to_the_recovery_point_and_takes_the_log_offline() {
    let tmp = tempfile::tempdir().unwrap();
    // Small segments, so that the cut spans a roll.
    let mut log = open(tmp.path(), config(400, 64));
    log.append(&batch_of(3, 0), 0, 0).unwrap();
    log.flush().unwrap();
    let handle = log.flush_handle().unwrap();
    for _ in 0..6 {
        log.append(&batch_of(4, 0), 0, 0).unwrap();
    }
    assert!(log.segment_count() > 1);
    log.set_high_watermark(log.log_end_offset());
    // The handle's fsync "failed": what it covered cannot be trusted.
    log.fail("injected");
    assert_eq!(log.offline_reason(), Some("injected"));
    assert_eq!(log.log_end_offset(), 3, "cut back to the last good fsync");
    assert_eq!(log.high_watermark(), 3);
    assert!(
        tmp.path().join("truncate-to").exists(),
        "the cut is not fsync'd: its marker stays so that the next open cuts there again"
    );
    assert!(matches!(
        log.append(&batch_of(1, 0), 0, 0),
        Err(StorageError::Offline { .. })
    ));
    assert!(matches!(
        log.read(0, 1 << 20, 3),
        Err(StorageError::Offline { .. })
    ));
    assert!(matches!(
        log.flush_handle(),
        Err(StorageError::Offline { .. })
    ));
    assert!(log.flush().is_err());
    // A later sync of the old handle succeeds, as Linux reports it; it vouches for nothing.
    handle.sync().unwrap();
    log.mark_flushed(handle.up_to_offset);
    assert_eq!(log.recovery_point(), 3);
    drop(log);

    let (mut log, _) = PartitionLog::open(tmp.path(), config(400, 64), 0).unwrap();
    assert_eq!(log.offline_reason(), None, "reopening brings it back");
    assert!(!tmp.path().join("truncate-to").exists());
    assert_eq!(log.log_end_offset(), 3);
    assert_eq!(
        log.read(0, 1 << 20, 3).unwrap().load().unwrap().len(),
        batch_of(3, 0).len()
    );
    log.append(&batch_of(2, 0), 0, 0).unwrap();
    log.flush().unwrap();
    assert_eq!(log.recovery_point(), 5);
}
