//! The response body sent to the client: streamed straight out of the upstream
//! connection's read buffer as the client side pulls it, nothing buffered beyond one read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::endpoint::InFlight;
use crate::upstream::{Framing, UpConn};

/// An upstream connection lent to one response: returned to its endpoint's pool when the
/// body has been read to the end (and the upstream keeps the connection alive), closed if
/// the body is dropped early or breaks.
pub struct Lease {
    pub conn: UpConn,
    pub framing: Framing,
    pub keep_alive: bool,
    pub in_flight: InFlight,
    /// When the response head arrived: the connection's idle age in the pool counts from
    /// there (one clock read less per request; a long body only makes it look older).
    pub answered: std::time::Instant,
}

impl Lease {
    fn finish(self) {
        if self.keep_alive {
            self.in_flight.endpoint().checkin(self.conn, self.answered);
        }
    }
}

/// An upstream connection that answered 101 to an `Upgrade` request from the
/// balancer's own HTTP/1 server: the server writes the 101 and then runs the tunnel.
pub struct Tunnel {
    pub conn: UpConn,
    pub in_flight: InFlight,
}

impl Tunnel {
    /// Bytes both ways until either side closes; `early` = client bytes already read.
    pub async fn run<IO: AsyncRead + AsyncWrite + Unpin>(self, client: &mut IO, early: Bytes) {
        let _in_flight = self.in_flight;
        let (mut up, up_early) = self.conn.into_parts();
        if !early.is_empty() && up.write_all(&early).await.is_err() {
            return;
        }
        if !up_early.is_empty() && client.write_all(&up_early).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(client, &mut up).await;
    }
}

/// An HTTP/2 instance's answer (`upstream_h2`): its frames, trailers included, and the
/// instance's in-flight count until the body ends or is dropped.
pub struct H2Answer {
    pub body: hyper::body::Incoming,
    pub _in_flight: InFlight,
}

/// Body of a response sent to the client.
pub enum RespBody {
    Upstream(Option<Lease>),
    /// From an HTTP/2 instance; `None` once it ended.
    H2(Option<H2Answer>),
    /// The answer is a 101 whose tunnel the HTTP/1 server runs; no body.
    Tunnel(Option<Tunnel>),
    /// A response the balancer wrote itself (errors, admin).
    Full(Option<Bytes>),
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RespBody::Full(Some(b.into()))
    }

    pub fn empty() -> Self {
        RespBody::Full(None)
    }

    /// Wraps an upstream body; if it is already complete, the connection goes back now.
    pub fn upstream(lease: Lease) -> Self {
        if lease.framing == Framing::None {
            lease.finish();
            RespBody::Upstream(None)
        } else {
            RespBody::Upstream(Some(lease))
        }
    }

    /// Next piece of the body, `None` at its end (the poll behind [`Body::poll_frame`]).
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        match self {
            RespBody::Full(b) => Poll::Ready(b.take().map(Ok)),
            RespBody::Tunnel(_) => Poll::Ready(None),
            RespBody::H2(slot) => loop {
                // Trailers have no place in an HTTP/1 answer: skipped here (HTTP/2 clients
                // get them through `poll_frame`).
                match std::task::ready!(Self::poll_h2(slot, cx)) {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => return Poll::Ready(Some(Ok(d))),
                        Err(_) => continue,
                    },
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    None => return Poll::Ready(None),
                }
            },
            RespBody::Upstream(slot) => {
                let Some(lease) = slot else {
                    return Poll::Ready(None);
                };
                let res = std::task::ready!(lease.conn.poll_body(&mut lease.framing, cx));
                match &res {
                    Some(Ok(_)) if lease.framing != Framing::None => {}
                    Some(Ok(_)) | None => {
                        if let Some(l) = slot.take() {
                            l.finish();
                        }
                    }
                    // A broken upstream body: never reuse that connection.
                    Some(Err(_)) => *slot = None,
                }
                Poll::Ready(res)
            }
        }
    }
}

impl RespBody {
    /// The next frame of an HTTP/2 instance's answer; the slot empties at the end (or on
    /// an error), which ends the in-flight count.
    fn poll_h2(
        slot: &mut Option<H2Answer>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let Some(a) = slot else {
            return Poll::Ready(None);
        };
        let res = std::task::ready!(Pin::new(&mut a.body).poll_frame(cx));
        match &res {
            Some(Ok(_)) if !a.body.is_end_stream() => {}
            _ => *slot = None,
        }
        Poll::Ready(res.map(|r| r.map_err(io::Error::other)))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let RespBody::H2(slot) = this {
            return Self::poll_h2(slot, cx);
        }
        this.poll_data(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream(l) => l.is_none(),
            RespBody::H2(a) => a.as_ref().is_none_or(|a| a.body.is_end_stream()),
            RespBody::Tunnel(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::H2(Some(a)) => a.body.size_hint(),
            RespBody::H2(None) => SizeHint::with_exact(0),
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) | RespBody::Upstream(None) | RespBody::Tunnel(_) => {
                SizeHint::with_exact(0)
            }
            RespBody::Upstream(Some(l)) => match l.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}
