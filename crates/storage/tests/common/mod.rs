//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::Path;

use protocol::record_batch::{
    batches, build_simple_batch, compute_crc, put_varint, validate, BatchHeader,
    BATCH_HEADER_BYTES, LOG_OVERHEAD,
};
use storage::{LogConfig, PartitionLog};

/// No time-based roll or retention unless a test asks for it.
pub fn config(segment_bytes: u64, index_interval_bytes: u32) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: i64::MAX,
        retention_ms: -1,
        retention_bytes: -1,
        index_interval_bytes,
    }
}

pub fn batch(timestamp_ms: i64, values: &[&[u8]]) -> Vec<u8> {
    build_simple_batch(timestamp_ms, values)
}

/// A batch of `count` one-byte records, all at `timestamp_ms`.
pub fn batch_of(count: usize, timestamp_ms: i64) -> Vec<u8> {
    let values: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8]).collect();
    let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
    build_simple_batch(timestamp_ms, &refs)
}

/// A v2 batch with a valid CRC around `records` (already encoded).
pub fn raw_batch(
    attributes: i16,
    base_timestamp: i64,
    max_timestamp: i64,
    count: i32,
    records: &[u8],
) -> Vec<u8> {
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes());
    batch.extend_from_slice(
        &((BATCH_HEADER_BYTES - LOG_OVERHEAD + records.len()) as i32).to_be_bytes(),
    );
    batch.extend_from_slice(&0i32.to_be_bytes());
    batch.push(2);
    batch.extend_from_slice(&0u32.to_be_bytes());
    batch.extend_from_slice(&attributes.to_be_bytes());
    batch.extend_from_slice(&(count - 1).to_be_bytes());
    batch.extend_from_slice(&base_timestamp.to_be_bytes());
    batch.extend_from_slice(&max_timestamp.to_be_bytes());
    batch.extend_from_slice(&(-1i64).to_be_bytes());
    batch.extend_from_slice(&(-1i16).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes());
    batch.extend_from_slice(&count.to_be_bytes());
    batch.extend_from_slice(records);
    let crc = compute_crc(&batch);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    validate(&batch).expect("test batch is valid");
    batch
}

/// Kafka's codec ids.
pub const GZIP: i16 = 1;
pub const SNAPPY: i16 = 2;
pub const LZ4: i16 = 3;
pub const ZSTD: i16 = 4;
pub const CODECS: [i16; 4] = [GZIP, SNAPPY, LZ4, ZSTD];

/// No limit on the bytes a timestamp lookup decompresses.
pub const NO_LIMIT: u64 = u64::MAX;

/// `data` compressed as Kafka clients compress a batch's records (snappy in the
/// Java client's xerial framing, in 32 KiB blocks).
pub fn compress(codec: i16, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match codec {
        GZIP => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        SNAPPY => {
            let mut out = b"\x82SNAPPY\x00".to_vec();
            out.extend_from_slice(&1i32.to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            for block in data.chunks(32 * 1024) {
                let compressed = snap::raw::Encoder::new().compress_vec(block).unwrap();
                out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
                out.extend_from_slice(&compressed);
            }
            out
        }
        LZ4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        ZSTD => zstd::stream::encode_all(data, 3).unwrap(),
        other => panic!("no codec {other}"),
    }
}

/// Encoded records with the given timestamps, offset deltas 0, 1, ...
pub fn records_with_timestamps(base_timestamp: i64, timestamps: &[i64], value: &[u8]) -> Vec<u8> {
    let mut records = Vec::new();
    for (i, ts) in timestamps.iter().enumerate() {
        let mut body = vec![0u8];
        put_varint(&mut body, ts - base_timestamp);
        put_varint(&mut body, i as i64);
        put_varint(&mut body, -1);
        put_varint(&mut body, value.len() as i64);
        body.extend_from_slice(value);
        put_varint(&mut body, 0);
        put_varint(&mut records, body.len() as i64);
        records.extend_from_slice(&body);
    }
    records
}

/// A batch compressed with `codec` whose records have the given timestamps.
pub fn compressed_batch_with_timestamps(
    codec: i16,
    base_timestamp: i64,
    timestamps: &[i64],
    value: &[u8],
) -> Vec<u8> {
    let records = records_with_timestamps(base_timestamp, timestamps, value);
    let max = *timestamps.iter().max().expect("at least one record");
    raw_batch(
        codec,
        base_timestamp,
        max,
        timestamps.len() as i32,
        &compress(codec, &records),
    )
}

/// An uncompressed batch whose records have the given timestamps (any order).
pub fn batch_with_timestamps(base_timestamp: i64, timestamps: &[i64]) -> Vec<u8> {
    let records = records_with_timestamps(base_timestamp, timestamps, b"v");
    let max = *timestamps.iter().max().expect("at least one record");
    raw_batch(0, base_timestamp, max, timestamps.len() as i32, &records)
}

/// A "gzip" batch whose payload is not really gzip: its records cannot be walked.
pub fn compressed_batch(base_timestamp: i64, max_timestamp: i64, count: i32) -> Vec<u8> {
    raw_batch(
        1,
        base_timestamp,
        max_timestamp,
        count,
        b"\x1f\x8b not really gzip",
    )
}

/// Every whole batch from the log start to the log end, as stored.
pub fn read_all(log: &PartitionLog) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let bytes = log
            .read(offset, 1 << 20, log.log_end_offset())
            .unwrap()
            .load()
            .unwrap();
        assert!(
            !bytes.is_empty(),
            "read at {offset} below log end {}",
            log.log_end_offset()
        );
        for item in batches(&bytes) {
            let Ok((header, raw)) = item else { break };
            validate(raw).unwrap();
            out.push(raw.to_vec());
            offset = header.last_offset() + 1;
        }
    }
    out
}

pub fn header(batch: &[u8]) -> BatchHeader {
    BatchHeader::parse(batch).unwrap()
}

/// Base offsets of the segment files in `dir`, sorted.
pub fn segment_bases(dir: &Path) -> Vec<i64> {
    let mut bases: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".log").map(|stem| stem.parse().unwrap())
        })
        .collect();
    bases.sort();
    bases
}

pub fn log_path(dir: &Path, base: i64) -> std::path::PathBuf {
    dir.join(format!("{base:020}.log"))
}
