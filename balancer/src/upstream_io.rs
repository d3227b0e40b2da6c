//! The byte stream under a pooled upstream HTTP connection: plain TCP (the common case:
//! one enum branch, no box, no extra buffer) or TLS, opened after an optional PROXY
//! protocol header — the per-service `proxy_protocol` / `tls` options that tcp services
//! use too (`tcp::UpstreamOpts`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Waker};

use tokio::io::{AsyncRead, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::l4config::ProxyVersion;
use crate::proxy_protocol;
use crate::tcp::UpstreamOpts;

pub enum UpIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How a connection with upstream options was opened. A pooled connection only serves
/// requests that would have opened it the same way: the same options (a reload builds new
/// ones, so connections opened under the old ones age out) and, when a PROXY header was
/// sent, the same client connection — like HAProxy's private `send-proxy` connections,
/// since the upstream believes the header it read once.
pub struct Origin {
    pub opts: Arc<UpstreamOpts>,
    /// The client connection named in the PROXY header (its token, see
    /// `proxy::ConnInfo::owner`): dead once that connection is gone.
    pub owner: Option<Weak<()>>,
}

impl Origin {
    pub fn fits(&self, opts: &Arc<UpstreamOpts>, owner: Option<&Arc<()>>) -> bool {
        Arc::ptr_eq(&self.opts, opts)
            && match (&self.owner, owner) {
                (None, _) => true,
                // A live Weak keeps its allocation, so the address cannot be reused.
                (Some(mine), Some(theirs)) => std::ptr::eq(mine.as_ptr(), Arc::as_ptr(theirs)),
                (Some(_), None) => false,
            }
    }

    /// It served a client connection that has closed: nobody may reuse it.
    pub fn is_orphan(&self) -> bool {
        self.owner.as_ref().is_some_and(|w| w.strong_count() == 0)
    }
}

/// `TcpStream::connect` with TCP_NODELAY, minus a syscall (every upstream connection, HTTP
/// or tcp, is opened here): tokio reads `SO_ERROR` after every connect; here it is read
/// only when the socket reports a hang-up (a refused or reset connect sets
/// EPOLLERR|EPOLLHUP), so a connect that succeeded costs socket, setsockopt, connect and
/// the epoll registration only (as HAProxy's does).
pub async fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed()
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Connects to `addr` as `opts` asks: the PROXY header first (HAProxy's `send-proxy`: the
/// client's address and the address it connected to), then the TLS handshake (ALPN
/// http/1.1, SNI and verification as configured).
pub async fn open(
    addr: SocketAddr,
    opts: &UpstreamOpts,
    client: SocketAddr,
    local: SocketAddr,
) -> io::Result<UpIo> {
    let mut tcp = connect_tcp(addr).await?;
    if let Some(v) = opts.proxy {
        let header = match v {
            ProxyVersion::V1 => proxy_protocol::encode_v1(client, local),
            ProxyVersion::V2 => proxy_protocol::encode_v2(client, local),
        };
        tcp.write_all(&header).await?;
    }
    Ok(match &opts.tls {
        Some(tls) => UpIo::Tls(Box::new(tls.connect(addr.ip(), tcp).await?)),
        None => UpIo::Plain(tcp),
    })
}

impl UpIo {
    pub async fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            UpIo::Plain(s) => s.write_all(b).await,
            // rustls may keep records buffered: a request piece must leave now.
            UpIo::Tls(t) => {
                t.write_all(b).await?;
                t.flush().await
            }
        }
    }

    /// False when the upstream has closed the idle connection (or sent something
    /// unexpected). Plain: costs a syscall only if the reactor saw the socket turn
    /// readable. TLS: one read attempt at the TLS layer, which also takes in records the
    /// server sends unasked (TLS 1.3 session tickets) — they are not a sign of death.
    pub fn looks_alive(&mut self) -> bool {
        match self {
            UpIo::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            UpIo::Tls(t) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(&mut **t).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

crate::plain_or_tls::impl_plain_or_tls_io!(UpIo);
