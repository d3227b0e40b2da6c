//! PID 1 of the container. Cloned by the helper into new pid, mount, uts, ipc (and maybe
//! net) namespaces, it builds the root filesystem, then forks the app and stays
//! as a tiny init: it forwards signals to the app and reaps every zombie (orphans are
//! re-parented to it), and exits with the app's status (128+N for a signal) so the helper
//! sees the app's result. When it exits the kernel kills everything left in the namespace.
//!
//! The kernel never applies a default action for a signal PID 1 has no handler for, so we
//! install a no-op handler for each forwarded signal (and keep them blocked; we take them
//! synchronously with `sigwait`).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{
    ForkResult, Gid, Pid, Uid, chdir, execve, fork, setgid, setgroups, sethostname, setuid,
};

use super::error::{Context, Result, RuntimeError};
use super::spec::{ContainerSpec, DEFAULT_PATH, EXIT_EXEC_FAILED, NetSpec};
use super::{pipe_read_byte, pipe_write_all, rootfs};

/// Signals the init passes on to the app.
pub const FORWARDED: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

/// Tag of an error message on the init → helper pipe (EOF without one = the app was
/// executed).
pub const MSG_ERROR: u8 = b'E';
/// What the helper sends once the cgroup and network are ready.
pub const MSG_GO: u8 = b'G';

extern "C" fn noop_handler(_: libc::c_int) {}

/// Runs as the container's PID 1; never returns.
pub fn main(spec: &ContainerSpec, to_helper: OwnedFd, from_helper: OwnedFd) -> ! {
    // If the helper dies (even SIGKILL), take the whole container with us.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    match setup(spec, &to_helper, &from_helper) {
        Ok(app) => {
            drop(to_helper);
            drop(from_helper);
            let code = reap_until(app);
            std::process::exit(code);
        }
        Err(e) => {
            let mut msg = vec![MSG_ERROR];
            msg.extend_from_slice(e.to_string().as_bytes());
            let _ = pipe_write_all(&to_helper, &msg);
            std::process::exit(super::spec::EXIT_RUNTIME_ERROR);
        }
    }
}

/// Namespaces, filesystem, then the app. Returns the app's pid.
fn setup(spec: &ContainerSpec, to_helper: &OwnedFd, from_helper: &OwnedFd) -> Result<Pid> {
    // Wait until the helper has put us into the cgroup and set up the network.
    match pipe_read_byte(from_helper) {
        Ok(Some(MSG_GO)) => {}
        _ => {
            return Err(RuntimeError::Setup(
                "helper gave up before the container started".into(),
            ));
        }
    }
    sethostname(&spec.hostname).ctx(|| format!("sethostname {:?}", spec.hostname))?;
    rootfs::enter(spec)?;
    if !matches!(spec.net, NetSpec::Host) {
        super::net::loopback_up()?;
    }
    install_handlers()?;
    let argv = cstrings(&spec.args)?;
    let envp = cstrings(
        &spec
            .full_env()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
    )?;
    // SAFETY: the helper process is single-threaded (re-exec of the binary, no tokio), so
    // the child may run arbitrary code before exec.
    match unsafe { fork() }.ctx(|| "fork app".into())? {
        ForkResult::Child => {
            let err = exec_app(spec, &argv, &envp);
            let mut msg = vec![MSG_ERROR];
            msg.extend_from_slice(err.to_string().as_bytes());
            let _ = pipe_write_all(to_helper, &msg);
            std::process::exit(EXIT_EXEC_FAILED);
        }
        ForkResult::Parent { child } => Ok(child),
    }
}

fn install_handlers() -> Result<()> {
    let mut set = SigSet::empty();
    for sig in FORWARDED {
        let action = nix::sys::signal::SigAction::new(
            SigHandler::Handler(noop_handler),
            nix::sys::signal::SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(sig, &action) }.ctx(|| format!("sigaction {sig}"))?;
        set.add(sig);
    }
    set.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).ctx(|| "block signals".into())
}

/// In the app's process: drop to the spec's user, enter its cwd, exec. Returns only on error.
fn exec_app(spec: &ContainerSpec, argv: &[CString], envp: &[CString]) -> RuntimeError {
    let r = (|| -> Result<()> {
        // Handlers reset on exec; the mask does not.
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .ctx(|| "unblock signals".into())?;
        if spec.uid != 0 || spec.gid != 0 {
            setgroups(&[Gid::from_raw(spec.gid)]).ctx(|| "setgroups".into())?;
            setgid(Gid::from_raw(spec.gid)).ctx(|| format!("setgid {}", spec.gid))?;
            setuid(Uid::from_raw(spec.uid)).ctx(|| format!("setuid {}", spec.uid))?;
        }
        chdir(Path::new(&spec.cwd)).ctx(|| format!("chdir {:?}", spec.cwd))?;
        let path = resolve(&spec.args[0], spec)?;
        let e = execve(&path, argv, envp).unwrap_err();
        Err(RuntimeError::Sys {
            what: format!("exec {:?}", spec.args[0]),
            source: e,
        })
    })();
    r.err()
        .unwrap_or_else(|| RuntimeError::Setup("exec returned".into()))
}

/// Finds the program the way a shell would: as given when it has a '/', else in the
/// container's PATH (looked up inside the new root, which we are already in).
fn resolve(arg0: &str, spec: &ContainerSpec) -> Result<CString> {
    if arg0.contains('/') {
        return CString::new(arg0).map_err(|_| RuntimeError::Setup("NUL in command".into()));
    }
    let env = spec.full_env();
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(arg0);
        if nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
            && candidate.is_file()
        {
            return CString::new(candidate.to_string_lossy().as_bytes())
                .map_err(|_| RuntimeError::Setup("NUL in command".into()));
        }
    }
    Err(RuntimeError::Setup(format!(
        "{arg0:?}: command not found in PATH {path}"
    )))
}

fn cstrings(items: &[String]) -> Result<Vec<CString>> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| RuntimeError::Setup(format!("NUL byte in {s:?}")))
        })
        .collect()
}

/// The init loop: forward signals to the app, reap everything, return the app's exit code.
fn reap_until(app: Pid) -> i32 {
    let mut set = SigSet::empty();
    for sig in FORWARDED {
        set.add(sig);
    }
    set.add(Signal::SIGCHLD);
    loop {
        // Reap first: the app may have exited before we started waiting for signals.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == app => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == app => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue, // an orphan reaped
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(app, sig);
            }
        }
    }
}
