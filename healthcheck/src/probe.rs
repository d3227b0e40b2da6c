//! One probe: a TCP connect, or an HTTP/1.1 `GET` whose status line is all we read.
//!
//! Built for 10,000 probes a second from one core: the request bytes are prepared once per
//! target, the response is read into a small stack buffer, nothing is allocated per probe,
//! and every probe uses a new connection that is closed with a RST (zero linger) as soon as
//! the status line is in, so neither side keeps TIME_WAIT sockets around (HAProxy closes its
//! checks the same way). Redirects are never followed: a 3XX is just a status code.

use std::fmt;
use std::future::Future;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

use catalog::{CheckSpec, Instance, InstanceId, Protocol, StatusRange};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Shortest accepted probe interval and timeout; anything lower is raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// How long an HTTP probe waits after sending its request before it first reads. Answers
/// from loopback and LAN backends are usually in by then and are read with one `recv`,
/// without registering the socket with the event loop; slower ones are then awaited
/// through it. The price: a probe never reports a duration shorter than this.
pub const FIRST_READ_AFTER: Duration = Duration::from_millis(1);

/// How an instance is probed, prepared once and shared by every probe of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub method: Method,
    pub timeout: Duration,
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub expect: Vec<StatusRange>,
    pub deregister_after: Option<Duration>,
}

/// What a probe does on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Tcp,
    /// The whole request, ready to write.
    Http {
        request: Box<[u8]>,
    },
    /// The check spec cannot be turned into a safe request; every probe fails with this.
    Invalid(String),
}

/// The result of one probe, small and allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TCP connect succeeded.
    Connected,
    /// HTTP status code received.
    Status(u16),
    Timeout,
    /// Connect, write or read failed.
    Io(io::ErrorKind),
    /// The peer closed before sending a status line.
    Closed,
    /// Whatever came back is not an HTTP/1.x status line.
    Malformed,
    /// The target's check spec is invalid.
    Invalid,
}

/// Metric label of an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Answered, but not with an accepted status.
    Fail,
    Timeout,
    Error,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Pass,
        Verdict::Fail,
        Verdict::Timeout,
        Verdict::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Timeout => "timeout",
            Verdict::Error => "error",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Target {
    /// The probe of `instance` under `spec` (the instance's own check, else its service's).
    /// `checker` goes into a header so a backend can tell replicas apart.
    pub fn new(instance: &Instance, spec: &CheckSpec, checker: &str) -> Self {
        let addr = instance.socket_addr();
        let method = match (&spec.path, instance.protocol) {
            (Some(path), Protocol::Http) => {
                http_request(path, spec.host.as_deref(), addr, &instance.id, checker)
            }
            _ => Method::Tcp,
        };
        let timeout = spec.timeout.max(MIN_INTERVAL);
        Self {
            addr,
            method,
            timeout,
            interval: spec.interval.max(MIN_INTERVAL),
            rise: spec.rise.max(1),
            fall: spec.fall.max(1),
            expect: spec.expect.clone(),
            deregister_after: spec.deregister_after,
        }
    }

    /// Whether `outcome` counts as a pass, and its metric label.
    pub fn judge(&self, outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::Connected => Verdict::Pass,
            Outcome::Status(s) if self.expect.iter().any(|r| r.contains(s)) => Verdict::Pass,
            Outcome::Status(_) | Outcome::Malformed | Outcome::Closed | Outcome::Invalid => {
                Verdict::Fail
            }
            Outcome::Timeout => Verdict::Timeout,
            Outcome::Io(_) => Verdict::Error,
        }
    }

    /// Runs one probe, bounded by the timeout.
    pub async fn probe(&self) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        let result = match &self.method {
            Method::Tcp => connect(self.addr, deadline).await,
            Method::Http { request } => http(self.addr, request, deadline).await,
            Method::Invalid(_) => Ok(Outcome::Invalid),
        };
        result.unwrap_or_else(|e| Outcome::Io(e.kind()))
    }

    /// Human text of an outcome, for the mark's `output` and the logs.
    pub fn describe(&self, outcome: Outcome) -> String {
        let what = match &self.method {
            Method::Tcp => format!("TCP connect to {}", self.addr),
            Method::Http { .. } => format!("HTTP GET {}", self.addr),
            Method::Invalid(reason) => return format!("invalid check: {reason}"),
        };
        format!("{what}: {}", OutcomeText(outcome, self.timeout))
    }
}

struct OutcomeText(Outcome, Duration);

