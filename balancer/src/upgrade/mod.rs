//! Zero-downtime self-upgrade: the running balancer starts a new binary, hands it its
//! listening sockets over a unix socket (SCM_RIGHTS), waits until it reports ready, then
//! stops accepting and drains (the usual SIGTERM path) while the new process serves.
//!
//! Old process ([`hand_over`]): binds a private unix socket, starts the binary the process
//! was started from (same arguments) with `BALANCER_UPGRADE_FROM=<socket>`, accepts its
//! connection, sends `{"names": [...]}` with one descriptor per name attached, and waits
//! for a `ready` line. Any failure (the child exits, no ready in time) kills the child and
//! leaves the old process serving as before.
//!
//! New process ([`inherit`]): connects, receives the sockets, uses those whose listener
//! name and address match its configuration (binds the others itself), and writes
//! `ready <pid>` once every listener accepts.
//!
//! The descriptors are duplicates of the same kernel sockets: both processes accept from
//! one queue until the old one stops, so no connection attempt is refused in between.

pub mod control;
pub mod fds;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment variable naming the handover socket for a new process.
pub const ENV: &str = "BALANCER_UPGRADE_FROM";
/// Name under which the admin socket travels.
pub const ADMIN: &str = "@admin";

/// Duplicates of the listening sockets, by listener name (and [`ADMIN`]), kept current by
/// `run` (listeners added or removed on reload).
pub type Sockets = Arc<Mutex<HashMap<String, std::net::TcpListener>>>;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("new process {pid} did not connect within {0:?}", timeout)]
    NoConnect { pid: u32, timeout: Duration },
    #[error("new process {pid} failed before reporting ready: {msg}")]
    NotReady { pid: u32, msg: String },
    #[error("receiving sockets from the old process: {0}")]
    Receive(String),
}

fn lock(s: &Sockets) -> std::sync::MutexGuard<'_, HashMap<String, std::net::TcpListener>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A started new process that reported ready.
pub struct Upgraded {
    pub child: Child,
    pub pid: u32,
}

/// Old side: starts `exe args…`, hands it `sockets`, waits until it is ready (blocking;
/// run it on a blocking thread).
pub fn hand_over(
    exe: &Path,
    args: &[OsString],
    sockets: &Sockets,
    ready_timeout: Duration,
) -> Result<Upgraded, UpgradeError> {
    let path = std::env::temp_dir().join(format!(
        "balancer-upgrade-{}-{}.sock",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let sock_err = |source| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(sock_err)?;
    // Only our user may connect (the socket hands out listening sockets).
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let result = start_and_wait(exe, args, sockets, ready_timeout, &listener, &path);
    let _ = std::fs::remove_file(&path);
    result
}

fn start_and_wait(
    exe: &Path,
    args: &[OsString],
    sockets: &Sockets,
    ready_timeout: Duration,
    listener: &UnixListener,
    path: &Path,
) -> Result<Upgraded, UpgradeError> {
    let mut child = Command::new(exe)
        .args(args)
        .env(ENV, path)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: exe.to_owned(),
            source,
        })?;
    let pid = child.id();
    let fail = |child: &mut Child, e: UpgradeError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    let deadline = Instant::now() + ready_timeout;
    // Accept the child's connection, watching for it to die first.
    listener
        .set_nonblocking(true)
        .map_err(|source| UpgradeError::Socket {
            path: path.to_owned(),
            source,
        })?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                return Err(fail(
                    &mut child,
                    UpgradeError::NotReady {
                        pid,
                        msg: e.to_string(),
                    },
                ));
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(UpgradeError::NotReady {
                pid,
                msg: format!("exited with {st}"),
            });
        }
        if Instant::now() >= deadline {
            return Err(fail(
                &mut child,
                UpgradeError::NoConnect {
                    pid,
                    timeout: ready_timeout,
                },
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let io = |e: std::io::Error| UpgradeError::NotReady {
        pid,
        msg: e.to_string(),
    };
    let sent = (|| {
        stream.set_nonblocking(false)?;
        let map = lock(sockets);
        let names: Vec<&String> = map.keys().collect();
        let raw: Vec<_> = map.values().map(|s| s.as_raw_fd()).collect();
        let payload = serde_json::to_vec(&serde_json::json!({ "names": names }))?;
        fds::send(&stream, &payload, &raw)
    })();
    if let Err(e) = sent {
        return Err(fail(&mut child, io(e)));
    }
    // Wait for `ready <pid>`; EOF means the child gave up (it logs why).
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(
                &mut child,
                UpgradeError::NotReady {
                    pid,
                    msg: format!("no ready within {ready_timeout:?}"),
                },
            ));
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err(fail(
                    &mut child,
                    UpgradeError::NotReady {
                        pid,
                        msg: "closed the handover socket (see its log)".into(),
                    },
                ));
            }
            Ok(_) if line.starts_with("ready") => return Ok(Upgraded { child, pid }),
            Ok(_) => line.clear(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(UpgradeError::NotReady {
                        pid,
                        msg: format!("exited with {st}"),
                    });
                }
            }
            Err(e) => return Err(fail(&mut child, io(e))),
        }
    }
}

/// New side: sockets received from the old process, and the line to report ready on.
pub struct Inherited {
    stream: UnixStream,
    pub sockets: HashMap<String, std::net::TcpListener>,
}

impl Inherited {
    /// Takes the socket for `name` if it listens on `addr` (port 0 matches any port).
    pub fn take(
        &mut self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let s = self.sockets.remove(name)?;
        let local = s.local_addr().ok()?;
        let same = local.ip() == addr.ip() && (addr.port() == 0 || local.port() == addr.port());
        if same {
            Some(s)
        } else {
            tracing::info!(listener = name, %local, %addr, "inherited socket has another address; binding anew");
            None
        }
    }

    /// Tells the old process to stop accepting and drain.
    pub fn ready(&mut self) -> std::io::Result<()> {
        writeln!(self.stream, "ready {}", std::process::id())
    }
}

/// Receives the sockets if this process was started by [`hand_over`].
pub fn inherit() -> Result<Option<Inherited>, UpgradeError> {
    let Some(path) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let err = |e: std::io::Error| UpgradeError::Receive(e.to_string());
    let stream = UnixStream::connect(&path).map_err(err)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (n, fds) = fds::recv(&stream, &mut buf).map_err(err)?;
    #[derive(serde::Deserialize)]
    struct Msg {
        names: Vec<String>,
    }
    let msg: Msg = serde_json::from_slice(&buf[..n])
        .map_err(|e| UpgradeError::Receive(format!("bad handover message: {e}")))?;
    if msg.names.len() != fds.len() {
        return Err(UpgradeError::Receive(format!(
            "{} names but {} sockets",
            msg.names.len(),
            fds.len()
        )));
    }
    let sockets = msg
        .names
        .into_iter()
        .zip(fds)
        .map(|(n, fd)| (n, std::net::TcpListener::from(fd)))
        .collect();
    Ok(Some(Inherited { stream, sockets }))
}
