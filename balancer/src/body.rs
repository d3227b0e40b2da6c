//! Streaming bodies of the proxy, both ways. Nothing is buffered: frames pass through as
//! they arrive.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::endpoint::{InFlight, Sender};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client sent more body bytes than the listener allows.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Body of a request sent upstream.
pub enum ReqBody {
    /// The client's body, cut off with [`BodyTooLarge`] past `limit` bytes.
    Client {
        inner: Incoming,
        seen: u64,
        limit: u64,
    },
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Client { inner, seen, limit } => {
                match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            *seen += data.len() as u64;
                            if *seen > *limit {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*limit)))));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// An upstream connection lent to one response: returned to its endpoint's pool when the
/// body has been read to the end, closed if the body is dropped early.
pub struct Lease {
    pub tx: Sender,
    pub in_flight: InFlight,
}

impl Lease {
    fn finish(self) {
        self.in_flight.endpoint().checkin(self.tx);
    }
}

/// Body of a response sent to the client.
pub enum RespBody {
    Upstream {
        inner: Incoming,
        lease: Option<Lease>,
    },
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
    pub fn upstream(inner: Incoming, lease: Lease) -> Self {
        if inner.is_end_stream() {
            lease.finish();
            RespBody::Upstream { inner, lease: None }
        } else {
            RespBody::Upstream {
                inner,
                lease: Some(lease),
            }
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream { inner, lease } => {
                let res = std::task::ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &res {
                    None => {
                        if let Some(l) = lease.take() {
                            l.finish();
                        }
                    }
                    Some(Ok(_)) if inner.is_end_stream() => {
                        if let Some(l) = lease.take() {
                            l.finish();
                        }
                    }
                    // A broken upstream body: never reuse that connection.
                    Some(Err(_)) => *lease = None,
                    Some(Ok(_)) => {}
                }
                Poll::Ready(res)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
