//! Length-prefixed framing: every Kafka request and response is a big-endian `i32`
//! size followed by that many bytes.

use bytes::{Buf, BytesMut};

/// Bytes of the size prefix in front of every frame.
pub const SIZE_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("negative frame size {0}")]
    NegativeSize(i32),
}

/// The size of the frame at the front of `buf` (without its prefix), once its prefix
/// is there: `Ok(None)` means fewer than [`SIZE_PREFIX_BYTES`] bytes are buffered. A
/// size above `max_frame_bytes` is an error, so the caller refuses it before buffering
/// any of its body.
pub fn peek_frame_size(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..SIZE_PREFIX_BYTES) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if size < 0 {
        return Err(FrameError::NegativeSize(size));
    }
    let size = size as usize;
    if size > max_frame_bytes {
        return Err(FrameError::TooLarge {
            size,
            max: max_frame_bytes,
        });
    }
    Ok(Some(size))
}

/// Takes one whole frame (without its size prefix) off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame: that is not an error,
/// the caller reads more bytes. A size above `max_frame_bytes` is rejected before any
/// of the body is buffered. Nothing is reserved in `buf` from the size prefix: a
/// frame's buffer grows only as its bytes arrive (the caller decides how much it reads
/// at a time), so peers announcing large frames and sending nothing cost nothing.
pub fn decode_frame(
    buf: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<BytesMut>, FrameError> {
    let Some(size) = peek_frame_size(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    if buf.len() < SIZE_PREFIX_BYTES + size {
        return Ok(None);
    }
    buf.advance(SIZE_PREFIX_BYTES);
    Ok(Some(buf.split_to(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 1, 2][..]);
        assert_eq!(decode_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(&[3, 0, 0]);
        let frame = decode_frame(&mut buf, 100).unwrap().unwrap();
        assert_eq!(&frame[..], &[1, 2, 3]);
        assert_eq!(&buf[..], &[0, 0]);
        assert_eq!(decode_frame(&mut buf, 100), Ok(None));
    }

    #[test]
    fn a_size_prefix_alone_reserves_nothing() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&(100i32 << 20).to_be_bytes());
        let capacity = buf.capacity();
        assert_eq!(decode_frame(&mut buf, 200 << 20), Ok(None));
        assert_eq!(
            buf.capacity(),
            capacity,
            "the buffer grew from the prefix alone"
        );
        assert_eq!(peek_frame_size(&buf, 200 << 20), Ok(Some(100 << 20)));
        assert_eq!(peek_frame_size(&buf[..3], 200 << 20), Ok(None));
    }

    #[test]
    fn oversized_and_negative_frames_are_rejected() {
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert_eq!(
            decode_frame(&mut buf, 255),
            Err(FrameError::TooLarge {
                size: 256,
                max: 255
            })
        );
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xfe][..]);
        assert_eq!(
            decode_frame(&mut buf, 255),
            Err(FrameError::NegativeSize(-2))
        );
    }
}