impl fmt::Display for OutcomeText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Outcome::Connected => f.write_str("connected"),
            Outcome::Status(s) => write!(f, "status {s}"),
            Outcome::Timeout => write!(f, "timed out after {:?}", self.1),
            Outcome::Io(kind) => write!(f, "{}", io::Error::from(kind)),
            Outcome::Closed => f.write_str("connection closed before a status line"),
            Outcome::Malformed => f.write_str("response is not HTTP/1.x"),
            Outcome::Invalid => f.write_str("invalid check"),
        }
    }
}

/// Visible ASCII only: a path or host from etcd must not be able to inject header lines.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

fn http_request(
    path: &str,
    host: Option<&str>,
    addr: SocketAddr,
    id: &InstanceId,
    checker: &str,
) -> Method {
    if !path.starts_with('/') || !is_token(path) {
        return Method::Invalid(format!(
            "check path {path:?} must start with '/' and hold only visible ASCII"
        ));
    }
    let host = match host {
        Some(h) if is_token(h) => h.to_owned(),
        Some(h) => {
            return Method::Invalid(format!("check host {h:?} must hold only visible ASCII"));
        }
        None => addr.to_string(),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wharf-healthcheck\r\n\
         X-Wharf-Instance: {id}\r\nX-Wharf-Checker: {checker}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    Method::Http {
        request: request.into_bytes().into_boxed_slice(),
    }
}

/// Starts a connection: a non-blocking socket closed with RST (zero linger: no TIME_WAIT on
/// either side for a connection used once), `connect` issued. On loopback and fast LANs the
/// handshake is usually complete when `connect` returns `EINPROGRESS`.
fn start_connect(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_linger(Some(Duration::ZERO))?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// Waits for a connection still in progress to complete (or fail).
async fn finish_connect(stream: &TcpStream) -> io::Result<()> {
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `Outcome::Timeout` if `work` is not done by `deadline`.
async fn until(
    deadline: Instant,
    work: impl Future<Output = io::Result<Outcome>>,
) -> io::Result<Outcome> {
    tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or(Ok(Outcome::Timeout))
}

/// A TCP connect check. The common case costs `socket`, `setsockopt`, `connect`,
/// `getpeername` and `close`: the event loop is involved only if the handshake is slow.
async fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<Outcome> {
    let socket = start_connect(addr)?;
    match socket.peer_addr() {
        Ok(_) => return Ok(Outcome::Connected),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    until(deadline, async {
        finish_connect(&stream).await.map(|()| Outcome::Connected)
    })
    .await
}

/// The status line read so far.
struct StatusBuf {
    buf: [u8; 32],
    filled: usize,
}

impl StatusBuf {
    fn new() -> Self {
        Self {
            buf: [0; 32],
            filled: 0,
        }
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Takes `n` more bytes (0: the peer closed); `Some` once the answer is known.
    fn add(&mut self, n: usize) -> Option<Outcome> {
        if n == 0 {
            return Some(Outcome::Closed);
        }
        self.filled += n;
        match parse_status_line(&self.buf[..self.filled]) {
            None if self.filled == self.buf.len() => Some(Outcome::Malformed),
            answer => answer,
        }
    }
}

/// An HTTP check. The request is written straight after `connect` (on loopback and fast
/// LANs the handshake is done by then) and the answer is read [`FIRST_READ_AFTER`] later
/// with a plain non-blocking `recv`: a fast backend's probe costs `socket`, `setsockopt`,
/// `connect`, `sendto`, `recvfrom`, `close` and one timer wake-up of the probe task, and
/// its socket never joins the event loop. Only slower answers (or a handshake still in
/// progress) are awaited through the event loop, which costs two more `epoll_ctl` calls
/// and a registration.
async fn http(addr: SocketAddr, request: &[u8], deadline: Instant) -> io::Result<Outcome> {
    let socket = start_connect(addr)?;
    let early = match socket.send(request) {
        Ok(n) => n,
        // Still connecting (EAGAIN): send once the event loop says the socket is writable.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let mut answer = StatusBuf::new();
    if early == request.len() {
        tokio::time::sleep_until((Instant::now() + FIRST_READ_AFTER).min(deadline)).await;
        loop {
            match (&socket).read(answer.space()) {
                Ok(n) => {
                    if let Some(outcome) = answer.add(n) {
                        return Ok(outcome);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    // Slow path: through the event loop, until the deadline.
    let mut stream = TcpStream::from_std(socket.into())?;
    until(deadline, async {
        if early < request.len() {
            if early == 0 {
                finish_connect(&stream).await?;
            }
            stream.write_all(&request[early..]).await?;
        }
        loop {
            let n = stream.read(answer.space()).await?;
            if let Some(outcome) = answer.add(n) {
                return Ok(outcome);
            }
        }
    })
    .await
}

/// Parses `HTTP/1.x NNN` from the start of a response. `None` while more bytes are needed.
pub fn parse_status_line(buf: &[u8]) -> Option<Outcome> {
    const PREFIX: &[u8] = b"HTTP/1.";
    let need = PREFIX.len() + 5; // minor digit, space, three digits
    let have = buf.len().min(need);
    // Reject early when what has arrived already cannot be a status line.
    let fits = |i: usize, b: u8| match i {
        0..7 => b == PREFIX[i],
        7 => b.is_ascii_digit(),
        8 => b == b' ',
        _ => b.is_ascii_digit(),
    };
    if !buf[..have].iter().enumerate().all(|(i, b)| fits(i, *b)) {
        return Some(Outcome::Malformed);
    }
    if buf.len() < need {
        return None;
    }
    // Something other than the reason phrase or the end of the line after the code is wrong.
    if let Some(b) = buf.get(need)
        && !matches!(b, b' ' | b'\r' | b'\n')
    {
        return Some(Outcome::Malformed);
    }
    let code = buf[9..12]
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    if (100..=599).contains(&code) {
        Some(Outcome::Status(code))
    } else {
        Some(Outcome::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK\r\n"),
            Some(Outcome::Status(200))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503"),
            Some(Outcome::Status(503))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204\r\n"),
            Some(Outcome::Status(204))
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status_line(b"HTT"), None);
        assert_eq!(parse_status_line(b""), None);
        for bad in [
            &b"SSH-2.0-OpenSSH"[..],
            b"HTTP/2 200 ",
            b"HTTP/1.1 2x0 ",
            b"HTTP/1.1 200x",
            b"HTTP/1.1 999 ",
        ] {
            assert_eq!(parse_status_line(bad), Some(Outcome::Malformed), "{bad:?}");
        }
    }

    fn instance(protocol: Protocol) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": "n1-web-0-8080", "service": "web", "version": "v1", "node": "n1",
            "addr": "127.0.0.1", "port": 8080, "protocol": protocol,
        }))
        .unwrap()
    }

    #[test]
    fn request_carries_host_and_identity_headers() {
        let spec = CheckSpec {
            path: Some("/healthz?full=1".into()),
            ..CheckSpec::default()
        };
        let t = Target::new(&instance(Protocol::Http), &spec, "hc-1");
        let Method::Http { request } = &t.method else {
            panic!("expected HTTP, got {:?}", t.method)
        };
        let text = std::str::from_utf8(request).unwrap();
        assert!(text.starts_with("GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.contains("\r\nX-Wharf-Instance: n1-web-0-8080\r\n"));
        assert!(text.contains("\r\nX-Wharf-Checker: hc-1\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let spec = CheckSpec {
            host: Some("web.internal".into()),
            ..spec
        };
        let t = Target::new(&instance(Protocol::Http), &spec, "hc-1");
        let Method::Http { request } = &t.method else {
            panic!()
        };
        assert!(
            std::str::from_utf8(request)
                .unwrap()
                .contains("\r\nHost: web.internal\r\n")
        );
    }

    #[test]
    fn tcp_when_no_path_or_tcp_protocol() {
        let t = Target::new(&instance(Protocol::Http), &CheckSpec::default(), "hc");
        assert_eq!(t.method, Method::Tcp);
        let spec = CheckSpec {
            path: Some("/h".into()),
            ..CheckSpec::default()
        };
        assert_eq!(
            Target::new(&instance(Protocol::Tcp), &spec, "hc").method,
            Method::Tcp
        );
    }

    #[test]
    fn header_injection_is_refused() {
        for path in ["/a\r\nX-Evil: 1", "nopath", "/a b"] {
            let spec = CheckSpec {
                path: Some(path.into()),
                ..CheckSpec::default()
            };
            let t = Target::new(&instance(Protocol::Http), &spec, "hc");
            assert!(matches!(t.method, Method::Invalid(_)), "{path:?}");
            assert_eq!(t.judge(Outcome::Invalid), Verdict::Fail);
        }
    }

    #[test]
    fn judging_follows_expect() {
        let spec = CheckSpec {
            path: Some("/".into()),
            expect: vec!["200-299".parse().unwrap(), "404".parse().unwrap()],
            ..CheckSpec::default()
        };
        let t = Target::new(&instance(Protocol::Http), &spec, "hc");
        assert_eq!(t.judge(Outcome::Status(204)), Verdict::Pass);
        assert_eq!(t.judge(Outcome::Status(404)), Verdict::Pass);
        assert_eq!(t.judge(Outcome::Status(301)), Verdict::Fail);
        assert_eq!(t.judge(Outcome::Timeout), Verdict::Timeout);
        assert_eq!(
            t.judge(Outcome::Io(io::ErrorKind::ConnectionRefused)),
            Verdict::Error
        );
    }
}
