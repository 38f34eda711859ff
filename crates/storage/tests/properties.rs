//! Property tests: random batches, tiny segments and index intervals (many rolls
//! and index entries), random crash damage, random operation sequences against a
//! model. Case counts are kept small so the whole crate tests in seconds.

mod common;

use std::path::Path;

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use protocol::record_batch::{
    batches, build_simple_batch, set_base_offset, set_partition_leader_epoch, BatchHeader,
};
use storage::{LogConfig, PartitionLog, TimestampOffset};

#[derive(Debug, Clone)]
struct BatchSpec {
    timestamp_ms: i64,
    values: Vec<Vec<u8>>,
    leader_epoch: i32,
}

impl BatchSpec {
    fn build(&self) -> Vec<u8> {
        let refs: Vec<&[u8]> = self.values.iter().map(|v| v.as_slice()).collect();
        build_simple_batch(self.timestamp_ms, &refs)
    }
}

fn batch_spec() -> impl Strategy<Value = BatchSpec> {
    (
        0i64..1_000,
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..5),
        0i32..3,
    )
        .prop_map(|(timestamp_ms, values, leader_epoch)| BatchSpec {
            timestamp_ms,
            values,
            leader_epoch,
        })
}

/// Appends every batch, returning them as stored (offset and epoch rewritten).
fn append_all(log: &mut PartitionLog, specs: &[BatchSpec]) -> Vec<Vec<u8>> {
    specs
        .iter()
        .map(|spec| {
            let batch = spec.build();
            let expected_base = log.log_end_offset();
            let info = log.append(&batch, spec.leader_epoch, 0).unwrap();
            assert_eq!(info.base_offset, expected_base);
            assert_eq!(
                info.last_offset,
                expected_base + spec.values.len() as i64 - 1
            );
            // As stored: base offset and leader epoch rewritten.
            let mut batch = batch;
            set_base_offset(&mut batch, info.base_offset);
            set_partition_leader_epoch(&mut batch, spec.leader_epoch);
            batch
        })
        .collect()
}

/// Index of the stored batch holding `offset`.
fn holding(stored: &[Vec<u8>], offset: i64) -> usize {
    stored
        .iter()
        .position(|b| {
            let h = header(b);
            h.base_offset <= offset && offset <= h.last_offset()
        })
        .unwrap()
}

/// Splits a read into its whole batches and the partial batch after them.
fn split(bytes: &[u8]) -> (Vec<(BatchHeader, Vec<u8>)>, Vec<u8>) {
    let mut whole = Vec::new();
    let mut used = 0;
    for item in batches(bytes) {
        let Ok((h, raw)) = item else { break };
        used += raw.len();
        whole.push((h, raw.to_vec()));
    }
    (whole, bytes[used..].to_vec())
}

