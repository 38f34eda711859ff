//! Every byte string a client can send, through framing and request decoding.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::codec::{decode_request, peek_preamble};
use protocol::frame::decode_frame;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 20) {
        let _ = peek_preamble(&frame);
        let _ = decode_request(frame.freeze());
    }
    // The same bytes as one unframed request body.
    let _ = decode_request(bytes::Bytes::copy_from_slice(data));
});
