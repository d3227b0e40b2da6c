//! A container's helper process as the agent sees it: its own child, or one adopted from
//! a previous agent (watched through a pidfd, since only a parent can `wait` for it).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::runtime::process::{exit_watch, start_time};
use crate::runtime::{ContainerSpec, ExitStatus};

enum Kind {
    Child(tokio::process::Child),
    Adopted(AsyncFd<OwnedFd>),
}

pub struct Proc {
    pub pid: i32,
    pub start: Option<u64>,
    dir: PathBuf,
    kind: Kind,
}

impl Proc {
    /// Starts `helper_exe __helper <dir>` in its own process group, with stdout and stderr
    /// appended to the container's log, so that it outlives the agent.
    pub fn spawn(helper_exe: &Path, dir: &Path, log: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(ContainerSpec::exit_file(dir));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = tokio::process::Command::new(helper_exe)
            .arg("__helper")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        Ok(Self {
            pid,
            start: start_time(pid),
            dir: dir.to_path_buf(),
            kind: Kind::Child(child),
        })
    }

    /// Takes over a helper started by an earlier agent, if it is still the same process.
    pub fn adopt(pid: i32, start: Option<u64>, dir: &Path) -> Option<Self> {
        if start.is_none() || start_time(pid) != start {
            return None;
        }
        let fd = exit_watch(pid).ok()?;
        Some(Self {
            pid,
            start,
            dir: dir.to_path_buf(),
            kind: Kind::Adopted(fd),
        })
    }

    /// Waits for the helper to exit; returns the container's exit code. Cancel-safe.
    pub async fn wait(&mut self) -> i32 {
        let fallback = match &mut self.kind {
            Kind::Child(c) => match c.wait().await {
                Ok(s) => s.code().unwrap_or(128 + 9),
                Err(_) => 128 + 9,
            },
            Kind::Adopted(fd) => {
                let _ = fd.readable().await;
                128 + 9
            }
        };
        read_exit(&self.dir).map(|s| s.code).unwrap_or(fallback)
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// SIGKILLs the container's init (which takes the whole pid namespace down and lets the
    /// helper clean up); the helper itself if the init is unknown.
    pub fn kill_container(&self) {
        match std::fs::read_to_string(ContainerSpec::init_pid_file(&self.dir))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            Some(init) => {
                let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
            }
            None => self.signal(Signal::SIGKILL),
        }
    }
}

pub fn read_exit(dir: &Path) -> Option<ExitStatus> {
    serde_json::from_slice(&std::fs::read(ContainerSpec::exit_file(dir)).ok()?).ok()
}
