//! Batch validation and iteration over arbitrary bytes (produce payloads and
//! segment contents read back during recovery), and the transaction marker a
//! control batch carries (read while a partition's log is replayed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::record_batch::{batches, control_type, get_varint, peek_total_bytes, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = validate(data) {
        assert_eq!(header.total_bytes(), data.len());
    }
    let mut consumed = 0usize;
    for item in batches(data) {
        match item {
            Ok((header, bytes)) => {
                assert_eq!(header.total_bytes(), bytes.len());
                consumed += bytes.len();
                let _ = control_type(bytes);
            }
            Err(_) => break,
        }
    }
    assert!(consumed <= data.len());
    let _ = peek_total_bytes(data);
    if let Some((_, used)) = get_varint(data) {
        assert!((1..=10).contains(&used) && used <= data.len());
    }
});
