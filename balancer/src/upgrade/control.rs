//! The running balancer's side of an upgrade request: SIGUSR2 or a `upgrade` line on the
//! control socket (`[upgrade] socket`, what `balancer upgrade` writes to) start
//! [`super::hand_over`]; on success the process leaves the admin port to the new one,
//! drains and exits (`Control::HandOver`).
//!
//! PID 1 (one process per container): the container lives as long as PID 1, so the old
//! process does not exit after draining; it stays as a small parent that forwards
//! signals to the serving process and reaps children, and exits with the status of the
//! last one.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;

use super::{Sockets, Upgraded};
use crate::Control;

pub struct Upgrader {
    /// The binary this process was started from (read at start: after the file is replaced
    /// on disk, /proc/self/exe names the deleted old inode).
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub sockets: Sockets,
    pub ready_timeout: Duration,
    pub control: UnboundedSender<Control>,
    pub pid_file: Option<PathBuf>,
    /// Serialises upgrades; holds the new process once one succeeded.
    done: tokio::sync::Mutex<Option<u32>>,
    child: Mutex<Option<Upgraded>>,
}

impl Upgrader {
    pub fn new(
        args: Vec<OsString>,
        sockets: Sockets,
        ready_timeout: Duration,
        control: UnboundedSender<Control>,
        pid_file: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            args,
            sockets,
            ready_timeout,
            control,
            pid_file,
            done: tokio::sync::Mutex::new(None),
            child: Mutex::new(None),
        })
    }

    /// Runs one upgrade; the new process's pid.
    pub async fn upgrade(self: &Arc<Self>) -> Result<u32, String> {
        let mut done = self.done.lock().await;
        if let Some(pid) = *done {
            return Err(format!("already handed over to pid {pid}; draining"));
        }
        tracing::info!(exe = %self.exe.display(), "upgrade: starting the new process");
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            super::hand_over(&me.exe, &me.args, &me.sockets, me.ready_timeout)
        })
        .await
        .map_err(|e| e.to_string())?;
        match r {
            Ok(up) => {
                let pid = up.pid;
                tracing::info!(pid, "upgrade: new process ready; draining and exiting");
                *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(up);
                *done = Some(pid);
                let _ = self.control.send(Control::HandOver);
                Ok(pid)
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                Err(e.to_string())
            }
        }
    }

    /// Whether an upgrade handed the sockets over (the pid file is the new process's then).
    pub fn handed_over(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// After draining: as PID 1 with a successor, stay its parent until no child is left.
    /// Returns the exit code to use.
    pub async fn finish(&self) -> i32 {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(up) = child else { return 0 };
        if std::process::id() != 1 {
            // Reparented to init (or the nearest subreaper); it is on its own now.
            drop(up);
            return 0;
        }
        tracing::info!(
            pid = up.pid,
            "PID 1: staying as the parent of the new process"
        );
        stay_as_init(up.pid, self.pid_file.clone()).await
    }
}

/// PID 1 after handing over: forwards TERM/INT/HUP/USR2 to the serving process (the pid
/// file's, else the direct child), reaps every child, exits when none is left.
async fn stay_as_init(first: u32, pid_file: Option<PathBuf>) -> i32 {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
    ];
    let mut streams: Vec<_> = kinds
        .iter()
        .filter_map(|(k, s)| signal(*k).ok().map(|st| (st, *s)))
        .collect();
    let serving = |pid_file: &Option<PathBuf>| {
        pid_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.trim().parse::<i32>().ok())
            .unwrap_or(first as i32)
    };
    let mut code = 0;
    loop {
        let forward = {
            let waits = streams.iter_mut().map(|(st, sig)| {
                let sig = *sig;
                Box::pin(async move {
                    st.recv().await;
                    sig
                })
            });
            let waits: Vec<_> = waits.collect();
            if waits.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            } else {
                tokio::select! {
                    (sig, _, _) = futures::future::select_all(waits) => Some(sig),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => None,
                }
            }
        };
        if let Some(sig) = forward {
            let _ = kill(Pid::from_raw(serving(&pid_file)), sig);
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, c)) => code = c,
                Ok(WaitStatus::Signaled(_, s, _)) => code = 128 + s as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(_) => return code, // ECHILD: nobody left
            }
        }
    }
}

/// Answers `upgrade` lines on the control socket with `ok <pid>` or `error <why>`.
pub fn spawn_control_socket(path: PathBuf, upgrader: Arc<Upgrader>) -> std::io::Result<()> {
    // A previous process's socket file (it may still be draining): take the name over.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let upgrader = upgrader.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = BufReader::new(r);
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match line.trim() {
                    "upgrade" => match upgrader.upgrade().await {
                        Ok(pid) => format!("ok {pid}\n"),
                        Err(e) => format!("error {e}\n"),
                    },
                    other => format!("error unknown command {other:?} (try: upgrade)\n"),
                };
                let _ = w.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// `balancer upgrade`: asks the balancer listening on `path` to upgrade itself.
pub fn request(path: &std::path::Path, timeout: Duration) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "{}: {e} (is the balancer running with [upgrade] socket?)",
            path.display()
        )
    })?;
    s.write_all(b"upgrade\n").map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(timeout));
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer: {e}"))?;
    match line.trim().strip_prefix("ok ") {
        Some(pid) => Ok(pid.to_owned()),
        None => Err(line.trim().trim_start_matches("error ").to_owned()),
    }
}