/// Checks a read from every offset against what was appended.
fn check_reads(log: &PartitionLog, dir: &Path, stored: &[Vec<u8>], max_bytes: usize, pick: Index) {
    let bases = segment_bases(dir);
    let log_end = log.log_end_offset();
    for offset in log.log_start_offset()..log_end {
        let i = holding(stored, offset);
        let first_bytes = stored[i].len();
        let slice = log.read(offset, max_bytes, log_end).unwrap();
        let bytes = slice.load().unwrap();
        assert_eq!(bytes.len(), slice.len);
        assert!(bytes.len() >= first_bytes && bytes.len() <= max_bytes.max(first_bytes));
        let (whole, partial) = split(&bytes);
        assert!(!whole.is_empty());
        for (k, (_, raw)) in whole.iter().enumerate() {
            assert_eq!(raw, &stored[i + k], "read at {offset}, batch {k}");
        }
        let next = i + whole.len();
        if !partial.is_empty() {
            assert_eq!(
                bytes.len(),
                max_bytes,
                "a partial batch only when max_bytes cut it"
            );
            assert_eq!(partial.as_slice(), &stored[next][..partial.len()]);
        } else if bytes.len() < max_bytes && next < stored.len() {
            assert!(
                bases.contains(&header(&stored[next]).base_offset),
                "stopped early but not at a segment end"
            );
        }

        // A bound below the log end: no batch at or past it, nor the one holding it.
        let max_offset = offset + pick.index((log_end - offset + 1) as usize) as i64;
        let slice = log.read(offset, 1 << 20, max_offset).unwrap();
        let (whole, partial) = split(&slice.load().unwrap());
        assert!(partial.is_empty());
        assert!(whole.iter().all(|(h, _)| h.last_offset() < max_offset));
        if whole.is_empty() {
            assert!(max_offset == offset || header(&stored[i]).last_offset() >= max_offset);
        } else {
            let next = i + whole.len();
            if next < stored.len() {
                let h = header(&stored[next]);
                assert!(h.last_offset() >= max_offset || bases.contains(&h.base_offset));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn append_then_read_from_every_offset(
        specs in prop::collection::vec(batch_spec(), 1..40),
        segment_bytes in 80u64..600,
        index_interval_bytes in 0u32..300,
        max_bytes in 0usize..700,
        pick in any::<Index>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(segment_bytes, index_interval_bytes);
        let (mut log, _) = PartitionLog::open(tmp.path(), cfg.clone(), 0).unwrap();
        let stored = append_all(&mut log, &specs);
        prop_assert_eq!(log.size_bytes(), stored.iter().map(|b| b.len() as u64).sum::<u64>());
        prop_assert_eq!(log.segment_count(), segment_bases(tmp.path()).len());
        check_reads(&log, tmp.path(), &stored, max_bytes, pick);
        log.close().unwrap();

        let (log, report) = PartitionLog::open(tmp.path(), cfg, 0).unwrap();
        prop_assert_eq!(report, Default::default());
        prop_assert_eq!(read_all(&log), stored.clone());
        check_reads(&log, tmp.path(), &stored, max_bytes, pick);
    }
}

#[derive(Debug, Clone)]
enum Damage {
    /// Cut the last segment somewhere after its flushed part.
    TruncateLog(Index),
    AppendGarbage(Vec<u8>),
    /// Flip one bit after the flushed part of the last segment.
    FlipBit(Index, u8),
    DeleteIndex(Index, bool),
    TruncateIndex(Index, bool, Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<Index>().prop_map(Damage::TruncateLog),
        prop::collection::vec(any::<u8>(), 1..100).prop_map(Damage::AppendGarbage),
        (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Damage::FlipBit(i, bit)),
        (any::<Index>(), any::<bool>()).prop_map(|(i, time)| Damage::DeleteIndex(i, time)),
        (any::<Index>(), any::<bool>(), any::<Index>())
            .prop_map(|(i, time, len)| Damage::TruncateIndex(i, time, len)),
    ]
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn crash_recovery_keeps_a_valid_prefix_with_everything_flushed(
        specs in prop::collection::vec(batch_spec(), 1..30),
        segment_bytes in 100u64..500,
        index_interval_bytes in 0u32..200,
        flush_pick in any::<Index>(),
        damages in prop::collection::vec(damage(), 1..4),
        read_pick in any::<Index>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cfg = config(segment_bytes, index_interval_bytes);
        let (mut log, _) = PartitionLog::open(dir, cfg.clone(), 0).unwrap();
        let flushed = flush_pick.index(specs.len() + 1);
        let mut stored = append_all(&mut log, &specs[..flushed]);
        log.flush().unwrap();
        stored.extend(append_all(&mut log, &specs[flushed..]));
        drop(log); // crash: the unflushed tail is in the page cache, then damaged below

        let bases = segment_bases(dir);
        let last_base = *bases.last().unwrap();
        let last_path = log_path(dir, last_base);
        // Batches of the last segment with their positions; the flushed ones are off limits.
        let mut in_last = Vec::new();
        let mut position = 0usize;
        let mut protected = 0usize;
        for (i, batch) in stored.iter().enumerate() {
            if header(batch).base_offset >= last_base {
                in_last.push(position);
                position += batch.len();
                if i < flushed {
                    protected = position;
                }
            }
        }
        for d in &damages {
            let len = std::fs::metadata(&last_path).unwrap().len() as usize;
            match d {
                Damage::TruncateLog(at) => {
                    if len > protected {
                        set_len(&last_path, (protected + at.index(len - protected + 1)) as u64);
                    }
                }
                Damage::AppendGarbage(bytes) => {
                    let mut content = std::fs::read(&last_path).unwrap();
                    content.extend_from_slice(bytes);
                    std::fs::write(&last_path, content).unwrap();
                }
                Damage::FlipBit(at, bit) => {
                    if len > protected {
                        let at = protected + at.index(len - protected);
                        // The leader epoch is not covered by the CRC (Kafka's format).
                        let in_epoch = in_last.iter().any(|start| (start + 12..start + 16).contains(&at));
                        if !in_epoch {
                            let mut content = std::fs::read(&last_path).unwrap();
                            content[at] ^= 1 << bit;
                            std::fs::write(&last_path, content).unwrap();
                        }
                    }
                }
                Damage::DeleteIndex(which, time) => {
                    let base = bases[which.index(bases.len())];
                    let ext = if *time { "timeindex" } else { "index" };
                    let _ = std::fs::remove_file(dir.join(format!("{base:020}.{ext}")));
                }
                Damage::TruncateIndex(which, time, at) => {
                    let base = bases[which.index(bases.len())];
                    let ext = if *time { "timeindex" } else { "index" };
                    let path = dir.join(format!("{base:020}.{ext}"));
                    if let Ok(meta) = std::fs::metadata(&path) {
                        set_len(&path, at.index(meta.len() as usize + 1) as u64);
                    }
                }
            }
        }

        let (mut log, report) = PartitionLog::open(dir, cfg.clone(), 0).unwrap();
        let recovered = read_all(&log);
        prop_assert!(recovered.len() >= flushed, "lost flushed batches: {} < {flushed}", recovered.len());
        prop_assert_eq!(&recovered[..], &stored[..recovered.len()]);
        let log_end = recovered.last().map_or(0, |b| header(b).last_offset() + 1);
        prop_assert_eq!(log.log_end_offset(), log_end);
        prop_assert_eq!(log.high_watermark(), log_end);
        prop_assert!(report.validated_bytes <= stored[flushed..].iter().map(|b| b.len() as u64).sum::<u64>());
        check_reads(&log, dir, &recovered, 150, read_pick);

        let mut more = stored[0].clone();
        let info = log.append(&more, 9, 0).unwrap();
        prop_assert_eq!(info.base_offset, log_end);
        set_base_offset(&mut more, info.base_offset);
        set_partition_leader_epoch(&mut more, 9);
        log.close().unwrap();
        let (log, report) = PartitionLog::open(dir, cfg, 0).unwrap();
        prop_assert_eq!(report, Default::default());
        let mut expected = recovered;
        expected.push(more);
        prop_assert_eq!(read_all(&log), expected);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(BatchSpec),
    TruncateTo(Index),
    SetHighWatermark(Index),
    DeleteRecordsBefore(Index),
    RetainBytes(u16),
    Flush,
    Reopen { clean: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => batch_spec().prop_map(Op::Append),
        1 => any::<Index>().prop_map(Op::TruncateTo),
        2 => any::<Index>().prop_map(Op::SetHighWatermark),
        1 => any::<Index>().prop_map(Op::DeleteRecordsBefore),
        1 => (0u16..1_500).prop_map(Op::RetainBytes),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

/// The log as a list of stored batches and two offsets.
struct Model {
    batches: Vec<Vec<u8>>,
    log_start: i64,
    high_watermark: i64,
    log_end: i64,
}

impl Model {
    fn log_end(&self) -> i64 {
        self.log_end
    }
    fn visible(&self) -> Vec<Vec<u8>> {
        self.batches
            .iter()
            .filter(|b| header(b).last_offset() >= self.log_start)
            .cloned()
            .collect()
    }
    fn offset_for_timestamp(&self, target: i64) -> Option<TimestampOffset> {
        self.batches.iter().find_map(|b| {
            let h = header(b);
            (h.last_offset() >= self.log_start && h.max_timestamp >= target).then(|| {
                TimestampOffset {
                    offset: h.base_offset.max(self.log_start),
                    timestamp: h.max_timestamp,
                }
            })
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn operations_match_a_model(
        ops in prop::collection::vec(op(), 1..40),
        segment_bytes in 100u64..400,
        index_interval_bytes in 0u32..200,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cfg = config(segment_bytes, index_interval_bytes);
        let (mut log, _) = PartitionLog::open(dir, cfg.clone(), 0).unwrap();
        let mut model = Model { batches: Vec::new(), log_start: 0, high_watermark: 0, log_end: 0 };
        for op in ops {
            match op {
                Op::Append(spec) => {
                    model.batches.extend(append_all(&mut log, &[spec]));
                    model.log_end = log.log_end_offset();
                }
                Op::TruncateTo(pick) => {
                    let range = model.log_end() - model.log_start + 1;
                    let offset = model.log_start + pick.index(range as usize) as i64;
                    log.truncate_to(offset).unwrap();
                    // The batch holding `offset` goes whole: the end is its base.
                    if let Some(cut) = model.batches.iter().position(|b| header(b).last_offset() >= offset) {
                        model.log_end = header(&model.batches[cut]).base_offset;
                        model.batches.truncate(cut);
                    }
                    let end = model.log_end();
                    model.high_watermark = model.high_watermark.min(end);
                    model.log_start = model.log_start.min(end);
                }
                Op::SetHighWatermark(pick) => {
                    let range = model.log_end() - model.log_start + 1;
                    model.high_watermark = model.log_start + pick.index(range as usize) as i64;
                    log.set_high_watermark(model.high_watermark);
                }
                Op::DeleteRecordsBefore(pick) => {
                    let offset = pick.index(model.log_end() as usize + 5) as i64;
                    model.log_start = model.log_start.max(offset.min(model.high_watermark));
                    prop_assert_eq!(log.delete_records_before(offset).unwrap(), model.log_start);
                }
                Op::RetainBytes(retention_bytes) => {
                    log.set_config(LogConfig { retention_bytes: i64::from(retention_bytes), ..cfg.clone() });
                    let before = log.log_start_offset();
                    log.apply_retention(0).unwrap();
                    log.set_config(cfg.clone());
                    prop_assert!(log.log_start_offset() >= before);
                    prop_assert!(log.log_start_offset() <= model.high_watermark);
                    model.log_start = log.log_start_offset();
                }
                Op::Flush => {
                    log.flush().unwrap();
                    prop_assert_eq!(log.recovery_point(), model.log_end());
                }
                Op::Reopen { clean } => {
                    if clean {
                        log.close().unwrap();
                    } else {
                        drop(log);
                    }
                    let (reopened, report) = PartitionLog::open(dir, cfg.clone(), 0).unwrap();
                    log = reopened;
                    prop_assert_eq!(report.truncated_bytes, 0);
                    prop_assert_eq!(report.rebuilt_indexes, 0, "index files must match the log");
                    if clean {
                        prop_assert_eq!(report.validated_bytes, 0);
                    }
                    model.high_watermark = model.log_end();
                }
            }
            prop_assert_eq!(log.log_end_offset(), model.log_end());
            prop_assert_eq!(log.log_start_offset(), model.log_start);
            prop_assert_eq!(log.high_watermark(), model.high_watermark);
            prop_assert!(log.recovery_point() <= log.log_end_offset());
            prop_assert_eq!(read_all(&log), model.visible());
            // Every stored timestamp and its neighbours, where off-by-ones hide.
            let mut targets = vec![0, 1_000];
            for b in &model.batches {
                let ts = header(b).max_timestamp;
                targets.extend([ts - 1, ts, ts + 1]);
            }
            for target in targets {
                prop_assert_eq!(log.offset_for_timestamp(target, NO_LIMIT).unwrap(), model.offset_for_timestamp(target), "target {}", target);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random per-record timestamps, a random codec per batch (none, gzip, snappy,
    /// lz4, zstd), tiny segments and a random log start: every by-timestamp lookup
    /// is the first record, in log order, that reaches the target, as in Kafka.
    #[test]
    fn timestamp_lookups_are_exact_for_every_codec(
        specs in prop::collection::vec((0usize..5, prop::collection::vec(0i64..200, 1..6)), 1..12),
        start in any::<Index>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = PartitionLog::open(tmp.path(), config(400, 1), 0).unwrap().0;
        for (codec, timestamps) in &specs {
            let batch = match codec {
                0 => batch_with_timestamps(timestamps[0], timestamps),
                c => compressed_batch_with_timestamps(CODECS[c - 1], timestamps[0], timestamps, b"value"),
            };
            log.append(&batch, 0, 0).unwrap();
        }
        let flat: Vec<i64> = specs.iter().flat_map(|(_, ts)| ts.iter().copied()).collect();
        let log_start = start.index(flat.len());
        log.set_high_watermark(log.log_end_offset());
        log.delete_records_before(log_start as i64).unwrap();
        for target in 0..=200 {
            let expected = (log_start..flat.len())
                .find(|i| flat[*i] >= target)
                .map(|i| TimestampOffset { offset: i as i64, timestamp: flat[i] });
            prop_assert_eq!(log.offset_for_timestamp(target, NO_LIMIT).unwrap(), expected, "target {}", target);
        }
    }
}
