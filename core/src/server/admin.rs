//! The admin HTTP endpoint on shard 0: `/metrics` (Prometheus text), `/livez` (every shard's
//! reactor ticked recently), `/readyz` (every shard recovered its partitions and listens).
//! Requests are parsed with `httparse`; each connection serves one request and closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_util::future::LocalBoxFuture;
use glommio::net::{TcpListener, TcpStream};

use super::Shared;

const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A shard whose heartbeat is older than this is reported stalled by `/livez`.
const STALL_MS: u64 = 5_000;

pub fn bind(address: &str) -> Result<TcpListener, String> {
    TcpListener::bind(address).map_err(|e| format!("cannot listen on {address} (admin): {e}"))
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: LocalBoxFuture<'static, ()>) {
    let mut stop = stop;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            (&mut stop).await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let shared = Arc::clone(&shared);
                glommio::spawn_local(async move {
                    let _ = glommio::timer::timeout(REQUEST_TIMEOUT, async {
                        handle(stream, &shared).await;
                        Ok(())
                    })
                    .await;
                })
                .detach();
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "admin accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, shared: &Shared) {
    let mut buffer = vec![0u8; REQUEST_BYTES_MAX];
    let mut filled = 0;
    let path = loop {
        let Ok(n) = stream.read(&mut buffer[filled..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                if request.method != Some("GET") && request.method != Some("HEAD") {
                    respond(&mut stream, 405, "text/plain", "only GET is supported\n").await;
                    return;
                }
                break request.path.unwrap_or("/").to_string();
            }
            Ok(httparse::Status::Partial) if filled < buffer.len() => continue,
            _ => {
                respond(&mut stream, 400, "text/plain", "bad request\n").await;
                return;
            }
        }
    };
    match path.split('?').next().unwrap_or("/") {
        "/metrics" => {
            let body = shared.metrics.encode();
            respond(
                &mut stream,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await;
        }
        "/livez" => {
            let now_ms = shared.started.elapsed().as_millis() as u64;
            let stalled: Vec<usize> = shared
                .heartbeats_ms
                .iter()
                .enumerate()
                .filter(|(_, beat)| {
                    let beat = beat.load(Ordering::Acquire);
                    beat > 0 && now_ms.saturating_sub(beat) > STALL_MS
                })
                .map(|(shard, _)| shard)
                .collect();
            if stalled.is_empty() {
                respond(&mut stream, 200, "text/plain", "ok\n").await;
            } else {
                let body = format!("stalled shards: {stalled:?}\n");
                respond(&mut stream, 503, "text/plain", &body).await;
            }
        }
        "/readyz" => {
            if shared.is_ready() {
                respond(&mut stream, 200, "text/plain", "ready\n").await;
            } else {
                let body = format!(
                    "not ready: {} of {} shards serving{}\n",
                    shared.ready_shards.load(Ordering::Acquire),
                    shared.shards(),
                    if shared.shutting_down.load(Ordering::Acquire) {
                        ", shutting down"
                    } else {
                        ""
                    }
                );
                respond(&mut stream, 503, "text/plain", &body).await;
            }
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "try /metrics, /livez or /readyz\n",
            )
            .await
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.flush().await;
    let _ = stream.close().await;
}
