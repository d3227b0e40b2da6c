//! One attempt at an upstream: open a connection (plain, PROXY header, TLS) and run one
//! request/response exchange on it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Version};
use http_body_util::BodyExt as _;

use crate::endpoint::Endpoint;
use crate::tcp::UpstreamOpts;
use crate::upstream::{self, Head, UpConn, UpError};

use super::{BoxError, ConnInfo};

/// Opens a new connection to an endpoint: plain, or as the service's upstream options
/// say (PROXY header, TLS handshake — both within `timeout`).
pub(super) async fn connect(
    ep: &Endpoint,
    timeout: Duration,
    opts: Option<&Arc<UpstreamOpts>>,
    conn: &ConnInfo,
) -> Result<UpConn, ConnectError> {
    let up = match opts {
        None => tokio::time::timeout(timeout, UpConn::connect(ep.addr)).await,
        Some(opts) => {
            let local = conn.local.unwrap_or(ep.addr);
            let owner = opts.proxy.map(|_| conn.owner());
            let open = UpConn::connect_with(ep.addr, opts, conn.peer, local, owner);
            tokio::time::timeout(timeout, open).await
        }
    };
    up.map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(std::io::Error),
}

/// Why one request/response exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Fail {
    /// The head could not be written: nothing reached the upstream.
    #[error("writing the request head: {0}")]
    HeadWrite(std::io::Error),
    #[error("request body exceeds the limit")]
    BodyTooLarge,
    /// The client's body broke (bad chunk, disconnect): its fault.
    #[error("client body: {0}")]
    ClientBody(BoxError),
    #[error("writing the request body: {0}")]
    BodyWrite(std::io::Error),
    #[error("{0}")]
    Response(UpError),
}

/// Writes the head and streams the client's body, then reads the response head.
pub(super) async fn exchange<B>(
    up: &mut UpConn,
    head: &[u8],
    body: &mut B,
    chunked: bool,
    limit: u64,
    method: &Method,
    lines: Option<Version>,
) -> Result<Head, Fail>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    up.write_all(head).await.map_err(Fail::HeadWrite)?;
    if !body.is_end_stream() {
        let mut seen = 0u64;
        let mut piece = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Fail::ClientBody(e.into()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers: not forwarded
            };
            if data.is_empty() {
                continue;
            }
            seen += data.len() as u64;
            if seen > limit {
                return Err(Fail::BodyTooLarge);
            }
            if chunked {
                piece.clear();
                upstream::chunk_head(&mut piece, data.len());
                piece.extend_from_slice(&data);
                piece.extend_from_slice(b"\r\n");
                up.write_all(&piece).await.map_err(Fail::BodyWrite)?;
            } else {
                up.write_all(&data).await.map_err(Fail::BodyWrite)?;
            }
        }
        if chunked {
            up.write_all(upstream::LAST_CHUNK)
                .await
                .map_err(Fail::BodyWrite)?;
        }
    }
    up.read_head(method, lines).await.map_err(Fail::Response)
}
