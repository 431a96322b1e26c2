//! Deny stage: answers in the client's own protocol (docs/DESIGN.md §3 step 9), never
//! opening an upstream connection. TLS gets a fatal access_denied alert, HTTP
//! a 403 naming the host and reason, anything else a reset.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::registry::{Protocol, Reason};

/// TLS record: alert (21), version 3.3, length 2, level fatal (2),
/// description access_denied (49).
pub const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

pub fn http_403(name: Option<&str>, port: u16, reason: Reason) -> Vec<u8> {
    let body = format!(
        "portcullis: {}:{port} denied: {}\n",
        name.unwrap_or("(no host)"),
        reason.as_str()
    );
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nX-Portcullis-Reason: {}\r\n\r\n{body}",
        body.len(),
        reason.as_str()
    )
    .into_bytes()
}

pub fn http_502() -> Vec<u8> {
    let body = "portcullis: upstream unreachable\n";
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Closes with RST: SO_LINGER 0, then drop.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Writes `answer`, closes our side, and reads (discarding) briefly so that
/// unread client bytes do not turn the close into a reset that could destroy
/// the answer before the client reads it.
pub async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
    let write = async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        // On the heap: an array here would be part of every flow's future (the
        // deny paths are inlined into `flow::handle`), relayed or not.
        let mut sink = vec![0u8; 4096];
        loop {
            if stream.read(&mut sink).await? == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// The deny answer for a flow of `protocol`.
pub async fn deny(
    stream: TcpStream,
    protocol: Protocol,
    name: Option<&str>,
    port: u16,
    reason: Reason,
) {
    match protocol {
        Protocol::Tls => answer_and_close(stream, &TLS_ACCESS_DENIED).await,
        Protocol::Http => answer_and_close(stream, &http_403(name, port, reason)).await,
        Protocol::Tcp => reset(stream),
    }
}
