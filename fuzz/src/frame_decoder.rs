//! Target `frame_decoder`: `read_frame` over a stream of arbitrary bytes, frame after frame, the
//! way a connection reads them.
//!
//! Input: `[read_bytes_max u8][stream ...]`. The reader hands out at most `read_bytes_max` bytes
//! per read (0: everything at once), so partial reads of header and body are exercised.
//!
//! Invariants beyond "no panic":
//! - a frame consumes exactly `frame_bytes` of the stream and its buffer is those bytes;
//! - its header re-encodes to the same 32 bytes, `FrameHeader::decode` agrees with `read_frame`,
//!   the body CRC matches, and body and payload are 16-aligned and where the header says;
//! - errors: a header CRC mismatch trusts no header; only a body CRC mismatch keeps the framing
//!   (the next frame is then read from just after it); `Ok(None)` only at the end of the stream;
//! - the body decodes as the type its api key names or fails cleanly, and a decoded body
//!   round-trips (see [`crate::request_bodies`]); a produce request's or fetch response's
//!   payload splits with `payload_ranges` and each share is checked batch by batch as the server
//!   and the client do.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::future::block_on;
use futures_lite::AsyncRead;

use crate::protocol::*;
use crate::request_bodies;

/// The limit a connection would configure; small so that fuzzed lengths hit it.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Frames read from one input at most.
const FRAMES_MAX: usize = 64;

/// An `AsyncRead` over a slice that returns at most `read_bytes_max` bytes per read.
struct ChunkedReader<'a> {
    bytes: &'a [u8],
    at: usize,
    read_bytes_max: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf
            .len()
            .min(self.bytes.len() - self.at)
            .min(self.read_bytes_max);
        let at = self.at;
        buf[..n].copy_from_slice(&self.bytes[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(n))
    }
}

pub fn run(data: &[u8]) {
    let Some((&read_bytes_max, stream)) = data.split_first() else {
        return;
    };
    let read_bytes_max = if read_bytes_max == 0 {
        usize::MAX
    } else {
        usize::from(read_bytes_max)
    };
    let mut reader = ChunkedReader {
        bytes: stream,
        at: 0,
        read_bytes_max,
    };
    for _ in 0..FRAMES_MAX {
        let start = reader.at;
        let result = block_on(read_frame(&mut reader, FRAME_BYTES_MAX));
        let consumed = &stream[start..reader.at];
        match result {
            Ok(None) => {
                assert_eq!(start, stream.len(), "end of stream reported mid-stream");
                return;
            }
            Ok(Some(frame)) => check_frame(&frame, consumed),
            Err((header, error)) => {
                check_error(header, &error, consumed, stream.len() - start);
                if !error.keeps_framing() {
                    return;
                }
            }
        }
    }
}

fn header_bytes(consumed: &[u8]) -> &[u8; FRAME_HEADER_BYTES] {
    consumed[..FRAME_HEADER_BYTES]
        .try_into()
        .expect("a frame starts with a whole header")
}

fn check_frame(frame: &Frame, consumed: &[u8]) {
    let header = frame.header;
    assert_eq!(consumed.len(), header.frame_bytes as usize, "frame length");
    assert_eq!(&frame.bytes[..], consumed, "frame bytes are the stream's");
    assert_eq!(
        &header.encode(),
        header_bytes(consumed),
        "header re-encodes"
    );
    assert_eq!(
        FrameHeader::decode(header_bytes(consumed), FRAME_BYTES_MAX),
        Ok(header)
    );
    assert!(header.frame_bytes as usize <= FRAME_BYTES_MAX);
    assert!(header.body_bytes as usize <= BODY_BYTES_MAX);
    let body_end = FRAME_HEADER_BYTES + padded_body_bytes(header.body_bytes as usize);
    assert_eq!(
        crc32c::crc32c(&consumed[FRAME_HEADER_BYTES..body_end]),
        header.body_crc
    );
    assert_eq!(frame.body().len(), header.body_bytes as usize);
    assert_eq!(frame.payload().len(), header.payload_bytes as usize);
    assert_eq!(
        frame.body().as_ptr().align_offset(FRAME_ALIGNMENT_BYTES),
        0,
        "body is aligned"
    );
    assert_eq!(
        frame.payload().as_ptr().align_offset(FRAME_ALIGNMENT_BYTES),
        0,
        "payload is aligned"
    );
    let Some(index) = request_bodies::body_type_of(&header) else {
        return;
    };
    // The body as the type the header promises, checked as the request_bodies target does; a
    // produce request's or fetch response's payload is then split and its batches checked.
    let payload_lengths: Option<Vec<usize>> = match index {
        5 => frame.decode_body::<ProduceRequest>().ok().map(|r| {
            r.partitions
                .iter()
                .map(|p| p.batch_bytes as usize)
                .collect()
        }),
        15 => frame.decode_body::<FetchResponse>().ok().map(|r| {
            r.partitions
                .iter()
                .map(|p| p.batch_bytes as usize)
                .collect()
        }),
        _ => None,
    };
    request_bodies::check_selected(index, frame.body(), frame.payload().len(), false);
    if let Some(lengths) = payload_lengths {
        if let Ok(ranges) = payload_ranges(frame.payload().len(), lengths.into_iter()) {
            for range in ranges {
                crate::batch_validation::check_batches(&frame.payload()[range]);
            }
        }
    }
}

fn check_error(
    header: Option<FrameHeader>,
    error: &FrameError,
    consumed: &[u8],
    available_bytes: usize,
) {
    match error {
        FrameError::Truncated { received_bytes, .. } => {
            assert_eq!(consumed.len(), available_bytes, "truncated before the end");
            assert_eq!(*received_bytes, consumed.len());
        }
        FrameError::HeaderCrc { .. } => {
            assert!(header.is_none(), "a header with a bad CRC is not trusted");
            assert_eq!(consumed.len(), FRAME_HEADER_BYTES);
        }
        FrameError::TooLarge { .. } | FrameError::BadLengths(_) => {
            assert_eq!(
                consumed.len(),
                FRAME_HEADER_BYTES,
                "refused from the header"
            );
            assert_eq!(
                FrameHeader::decode(header_bytes(consumed), FRAME_BYTES_MAX).err(),
                Some(error.clone())
            );
            let header = header.expect("a header with a good CRC is trusted");
            assert_eq!(&header.encode(), header_bytes(consumed));
        }
        FrameError::BodyCrc { .. } => {
            let header = header.expect("the header is returned with a body CRC error");
            assert_eq!(
                consumed.len(),
                header.frame_bytes as usize,
                "whole frame consumed"
            );
            assert!(error.keeps_framing());
        }
        FrameError::Io(e) => panic!("a slice reader does not fail: {e}"),
    }
    if !matches!(error, FrameError::BodyCrc { .. }) {
        assert!(!error.keeps_framing());
    }
}
