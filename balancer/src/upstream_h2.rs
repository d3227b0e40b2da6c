//! HTTP/2 towards the instances of a service with `http2 = true` (gRPC services, mostly):
//! one multiplexed connection per instance, opened on first use and kept by its
//! [`Endpoint`](crate::endpoint::Endpoint), where every request to that instance shares it.
//!
//! The HTTP/1 upstream client (`upstream.rs`) is the balancer's own, tuned for the common
//! case; here hyper's HTTP/2 client does the framing, flow control and trailers. What the
//! request carries is decided by the same code as for HTTP/1 (`h1_head::encode_request`:
//! X-Forwarded-*, header rules, request id, stripped prefix), so both protocols forward
//! the same headers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::proxy::BoxError;
use crate::tcp::UpstreamOpts;
use crate::upstream_io;

/// A request body sent upstream: owned (the stream outlives the call that sends it).
pub type H2Body = BoxBody<Bytes, BoxError>;

/// An instance's shared connection, with the options it was opened under (a reload
/// builds new options; requests under them open a new connection).
pub struct H2Conn {
    pub send: SendRequest<H2Body>,
    pub opts: Arc<UpstreamOpts>,
}

impl H2Conn {
    /// Still usable for a request under `opts`.
    pub fn fits(&self, opts: &Arc<UpstreamOpts>) -> bool {
        Arc::ptr_eq(&self.opts, opts) && !self.send.is_closed()
    }
}

/// Opens a connection to `addr` (TLS with ALPN h2 if the service has `[service.tls]`) and
/// runs its HTTP/2 handshake; the connection's task ends once every sender is dropped and
/// its last stream has finished.
pub async fn open(addr: SocketAddr, opts: &Arc<UpstreamOpts>) -> io::Result<H2Conn> {
    // No PROXY header here (the config refuses it with `http2`): `client` and `local`
    // are not sent.
    let io = upstream_io::open(addr, opts, addr, addr).await?;
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // One stream until the instance's SETTINGS arrive (its limit then, or none if it
        // names none): hyper's default of 100 let a burst on a new connection exceed a
        // smaller limit, and the streams past it were refused (502). Costs the first
        // calls one round trip at most.
        .initial_max_send_streams(1)
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
        }
    });
    Ok(H2Conn {
        send,
        opts: opts.clone(),
    })
}

/// An HTTP/1 request head (as `h1_head::encode_request` writes it for the instance) as
/// HTTP/2 parts: its target, its header lines as a map, and the authority its `Host`
/// line names. Lines that HTTP/2 forbids (connection-specific ones) are left out;
/// `TE: trailers` stays (gRPC).
pub fn parts_of(head: &[u8]) -> Result<(String, HeaderMap, Option<String>), BoxError> {
    // As many slots as the head has lines (a listener's `max_headers` has no fixed cap).
    let count = head.windows(2).filter(|w| w == b"\r\n").count();
    let mut lines = vec![httparse::EMPTY_HEADER; count];
    let mut req = httparse::Request::new(&mut lines);
    req.parse(head)?;
    let target = req.path.unwrap_or("/").to_owned();
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut authority = None;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())?;
        if name == http::header::HOST {
            authority = Some(String::from_utf8_lossy(h.value).into_owned());
            continue;
        }
        let forbidden = name == http::header::CONNECTION
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::UPGRADE
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
            || (name == http::header::TE && !h.value.eq_ignore_ascii_case(b"trailers"));
        if !forbidden {
            map.append(name, HeaderValue::from_bytes(h.value)?);
        }
    }
    Ok((target, map, authority))
}

/// Whether the instance refused the stream (`RST_STREAM` or `GOAWAY` with
/// `REFUSED_STREAM`, e.g. past a limit it lowered): it did not process the request (RFC
/// 9113 §8.7), so the request may go again whatever its method.
pub fn refused(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = err.source();
    }
    false
}

/// A request without a body.
pub fn empty() -> H2Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A client body handed over whole (hyper's, from an HTTP/2 client), cut off past
/// `limit` bytes (the listener's `max_body_bytes`): the stream is then reset both ways,
/// since the answer may have begun.
pub fn boxed(body: hyper::body::Incoming, limit: u64) -> H2Body {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    http_body_util::Limited::new(body, limit).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_lines_are_left_out_and_the_host_becomes_the_authority() {
        let head = b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: grpc.example:50051\r\n\
            Connection: keep-alive\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\
            Content-Type: application/grpc\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
        let (target, map, authority) = parts_of(head).unwrap();
        assert_eq!(target, "/pkg.Svc/Call");
        assert_eq!(authority.as_deref(), Some("grpc.example:50051"));
        assert_eq!(map.get("te").unwrap(), "trailers");
        assert_eq!(map.get("content-type").unwrap(), "application/grpc");
        assert_eq!(map.get("x-forwarded-for").unwrap(), "10.0.0.1");
        for gone in ["connection", "transfer-encoding", "host"] {
            assert!(!map.contains_key(gone), "{gone} was kept");
        }
        let (_, map, _) = parts_of(b"GET / HTTP/1.1\r\nTE: gzip\r\n\r\n").unwrap();
        assert!(!map.contains_key("te"));
        // Any number of lines.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..1000 {
            many.extend_from_slice(format!("x-{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parts_of(&many).unwrap().1.len(), 1000);
    }
}
