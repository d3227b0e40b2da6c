//! The client-facing HTTP/1.x connection loop, generic over the stream (plain TCP today,
//! TLS later): read a head, hand the request to the proxy inline (its body read straight
//! from this connection as the upstream takes it), write the answer, repeat.
//!
//! Memory: between requests an idle keep-alive connection holds no buffer at all — the
//! read buffer is dropped once empty and allocated (small) only when bytes arrive; the
//! write buffer lives only while a response is written. One reusable timer per connection
//! covers the header-read (idle) timeout and the upstream response timeout.
//!
//! A client that opens with the HTTP/2 preface (h2c prior knowledge) is handed to
//! hyper's HTTP/2 server with the bytes already read put back in front of the stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::FutureExt as _;
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::body::RespBody;
use crate::chunked::{self, Decoder, Step};
use crate::deadline;
use crate::h1_request::{self, BodyKind, HeadError, Parsed};
use crate::h1_response::{LastWrite, write_response};
use crate::proxy::{self, ClientUpgrade, ConnInfo};
use crate::server::ConnSettings;

/// First read into an empty buffer: most request heads fit.
const FIRST_READ: usize = 1024;
/// Later reads (rest of a large head, bodies).
const MORE_READ: usize = 8 * 1024;
/// How long an idle keep-alive connection is kept open once shutdown (drain, self-upgrade)
/// began. Closing it at once races a client that is sending its next request on it right
/// now: the request meets a reset and fails. Kept open, that request is answered with
/// `Connection: close` and the client opens its next connection to whoever accepts now
/// (like HAProxy's `idle-close-on-response`). Only a connection that stays silent for the
/// whole grace is closed under the client.
const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What ended the wait for a request head. Lives for one step on the stack; boxing the
/// request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Parsed),
    H2,
    /// Clean end: the client closed, the idle timeout passed, or the drain grace did.
    Close,
    Refuse(HeadError),
}

/// Serves one client connection until it closes.
pub async fn serve<IO>(
    mut io: IO,
    info: Arc<ConnInfo>,
    settings: Arc<ConnSettings>,
    shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + LastWrite + Unpin + Send + 'static,
{
    let timer = deadline::idle_timer();
    tokio::pin!(timer);
    // One wait for the drain signal per connection, registered once and polled only while
    // the connection is idle: a `wait_for` made per request added and removed a waiter in
    // the watch's list every time (~4 % of a request's user-space instructions).
    let mut drain_rx = shutdown.clone();
    let drained = async move {
        let _ = drain_rx.wait_for(|s| *s).await;
    }
    .fuse();
    tokio::pin!(drained);
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let next = read_head(
            &mut io,
            &mut buf,
            &settings,
            timer.as_mut(),
            &shutdown,
            drained.as_mut(),
            first,
        )
        .await;
        first = false;
        let parsed = match next {
            Next::Request(p) => p,
            Next::H2 => {
                let io = Prefixed {
                    pre: buf.freeze(),
                    io,
                };
                crate::server::serve_h2(io, info, &settings, shutdown).await;
                return;
            }
            Next::Close => return,
            Next::Refuse(e) => {
                let (status, msg) = match e {
                    HeadError::TooLarge | HeadError::TooManyHeaders => (
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request header too large\n",
                    ),
                    HeadError::Bad(_) => (StatusCode::BAD_REQUEST, "bad request\n"),
                };
                tracing::debug!(client = %info.peer, error = %e, "refused request head");
                let resp = proxy::plain(status, msg, true);
                let _ = write_response(&mut io, resp, None, false, Version::HTTP_11, false).await;
                let _ = io.shutdown().await;
                return;
            }
        };
        let Parsed {
            request,
            head,
            body: kind,
            mut keep_alive,
            expect_continue,
            upgrade,
        } = parsed;
        let is_head = request.method() == Method::HEAD;
        let version = request.version();
        let upgrade = if upgrade {
            ClientUpgrade::Inline
        } else {
            ClientUpgrade::No
        };
        if expect_continue
            && io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let mut state = match kind {
            BodyKind::None => BodyState::Done,
            BodyKind::Length(n) => BodyState::Length(n),
            BodyKind::Chunked => BodyState::Chunked(Decoder::new()),
        };
        let body = H1Body {
            io: &mut io,
            buf: &mut buf,
            state: &mut state,
        };
        let mut lines = None;
        let mut resp = {
            // Kept here and lent to the proxy: moving the request in costs a copy of it.
            let mut req = request.map(|()| body);
            proxy::serve_request(
                &mut req,
                upgrade,
                &info,
                Some(proxy::H1Client {
                    head: &head,
                    timer: timer.as_mut(),
                    lines: &mut lines,
                }),
            )
            .await
        };
        // A body the upstream did not take leaves the stream mid-message: close after.
        if state != BodyState::Done || *shutdown.borrow() {
            keep_alive = false;
        }
        // A 101 whose tunnel this loop runs (matched in place: moving the response out
        // and back costs two copies of it per request).
        let tunnel = match resp.body_mut() {
            RespBody::Tunnel(t) => t.take(),
            _ => None,
        };
        if let Some(tunnel) = tunnel {
            if write_response(&mut io, resp, None, false, version, true)
                .await
                .is_ok()
            {
                tunnel.run(&mut io, buf.split().freeze()).await;
            }
            return;
        }
        match write_response(&mut io, resp, lines, is_head, version, keep_alive).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = io.shutdown().await;
                return;
            }
            Err(_) => return,
        }
        if buf.is_empty() {
            // Idle keep-alive: hold no buffer until the next request arrives.
            buf = BytesMut::new();
        }
    }
}

