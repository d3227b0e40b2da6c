//! Running `check_cmd` and `reload_cmd`: `/bin/sh -c`, in its own process group, with a
//! timeout after which the whole group is killed (a reload script's children too), and the
//! output kept for the error message.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` exited with {status}: {output}")]
    Failed {
        cmd: String,
        status: String,
        output: String,
    },
    #[error("`{cmd}` did not finish within {timeout:?}; its process group was killed")]
    TimedOut { cmd: String, timeout: Duration },
}

/// Keep error messages readable: the tail of the output is what explains a failure.
const OUTPUT_LIMIT: usize = 2048;

/// Replaces `{{src}}` and `{{dest}}` (also `{{ src }}` and confd's `{{.src}}`) by the
/// shell-quoted paths.
pub fn substitute(cmd: &str, src: &str, dest: &str) -> String {
    let mut out = cmd.to_owned();
    for (name, value) in [("src", src), ("dest", dest)] {
        // `{{.src}}` is confd's spelling, kept for migrated resources.
        for pat in [
            format!("{{{{{name}}}}}"),
            format!("{{{{ {name} }}}}"),
            format!("{{{{.{name}}}}}"),
        ] {
            out = out.replace(&pat, &shell_quote(value));
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs `cmd` through `/bin/sh -c`; Ok when it exits 0 within `timeout`.
pub async fn run(cmd: &str, timeout: Duration) -> Result<String, CommandError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            cmd: cmd.to_owned(),
            source,
        })?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    // Read both pipes while waiting (a full pipe would block the command), into buffers
    // that stay readable if the readers never see EOF: a reload command may leave a daemon
    // behind that inherited them.
    let output = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        let output = output.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        })
    })
    .collect();
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let drained = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), drained).await;
    let text = {
        let bytes = output.lock().unwrap_or_else(|e| e.into_inner());
        tail(String::from_utf8_lossy(&bytes).trim())
    };
    match status {
        Ok(Ok(s)) if s.success() => Ok(text),
        Ok(Ok(s)) => Err(CommandError::Failed {
            cmd: cmd.to_owned(),
            status: s.to_string(),
            output: text,
        }),
        Ok(Err(e)) => Err(CommandError::Failed {
            cmd: cmd.to_owned(),
            status: format!("unknown status ({e})"),
            output: text,
        }),
        Err(_) => {
            // The shell may have forked: kill the whole group, not just the shell. The shell
            // itself is killed and reaped by `kill_on_drop`.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            Err(CommandError::TimedOut {
                cmd: cmd.to_owned(),
                timeout,
            })
        }
    }
}

fn tail(s: &str) -> String {
    if s.len() <= OUTPUT_LIMIT {
        return s.to_owned();
    }
    let mut start = s.len() - OUTPUT_LIMIT;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_quoted_paths() {
        assert_eq!(
            substitute(
                "haproxy -c -f {{src}} # {{ dest }} {{.src}}",
                "/a/.b c",
                "/d"
            ),
            "haproxy -c -f '/a/.b c' # /d '/a/.b c'"
        );
    }

    #[tokio::test]
    async fn success_failure_and_output() {
        assert_eq!(run("echo hi", Duration::from_secs(5)).await.unwrap(), "hi");
        let err = run("echo bad >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exit status: 3") && err.contains("bad"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The grandchild outlives the shell unless the whole group is killed.
        let cmd = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let err = run(&cmd, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = wharf_tests::eventually("sleep to die", Duration::from_secs(5), || async {
            // Zombie or gone both mean killed; a zombie's state is 'Z'.
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => Some(()),
                Ok(s) if s.split_whitespace().nth(2) == Some("Z") => Some(()),
                Ok(_) => None,
            }
        })
        .await;
        assert!(gone.is_ok(), "grandchild {pid} still running");
    }
}
