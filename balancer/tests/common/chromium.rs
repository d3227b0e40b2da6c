//! A headless Chromium (Debian `chromium`) driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on fd 3, answers on fd 4, NUL-separated JSON), so
//! a test can open a page once and watch it change without reloading.
//!
//! The browser runs in its own session / process group (`setsid`), which `Drop` kills as
//! a whole after asking it to close.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Longest wait for one DevTools answer (page loads are polled separately).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Chromium {
    child: Child,
    input: ChildStdin,
    /// Messages read from fd 4 by a thread, so that every wait has a deadline.
    output: mpsc::Receiver<Vec<u8>>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
    pub log: PathBuf,
}

/// Where Debian installs it; `None` means the test cannot run here (and says so).
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Chromium {
    /// Starts the browser with everything that reaches outside the machine turned off.
    pub fn start(log_dir: &Path) -> Result<Self> {
        let bin = binary()
            .context("chromium is not installed (apt-get install chromium; .ci/run installs it)")?;
        let profile = tempfile::Builder::new()
            .prefix("wharf-chromium-")
            .tempdir()?;
        let log = log_dir.join("chromium.log");
        let flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-breakpad",
            "--disable-domain-reliability",
            "--no-first-run",
            "--no-default-browser-check",
            "--metrics-recording-only",
            "--window-size=1280,1000",
            "--remote-debugging-pipe",
        ];
        let script = format!(
            "exec setsid {} {} --user-data-dir={} about:blank 3<&0 4>&1 0</dev/null 1>/dev/null",
            bin.display(),
            flags.join(" "),
            profile.path().display()
        );
        let mut child = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting chromium")?;
        let input = child.stdin.take().context("stdin")?;
        let mut pipe = BufReader::new(child.stdout.take().context("stdout")?);
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut buf = Vec::new();
                match pipe.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if tx.send(buf).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Self {
            child,
            input,
            output,
            next_id: 0,
            session: None,
            _profile: profile,
            log,
        })
    }

    /// Sends one command (to the attached page when there is one) and waits for its answer,
    /// skipping events.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session
            && !method.starts_with("Target.")
            && !method.starts_with("Browser.")
        {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.input.write_all(&bytes)?;
        self.input.flush()?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let buf = match self.output.recv_timeout(left) {
                Ok(b) => b,
                Err(e) => bail!(
                    "{method}: no answer from chromium ({e}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            };
            let v: Value = serde_json::from_slice(&buf)?;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    pub fn open(&mut self, url: &str) -> Result<()> {
        let t = self.call("Target.createTarget", json!({"url": url}))?;
        let target = t["targetId"].as_str().context("targetId")?.to_owned();
        let a = self.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )?;
        self.session = Some(a["sessionId"].as_str().context("sessionId")?.to_owned());
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page; its JSON value.
    pub fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is `true`, or fails after `timeout` with the last value of
    /// `explain`.
    pub fn wait_for(
        &mut self,
        what: &str,
        expr: &str,
        explain: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(expr)? == json!(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not seen within {timeout:?}; page: {}",
                    self.eval(explain)?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the page.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let data = base64_decode(r["data"].as_str().context("screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, data)?;
        Ok(())
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Ask politely without waiting for the answer (a hung browser is killed below).
        let _ = self
            .input
            .write_all(b"{\"id\":999999,\"method\":\"Browser.close\",\"params\":{}}\0")
            .and_then(|_| self.input.flush());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The whole process group (renderer, zygote, gpu helpers) by the browser's pid.
        let pid = self.child.id() as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c).context("bad base64")? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}
