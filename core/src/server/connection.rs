//! One client connection: a reader that admits requests in arrival order and a writer that
//! sends their responses in the same order, batching small ones into few writes. At most
//! `requests_in_flight_max` requests are admitted but unanswered; beyond that the reader stops
//! reading (TCP pushes back on the client).
//!
//! A frame's bytes count against the shard's request budget (`request_bytes_max_per_shard`)
//! from the moment they are read until the request is admitted: when the budget is spent, the
//! reader stops reading its socket until other requests finish.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use futures_util::future::LocalBoxFuture;
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use super::dispatch::error_frame;
use super::partition::FetchData;
use super::shard::Shard;
use crate::peer_auth::NONCE_BYTES;
use crate::protocol::{
    finish_frame, read_frame_bytes, read_frame_header, Frame, FrameBuf, FrameError, FrameHeader,
    FrameReadError, FRAME_HEADER_BYTES,
};

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

/// Which listener a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Client listeners: every API but the inter-broker ones.
    Client,
    /// `cluster.internal_listen`: peers that proved the cluster secret.
    Internal,
}

/// Where a connection of the internal listener is in the peer handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAuthState {
    NotStarted,
    /// `PeerAuthBegin` answered: the peer must now prove the secret over both nonces.
    Challenged {
        broker_id: u32,
        client_nonce: [u8; NONCE_BYTES],
        server_nonce: [u8; NONCE_BYTES],
    },
    Authenticated {
        broker_id: u32,
    },
}

/// What the request handlers know about the connection a request came on.
pub struct ConnectionContext {
    pub listener: ListenerKind,
    pub peer: String,
    pub auth: RefCell<PeerAuthState>,
    /// Set by a handler to close the connection once the response is written (failed
    /// authentication).
    pub close_after_response: Cell<bool>,
}

impl ConnectionContext {
    pub fn authenticated_peer(&self) -> Option<u32> {
        match *self.auth.borrow() {
            PeerAuthState::Authenticated { broker_id } => Some(broker_id),
            _ => None,
        }
    }
}

/// The shard's budget of request bytes being read or admitted (`request_bytes_max_per_shard`).
pub struct RequestBudget {
    semaphore: Rc<Semaphore>,
    bytes_max: u64,
}

impl RequestBudget {
    pub fn new(bytes_max: usize) -> RequestBudget {
        RequestBudget {
            semaphore: Rc::new(Semaphore::new(bytes_max as u64)),
            bytes_max: bytes_max as u64,
        }
    }

    /// Bytes of the budget held by frames being read or admitted.
    pub fn used_bytes(&self) -> u64 {
        self.bytes_max - self.semaphore.available()
    }
}

/// Budget bytes held by one frame; given back when dropped.
struct BudgetHold {
    semaphore: Rc<Semaphore>,
    bytes: u64,
}

impl BudgetHold {
    fn new(budget: &RequestBudget) -> BudgetHold {
        BudgetHold {
            semaphore: Rc::clone(&budget.semaphore),
            bytes: 0,
        }
    }

    async fn grow(&mut self, bytes: u64) -> Result<(), FrameError> {
        self.semaphore
            .acquire(bytes)
            .await
            .map_err(|_| FrameError::Io("shutting down".to_string()))?;
        self.bytes += bytes;
        Ok(())
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.semaphore.signal(self.bytes);
        }
    }
}

/// Reads the rest of a frame whose header was read, holding budget for its bytes.
///
/// While most of the budget is free, the frame reserves its whole size at once and is read
/// straight into its buffer (no copy). Otherwise its bytes are taken as they arrive, each
/// read only once the budget has room for it: a connection that announced a large frame and
/// sends nothing holds nothing, so such connections cannot starve the others. Reservations
/// of whole frames are only made while half the budget stays free, so they can take at most
/// half of it.
async fn read_body<R: futures_lite::AsyncBufRead + Unpin>(
    reader: &mut R,
    header: FrameHeader,
    header_bytes: &[u8; FRAME_HEADER_BYTES],
    budget: &RequestBudget,
    hold: &mut BudgetHold,
) -> Result<Frame, FrameReadError> {
    let frame_bytes = header.frame_bytes as usize;
    let rest = (frame_bytes - FRAME_HEADER_BYTES) as u64;
    if budget.semaphore.available() >= budget.bytes_max / 2 + rest
        && budget.semaphore.try_acquire(rest).unwrap_or(false)
    {
        hold.bytes += rest;
        // Allocated once at its full size: growing it would copy what was read so far.
        let mut bytes = FrameBuf::with_capacity(frame_bytes);
        bytes.extend_from_slice(header_bytes);
        bytes.resize(frame_bytes, 0);
        read_frame_bytes(reader, &header, &mut bytes, FRAME_HEADER_BYTES).await?;
        return finish_frame(header, bytes);
    }
    let mut bytes = FrameBuf::with_capacity(frame_bytes.min(READ_BUFFER_BYTES * 2));
    bytes.extend_from_slice(header_bytes);
    while bytes.len() < frame_bytes {
        // Wait for bytes before taking budget for them.
        let available = reader
            .fill_buf()
            .await
            .map_err(|e| (Some(header), FrameError::Io(e.to_string())))?
            .len();
        if available == 0 {
            return Err((
                Some(header),
                FrameError::Truncated {
                    received_bytes: bytes.len(),
                    expected_bytes: frame_bytes,
                },
            ));
        }
        let take = available.min(frame_bytes - bytes.len());
        hold.grow(take as u64)
            .await
            .map_err(|e| (Some(header), e))?;
        let buffered = reader
            .fill_buf()
            .await
            .map_err(|e| (Some(header), FrameError::Io(e.to_string())))?;
        assert!(buffered.len() >= take, "buffered bytes vanished");
        bytes.extend_from_slice(&buffered[..take]);
        reader.consume(take);
    }
    finish_frame(header, bytes)
}

pub(super) async fn serve(shard: Rc<Shard>, stream: TcpStream, listener: ListenerKind) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    let context = ConnectionContext {
        listener,
        peer: peer.clone(),
        auth: RefCell::new(PeerAuthState::NotStarted),
        close_after_response: Cell::new(false),
    };
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
            Ready,
            Closed,
            Stop,
        }
        // Wait (up to the idle timeout) for the first bytes of the next frame.
        let first = futures_lite::future::or(
            async {
                let read = glommio::timer::timeout(idle, async {
                    Ok(reader.fill_buf().await.map(|b| b.len()))
                })
                .await;
                match read {
                    Ok(Ok(n)) if n > 0 => Next::Ready,
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
        match first {
            Next::Ready => {}
            Next::Closed | Next::Stop => break,
        }
        // The rest of the frame must arrive within the read timeout (slow or stuck clients),
        // waits for the request budget included.
        let mut hold = BudgetHold::new(&shard.request_budget);
        let result = glommio::timer::timeout(read_timeout, async {
            Ok(
                match read_frame_header(&mut reader, frame_bytes_max).await {
                    Ok(None) => Ok(None),
                    Err(error) => Err(error),
                    Ok(Some((header, header_bytes))) => read_body(
                        &mut reader,
                        header,
                        &header_bytes,
                        &shard.request_budget,
                        &mut hold,
                    )
                    .await
                    .map(Some),
                },
            )
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
                drop(hold);
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
        let pending = shard.admit(frame, &context).await;
        // Admitted: a produce's bytes are in the log's buffers, other requests were decoded.
        drop(hold);
        queued.set(queued.get() + 1);
        if queue.send(pending).await.is_err() {
            break;
        }
        if context.close_after_response.get() {
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
