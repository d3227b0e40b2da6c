//! The helper: one single-threaded process per container run (the `registrar` binary
//! re-executed with a hidden subcommand, or `registrar oneshot` in the foreground). It
//! creates the cgroup and per-container directories, clones the container's init into new
//! namespaces, relays signals to it, waits for it, removes everything it created and writes
//! `exit.json`. Keeping this out of the tokio agent avoids forking a multi-threaded process,
//! and lets containers outlive an agent restart.

use std::fs;
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use super::cgroup::{Cgroup, Layout};
use super::error::{Context, Result, RuntimeError};
use super::spec::{ContainerSpec, EXIT_RUNTIME_ERROR, ExitStatus, NetSpec};
use super::{bridge, init, pipe_read_to_end, pipe_write_all};

/// Stack of the cloned init until it forks the app (the child gets its own copy).
const INIT_STACK: usize = 256 * 1024;

/// What a run records in its directory for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Records {
    /// `init.pid` while running and `exit.json` at the end (the agent adopts and reports
    /// containers from them).
    Files,
    /// Nothing: a foreground run whose caller gets the status and removes the directory.
    None,
}

/// Runs the container to completion and cleans up; never panics on a setup failure (it
/// becomes an `ExitStatus` with `error`). Writes `init.pid` and `exit.json` for the agent.
pub fn run(spec: &ContainerSpec) -> ExitStatus {
    run_recording(spec, Records::Files)
}

/// [`run`] for `registrar oneshot`, whose caller removes the container directory right
/// after: skips the bookkeeping files, each a journaled write (and delete) on the host's
/// disk that only the agent reads.
pub fn run_foreground(spec: &ContainerSpec) -> ExitStatus {
    run_recording(spec, Records::None)
}

fn run_recording(spec: &ContainerSpec, records: Records) -> ExitStatus {
    let mut cgroup = None;
    let outcome = start_and_wait(spec, &mut cgroup, records);
    let oom_killed = cgroup.as_ref().is_some_and(Cgroup::oom_killed);
    let cleanup = cleanup(spec, cgroup.as_ref());
    let (code, mut error) = match outcome {
        Ok((code, err)) => (code, err),
        Err(e) => (EXIT_RUNTIME_ERROR, Some(e.to_string())),
    };
    if let Err(e) = cleanup {
        error.get_or_insert_with(|| format!("cleanup: {e}"));
    }
    let status = ExitStatus {
        code,
        error,
        oom_killed,
        finished: catalog::model::now_millis(),
    };
    if records == Records::Files {
        let _ = write_atomic(
            &ContainerSpec::exit_file(&spec.dir),
            &serde_json::to_vec(&status).unwrap_or_default(),
        );
    }
    status
}