async fn read_head<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    settings: &ConnSettings,
    mut timer: Pin<&mut Sleep>,
    shutdown: &watch::Receiver<bool>,
    mut drained: Pin<&mut impl Future<Output = ()>>,
    first: bool,
) -> Next
where
    IO: AsyncRead + Unpin,
{
    loop {
        if !buf.is_empty() {
            if first && buf.len() < h1_request::H2_PREFACE.len() {
                if h1_request::H2_PREFACE.starts_with(buf) {
                    // Could still be the preface: read on.
                } else if let Some(n) = parse(buf, settings) {
                    return n;
                }
            } else if first && buf.starts_with(h1_request::H2_PREFACE) {
                return Next::H2;
            } else if let Some(n) = parse(buf, settings) {
                return n;
            }
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(if buf.is_empty() {
                FIRST_READ
            } else {
                MORE_READ
            });
        }
        let idle = buf.is_empty();
        let draining = *shutdown.borrow();
        let wait = if idle && draining {
            DRAIN_IDLE_GRACE.min(settings.h1.header_read_timeout)
        } else {
            settings.h1.header_read_timeout
        };
        let read = deadline::within(timer.as_mut(), wait, io.read_buf(buf));
        let got = if idle && !draining {
            tokio::select! {
                biased;
                r = read => r,
                // Loop again: now draining, the idle wait is the short grace.
                () = drained.as_mut() => continue,
            }
        } else {
            read.await
        };
        match got {
            Ok(Ok(0)) if buf.is_empty() => return Next::Close,
            Ok(Ok(0)) => return Next::Refuse(HeadError::Bad("closed inside the request head")),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Next::Close,
            // Idle keep-alive connections close quietly; a slow head gets nothing either
            // (like hyper: the client stopped sending).
            Err(deadline::Elapsed) => return Next::Close,
        }
    }
}

fn parse(buf: &mut BytesMut, settings: &ConnSettings) -> Option<Next> {
    match h1_request::parse(buf, settings.h1.max_headers, settings.h1.max_header_bytes) {
        Ok(Some(p)) => Some(Next::Request(p)),
        Ok(None) => None,
        Err(e) => Some(Next::Refuse(e)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(Decoder),
    Done,
    Broken,
}

/// The request body, read from the client connection as the proxy pulls it. Borrows
/// the connection: the proxy runs inline in the connection's task.
struct H1Body<'a, IO> {
    io: &'a mut IO,
    buf: &'a mut BytesMut,
    state: &'a mut BodyState,
}

#[derive(Debug, thiserror::Error)]
enum ClientBodyError {
    #[error("client closed inside the request body")]
    Eof,
    #[error("{0}")]
    Chunk(#[from] chunked::BadChunk),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl<IO: AsyncRead + Unpin> proxy::ClientBody for H1Body<'_, IO> {}

impl<IO: AsyncRead + Unpin> Body for H1Body<'_, IO> {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                BodyState::Done | BodyState::Broken => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = (this.buf.len() as u64).min(*left) as usize;
                        let data = this.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            *this.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(d) => match d.step(this.buf) {
                    Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                    Ok(Step::Done) => {
                        *this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => {
                        *this.state = BodyState::Broken;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
            }
            if this.buf.capacity() - this.buf.len() < 1024 {
                this.buf.reserve(MORE_READ);
            }
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *this.io),
                cx,
                &mut *this.buf
            )) {
                Ok(0) => {
                    *this.state = BodyState::Broken;
                    return Poll::Ready(Some(Err(ClientBodyError::Eof)));
                }
                Ok(_) => {}
                Err(e) => {
                    *this.state = BodyState::Broken;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Broken)
    }

    fn size_hint(&self) -> SizeHint {
        match *self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done | BodyState::Broken => SizeHint::with_exact(0),
            BodyState::Chunked(_) => SizeHint::default(),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<IO> {
    pre: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(out.remaining());
            let piece = self.pre.split_to(n);
            out.put_slice(&piece);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
