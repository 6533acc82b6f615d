//! One client connection: a reader that admits requests in arrival order and a writer that
//! sends their responses in the same order, batching small ones into few writes. At most
//! `requests_in_flight_max` requests are admitted but unanswered; beyond that the reader stops
//! reading (TCP pushes back on the client).

use std::rc::Rc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use futures_util::future::LocalBoxFuture;
use glommio::channels::local_channel;
use glommio::net::TcpStream;

use super::partition::FetchData;
use super::shard::{error_frame, Shard};
use crate::protocol::{read_frame, FrameBuf, FrameError, FrameHeader, FRAME_HEADER_BYTES};

/// Reads are at least this large, so a small request costs one read.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Writes smaller than this are gathered before going to the socket.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Batch bytes of a response, sent without copying when they come from this shard's log.
pub enum OutPayload {
    Local(FetchData),
    Owned(FrameBuf),
}

impl OutPayload {
    pub fn bytes(&self) -> &[u8] {
        match self {
            OutPayload::Local(data) => data.slice(),
            OutPayload::Owned(bytes) => bytes,
        }
    }
}

/// A response ready to write: header and body, then payload slices.
pub struct Outgoing {
    pub head: FrameBuf,
    pub payload: Vec<OutPayload>,
}

/// A response still being worked on; `None` means the request gets no response (acks=none).
pub type Pending = LocalBoxFuture<'static, Option<Outgoing>>;

pub(super) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    let config = &shard.shared.config;
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let read_timeout = Duration::from_millis(config.request_read_timeout_ms);
    let write_timeout = Duration::from_millis(config.response_write_timeout_ms);
    let frame_bytes_max = config.frame_bytes_max;
    let (reader, writer) = futures_lite::io::split(stream);
    // Small frames arrive whole in one read; large payloads bypass the buffer.
    let mut reader = futures_lite::io::BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let (queue, responses) = local_channel::new_bounded::<Pending>(config.requests_in_flight_max);
    // Responses queued and not yet taken by the writer (it flushes when this reaches zero).
    let queued = Rc::new(std::cell::Cell::new(0usize));
    let writer_queued = Rc::clone(&queued);
    let (writer_done_tx, writer_done) = futures_channel::oneshot::channel::<()>();
    let writer = glommio::spawn_local(async move {
        write_loop(writer, responses, writer_queued, write_timeout).await;
        let _ = writer_done_tx.send(());
    });
    let mut writer_done = Some(writer_done);
    let mut stop = shard.stop_signal();
    loop {
        enum Next {
            Bytes(usize, [u8; FRAME_HEADER_BYTES]),
            Closed,
            Stop,
        }
        // Wait (up to the idle timeout) for the first bytes of the next frame.
        let first = futures_lite::future::or(
            async {
                let mut start = [0u8; FRAME_HEADER_BYTES];
                let read =
                    glommio::timer::timeout(idle, async { Ok(reader.read(&mut start).await) })
                        .await;
                match read {
                    Ok(Ok(n)) if n > 0 => Next::Bytes(n, start),
                    _ => Next::Closed,
                }
            },
            async {
                futures_lite::future::or(&mut stop, async {
                    if let Some(done) = writer_done.as_mut() {
                        let _ = done.await;
                    }
                })
                .await;
                Next::Stop
            },
        )
        .await;
        let (n, start) = match first {
            Next::Bytes(n, start) => (n, start),
            Next::Closed | Next::Stop => break,
        };
        // The rest of the frame must arrive within the read timeout (slow or stuck clients).
        let result = glommio::timer::timeout(read_timeout, async {
            let mut chained = futures_lite::io::Cursor::new(&start[..n]).chain(&mut reader);
            Ok(read_frame(&mut chained, frame_bytes_max).await)
        })
        .await;
        let frame = match result {
            Err(_) => {
                tracing::debug!(%peer, "closing a connection whose request did not arrive in time");
                break;
            }
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => break,
            Ok(Err((header, error))) => {
                let keeps_framing = error.keeps_framing();
                tracing::debug!(%peer, %error, "bad frame");
                if let Some(response) = frame_error_response(header, &error) {
                    queued.set(queued.get() + 1);
                    let _ = queue
                        .send(Box::pin(futures_util::future::ready(Some(response))))
                        .await;
                }
                if keeps_framing {
                    continue;
                }
                break;
            }
        };
        let pending = shard.admit(frame).await;
        queued.set(queued.get() + 1);
        if queue.send(pending).await.is_err() {
            break;
        }
    }
    // Let the writer answer everything admitted, then close.
    drop(queue);
    writer.await;
}

/// The answer to a frame that could not be read: with its correlation id when the header was
/// trustworthy, else with id 0 just before the connection closes.
fn frame_error_response(header: Option<FrameHeader>, error: &FrameError) -> Option<Outgoing> {
    if matches!(error, FrameError::Io(_) | FrameError::Truncated { .. }) {
        return None;
    }
    let header = header.unwrap_or(FrameHeader {
        frame_bytes: 0,
        api_key: u16::MAX,
        api_version: 0,
        correlation_id: 0,
        flags: 0,
        error_code: 0,
        body_bytes: 0,
        payload_bytes: 0,
        body_crc: 0,
    });
    error_frame(&header, error.code(), error.to_string())
}

async fn write_loop(
    writer: futures_lite::io::WriteHalf<TcpStream>,
    responses: local_channel::LocalReceiver<Pending>,
    queued: Rc<std::cell::Cell<usize>>,
    write_timeout: Duration,
) {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(pending) = responses.recv().await {
        queued.set(queued.get().saturating_sub(1));
        let Some(outgoing) = pending.await else {
            if queued.get() == 0 && writer.flush().await.is_err() {
                return;
            }
            continue;
        };
        // Flush only when no further response is ready, so pipelined replies share writes.
        let flush = queued.get() == 0;
        let written = glommio::timer::timeout(write_timeout, async {
            writer.write_all(&outgoing.head).await?;
            for part in &outgoing.payload {
                writer.write_all(part.bytes()).await?;
            }
            if flush {
                writer.flush().await?;
            }
            Ok(())
        })
        .await;
        if let Err(error) = written {
            tracing::debug!(%error, "closing a connection whose response could not be written");
            return;
        }
    }
    let _ = writer.close().await;
}