/// Starts the container and waits for its init; returns (exit code, start error).
fn start_and_wait(
    spec: &ContainerSpec,
    cgroup: &mut Option<Cgroup>,
    records: Records,
) -> Result<(i32, Option<String>)> {
    if spec.args.is_empty() {
        return Err(RuntimeError::Setup("no command given".into()));
    }
    let _ = fs::remove_file(ContainerSpec::exit_file(&spec.dir));
    let _ = fs::remove_file(ContainerSpec::net_ready_file(&spec.dir));
    remove_tree(&spec.legacy_root_dir())?;
    for dir in [spec.upper_dir(), spec.work_dir()] {
        remove_tree(&dir)?;
        fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
    }
    let layout = Layout::detect()?;
    // A crashed earlier run may have left its cgroup behind.
    let stale = Cgroup::locate(&layout, &spec.cgroup_parent, &spec.id)?;
    if stale.exists() {
        stale.destroy(Duration::from_secs(5))?;
    }
    *cgroup = Some(Cgroup::create(
        &layout,
        &spec.cgroup_parent,
        &spec.id,
        &spec.limits,
    )?);
    let cg = cgroup.as_ref().expect("just set");

    // Take forwarded signals and SIGCHLD synchronously (the init inherits the mask and
    // sets its own; the app gets an empty one).
    let mut signals = SigSet::empty();
    for sig in init::FORWARDED {
        signals.add(sig);
    }
    signals.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).ctx(|| "block signals".into())?;

    let (from_init, to_helper) = pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let (from_helper, to_init) = pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let init_pid = clone_init(spec, to_helper, from_helper)?;
    if records == Records::Files {
        let _ = fs::write(
            ContainerSpec::init_pid_file(&spec.dir),
            init_pid.to_string(),
        );
    }

    let ready = (|| -> Result<()> {
        cg.add(init_pid.as_raw())?;
        if let NetSpec::Bridge(b) = &spec.net {
            bridge::attach(b, init_pid.as_raw())?;
            let _ = fs::write(ContainerSpec::net_ready_file(&spec.dir), b"");
        }
        pipe_write_all(&to_init, &[init::MSG_GO]).ctx(|| "start init".into())
    })();
    drop(to_init);
    if let Err(e) = ready {
        let _ = kill(init_pid, Signal::SIGKILL);
        let _ = waitpid(init_pid, None);
        return Err(e);
    }
    // EOF means the app was executed (the pipe is close-on-exec); a message means it was not.
    let report = pipe_read_to_end(&from_init).unwrap_or_default();
    drop(from_init);
    let start_error = match report.split_first() {
        Some((&init::MSG_ERROR, msg)) => Some(String::from_utf8_lossy(msg).into_owned()),
        _ => None,
    };
    let code = wait_forwarding(init_pid, &signals);
    Ok((code, start_error))
}

fn clone_init(spec: &ContainerSpec, to_helper: OwnedFd, from_helper: OwnedFd) -> Result<Pid> {
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if !matches!(spec.net, NetSpec::Host) {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let mut stack = vec![0u8; INIT_STACK];
    let mut fds = Some((to_helper, from_helper));
    let cb = Box::new(move || -> isize {
        let (to_helper, from_helper) = fds.take().expect("init runs once");
        init::main(spec, to_helper, from_helper)
    });
    // SAFETY: without CLONE_VM the child runs on a private copy of our (single-threaded)
    // address space, so running ordinary Rust code in it is as safe as after fork().
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .ctx(|| "clone container init".into())?;
    Ok(pid)
}

/// Relays signals to the init until it exits; returns its exit code (128+N for signal N).
fn wait_forwarding(init_pid: Pid, signals: &SigSet) -> i32 {
    loop {
        match waitpid(init_pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(_) => return EXIT_RUNTIME_ERROR,
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(init_pid, sig);
            }
        }
    }
}

/// Removes everything the run created except the state dir itself and its logs.
fn cleanup(spec: &ContainerSpec, cgroup: Option<&Cgroup>) -> Result<()> {
    let mut first_err = None;
    if let Some(cg) = cgroup
        && let Err(e) = cg.destroy(Duration::from_secs(5))
    {
        first_err.get_or_insert(e);
    }
    if let NetSpec::Bridge(b) = &spec.net {
        let _ = fs::remove_file(ContainerSpec::net_ready_file(&spec.dir));
        bridge::detach(b);
    }
    for dir in [spec.upper_dir(), spec.work_dir(), spec.legacy_root_dir()] {
        if let Err(e) = remove_tree(&dir) {
            first_err.get_or_insert(e);
        }
    }
    let _ = fs::remove_file(ContainerSpec::init_pid_file(&spec.dir));
    first_err.map_or(Ok(()), Err)
}

/// `rm -rf`, tolerating a missing directory.
pub fn remove_tree(dir: &std::path::Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("remove {}", dir.display())),
    }
}

pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)
}

/// Removes what a run of `spec` may have left behind when its helper died (the agent calls
/// this on start for containers whose helper is gone). Mounts need no cleanup: they lived
/// in the container's mount namespace, which died with its last process.
pub fn cleanup_leftovers(spec: &ContainerSpec) -> Result<()> {
    let layout = Layout::detect()?;
    let cg = Cgroup::locate(&layout, &spec.cgroup_parent, &spec.id)?;
    cleanup(spec, Some(&cg))
}
