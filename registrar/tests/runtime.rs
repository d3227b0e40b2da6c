//! The bundled runtime, through `registrar oneshot` (the same helper code the agent runs),
//! on a busybox rootfs built here. Needs root, as the runtime does.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

struct Env {
    _tmp: tempfile::TempDir,
    rootfs: std::path::PathBuf,
    state: std::path::PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let state = tmp.path().join("state");
    Env {
        _tmp: tmp,
        rootfs,
        state,
    }
}

fn oneshot_cmd(e: &Env, name: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("oneshot")
        .arg("--image")
        .arg(&e.rootfs)
        .arg("--state-dir")
        .arg(&e.state)
        .args(["--name", name])
        .args(extra)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null());
    c
}

fn run(e: &Env, name: &str, extra: &[&str], cmd: &[&str]) -> Output {
    let out = oneshot_cmd(e, name, extra, cmd).output().unwrap();
    assert_nothing_left(name, &e.state);
    assert!(
        !e.state.join("oneshot").join(name).exists(),
        "state dir left behind"
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn pid_namespace_hostname_and_no_host_processes() {
    let e = env();
    let name = unique("pid");
    let o = run(
        &e,
        &name,
        &["--hostname", "box1"],
        &[
            "sh",
            "-c",
            "echo self=$$; echo host=$(hostname); ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    );
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    // PID 1 is wharf's init, the app is its first child.
    assert_eq!(lines[0], "self=2", "{out}");
    assert_eq!(lines[1], "host=box1");
    let pids: Vec<u32> = lines[2]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.iter().all(|p| *p < 10),
        "host processes visible: {pids:?}"
    );
    assert!(!pids.contains(&std::process::id()));
    assert!(
        lines[3].contains("registrar"),
        "PID 1 is the init: {}",
        lines[3]
    );
}

#[test]
fn writes_go_to_the_upper_layer_and_the_image_is_untouched() {
    let e = env();
    let name = unique("ovl");
    let mut child = ChildGuard(Some(
        oneshot_cmd(
            &e,
            &name,
            &[],
            &["sh", "-c", "echo new > /tmp/created; echo changed > /etc/marker; rm /bin/ls; echo ok; exec sleep 30"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    let mut line = String::new();
    BufReader::new(child.0.as_mut().unwrap().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ok");
    let upper = e.state.join("oneshot").join(&name).join("upper");
    assert_eq!(
        fs::read_to_string(upper.join("tmp/created")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs::read_to_string(upper.join("etc/marker")).unwrap(),
        "changed\n"
    );
    // The deletion is a whiteout in the upper layer; the image keeps its file.
    assert!(fs::symlink_metadata(upper.join("bin/ls")).is_ok());
    assert_eq!(
        fs::read_to_string(e.rootfs.join("etc/marker")).unwrap(),
        "from-image\n"
    );
    assert!(!e.rootfs.join("tmp/created").exists());
    assert!(fs::symlink_metadata(e.rootfs.join("bin/ls")).is_ok());
    child.signal(Signal::SIGTERM);
    assert_eq!(child.wait_code(), 128 + 15);
    assert_nothing_left(&name, &e.state);
    assert!(!upper.exists(), "upper layer removed on exit");
}

#[test]
fn exit_codes_are_the_apps() {
    let e = env();
    for (cmd, code) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -9 $$", 137),
        ("kill -TERM $$", 143),
    ] {
        let name = unique("exit");
        let o = run(&e, &name, &[], &["sh", "-c", cmd]);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let name = unique("exit");
    let o = run(&e, &name, &[], &["no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
}

#[test]
fn sigterm_reaches_the_app_through_init() {
    let e = env();
    let name = unique("sig");
    let mut child = ChildGuard(Some(
        oneshot_cmd(
            &e,
            &name,
            &[],
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.05; done",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap(),
    ));
    let mut out = BufReader::new(child.0.as_mut().unwrap().stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    child.signal(Signal::SIGTERM);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "got-term");
    assert_eq!(child.wait_code(), 7);
    assert_nothing_left(&name, &e.state);
}

#[test]
fn init_reaps_orphaned_zombies() {
    let e = env();
    let name = unique("zmb");
    // The subshell exits at once, so `sleep` is re-parented to PID 1; once it exits it is a
    // zombie unless init reaps it.
    let o = run(
        &e,
        &name,
        &[],
        &["sh", "-c", "(sleep 0.2 &); sleep 1; cat /proc/[0-9]*/stat"],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    for line in out.lines() {
        let state = line.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("?");
        assert_ne!(state, "Z", "zombie left: {line}");
    }
    assert!(out.lines().count() >= 2, "{out}");
}

#[test]
fn memory_limit_kills_a_process_that_exceeds_it() {
    let e = env();
    // dd allocates its 64 MiB block and fills it from /dev/zero.
    let cmd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];
    let name = unique("mem");
    let o = run(&e, &name, &["--memory", "16M"], &cmd);
    assert_eq!(
        o.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let name = unique("mem");
    let o = run(&e, &name, &["--memory", "256M"], &cmd);
    assert_eq!(o.status.code(), Some(0), "same command within the limit");
}

#[test]
fn pids_limit_is_enforced() {
    let e = env();
    let cmd = [
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8; do sleep 0.3 & done; wait; echo done",
    ];
    let name = unique("pids");
    let o = run(&e, &name, &["--pids", "5"], &cmd);
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("fork"), "fork should fail: {err}");
    let name = unique("pids");
    let o = run(&e, &name, &["--pids", "64", "--cpus", "0.5"], &cmd);
    assert!(o.status.success() && stdout(&o).contains("done"));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("fork"));
}

#[test]
fn private_network_has_only_loopback() {
    let e = env();
    let name = unique("net");
    let o = run(
        &e,
        &name,
        &["--network", "none"],
        &["sh", "-c", "ls /proc/net/dev >/dev/null; cat /proc/net/dev"],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    let ifaces: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"]);
}

#[test]
fn env_workdir_and_user() {
    let e = env();
    let name = unique("usr");
    let o = run(
        &e,
        &name,
        &[
            "--env",
            "GREETING=hi there",
            "--workdir",
            "/etc",
            "--user",
            "65534:65534",
        ],
        &["sh", "-c", "echo \"$GREETING|$(pwd)|$(id -u):$(id -g)\""],
    );
    assert_eq!(stdout(&o).trim(), "hi there|/etc|65534:65534");
}

#[test]
fn bad_image_is_a_clear_error() {
    let e = env();
    let o = Command::new(BIN)
        .args(["oneshot", "--image", "/nonexistent/image", "--state-dir"])
        .arg(&e.state)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/image"));
}

#[test]
fn a_whole_run_is_fast() {
    // A loose bound that still catches pathological waits in setup or cleanup.
    let e = env();
    let name = unique("fast");
    let start = Instant::now();
    let o = run(&e, &name, &[], &["true"]);
    assert!(o.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let _ = Path::new("/");
}
