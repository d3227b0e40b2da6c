//! Writing an answer to an HTTP/1 client: the status line and header lines (the
//! response's map, then the lines already encoded from an upstream's head), then the body
//! as it streams (chunked when its length is unknown), gathered into few large writes. The
//! last answer before a close is held for the FIN ([`LastWrite`]).

use std::io;

use futures::FutureExt as _;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::Body as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::body::RespBody;
use crate::chunked;
use crate::client_io::ClientIo;
use crate::h1_head::{self, Lines};

/// Response bytes gathered before a write.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes a response (its header lines: the response's map, then `lines` already encoded
/// from an upstream's head); returns whether the connection stays open.
pub async fn write_response<IO: AsyncWrite + LastWrite + Unpin>(
    io: &mut IO,
    resp: Response<RespBody>,
    lines: Option<Lines>,
    is_head: bool,
    version: Version,
    mut keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| crate::upstream::has_token(v.as_bytes(), "close"))
    {
        keep_alive = false;
    }
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let has_length = parts.headers.contains_key(header::CONTENT_LENGTH)
        || lines.as_ref().is_some_and(|l| l.has_length);
    let known = match &body {
        RespBody::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
        RespBody::Upstream(None) | RespBody::Tunnel(_) => Some(0),
        RespBody::Upstream(Some(_)) | RespBody::H2(_) => body.size_hint().exact(),
    };
    let mut out = match lines {
        // An upstream's answer: its lines' buffer (status line first, sized for the body
        // bytes already read, see `UpConn::parse_head`) becomes the output buffer.
        Some(l) if parts.headers.is_empty() => l.bytes,
        lines => {
            let lines = lines.as_ref().map_or(&[][..], Lines::header_lines);
            let mut out = Vec::with_capacity(256 + parts.headers.len() * 48 + lines.len());
            h1_head::put_status_line(&mut out, version, status);
            for (n, v) in &parts.headers {
                if (n == header::CONNECTION && !switching) || n == header::TRANSFER_ENCODING {
                    continue;
                }
                h1_head::put(&mut out, n.as_str().as_bytes(), v.as_bytes());
            }
            out.extend_from_slice(lines);
            out
        }
    };
    let mut chunked = false;
    if !no_body && !has_length && !switching {
        match known {
            Some(n) => h1_head::put(&mut out, b"content-length", HeaderValue::from(n).as_bytes()),
            None if version == Version::HTTP_11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
            // An HTTP/1.0 client learns the end of the body from the close.
            None => keep_alive = false,
        }
    }
    if !switching {
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    if no_body || switching {
        if !keep_alive && !switching {
            io.hold_for_fin();
        }
        io.write_all(&out).await?;
        // A HEAD answer's (absent) body: the upstream connection still goes back.
        drop(body);
        return Ok(keep_alive);
    }
    // Body pieces already at hand go out with the head in one write; the batch is
    // flushed whenever the next piece would have to be waited for.
    loop {
        let next = match std::future::poll_fn(|cx| body.poll_data(cx)).now_or_never() {
            Some(n) => n,
            None => {
                if !out.is_empty() {
                    io.write_all(&out).await?;
                    out.clear();
                }
                std::future::poll_fn(|cx| body.poll_data(cx)).await
            }
        };
        match next {
            Some(Ok(data)) => {
                if chunked {
                    if data.is_empty() {
                        continue;
                    }
                    chunked::chunk_head(&mut out, data.len());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                } else if out.is_empty() && data.len() >= WRITE_BATCH {
                    io.write_all(&data).await?;
                    continue;
                } else {
                    out.extend_from_slice(&data);
                }
                if out.len() >= WRITE_BATCH {
                    io.write_all(&out).await?;
                    out.clear();
                }
            }
            None => {
                if chunked {
                    out.extend_from_slice(chunked::LAST_CHUNK);
                }
                if !out.is_empty() {
                    if !keep_alive {
                        io.hold_for_fin();
                    }
                    io.write_all(&out).await?;
                }
                return Ok(keep_alive);
            }
            Some(Err(e)) => {
                // The upstream broke mid-body: the client must not take a truncated body
                // for a whole one, so the connection ends here.
                let _ = io.write_all(&out).await;
                return Err(e);
            }
        }
    }
}

/// A client stream whose last answer before the close may wait for the FIN.
pub trait LastWrite {
    /// The next write is the last before `shutdown`: hold its partial segment back
    /// (TCP_CORK) so that the answer and the FIN leave in one segment, not a data segment,
    /// the client's ACK of it and a bare FIN. `shutdown` sends what is held at once.
    /// Called only once the whole answer is in hand, so nothing streamed waits.
    fn hold_for_fin(&self);
}

impl LastWrite for ClientIo {
    fn hold_for_fin(&self) {
        // Best effort: without the cork the answer still goes out, in two segments.
        let _ = socket2::SockRef::from(self.tcp()).set_tcp_cork(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy;
    use crate::test_util::segs_in;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A last answer (here a refusal with `Connection: close`) and the FIN reach the client
    /// in one segment.
    #[tokio::test]
    async fn the_last_answer_and_the_fin_leave_in_one_segment() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        let mut io = ClientIo::Plain(server);
        let before = segs_in(&client);
        let resp = proxy::plain(StatusCode::BAD_REQUEST, "bad request\n", true);
        let keep = write_response(&mut io, resp, None, false, Version::HTTP_11, true)
            .await
            .unwrap();
        assert!(!keep, "a `Connection: close` answer ends the connection");
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let segs = segs_in(&client) - before;
        let text = String::from_utf8(got).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 400 ") && text.ends_with("bad request\n"),
            "{text}"
        );
        assert_eq!(segs, 1, "the answer and the FIN came in {segs} segments");
    }
}
