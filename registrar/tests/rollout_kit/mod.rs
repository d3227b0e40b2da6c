//! Helpers of the rollout tests: the stack (`stack`), the load generator (`load`), and
//! running `registrar rollout` and reading back what it left (here).

pub mod load;
pub mod stack;

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncBufReadExt;

use crate::common;
use load::AFTER;
use stack::Stack;

/// Runs `registrar rollout` with `--json`, moving the load's marker at each step event.
pub async fn rollout(
    s: &Stack,
    args: &[&str],
    marker: &AtomicU32,
) -> Result<(i32, Vec<serde_json::Value>)> {
    rollout_until(s, args, marker, None).await
}

/// Like `rollout`, but SIGKILLs the command at the first event named `kill_at` (exit -1).
pub async fn rollout_until(
    s: &Stack,
    args: &[&str],
    marker: &AtomicU32,
    kill_at: Option<&str>,
) -> Result<(i32, Vec<serde_json::Value>)> {
    let mut child = tokio::process::Command::new(common::BIN)
        .arg("rollout")
        .args(args)
        .arg("--json")
        .env("WHARF_STATE_DIR", &s.agent.state)
        .env("WHARF_ETCD", &s.agent.endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut events = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(180), lines.next_line())
        .await
        .context("rollout made no progress for 3 minutes")??
    {
        eprintln!("rollout: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        match v["event"].as_str() {
            Some("step") => {
                marker.store(v["percent"].as_u64().unwrap_or(0) as u32, Ordering::SeqCst)
            }
            Some("window") | Some("rollback") | Some("draining") => {
                marker.store(0, Ordering::SeqCst)
            }
            _ => {}
        }
        let kill = kill_at.is_some() && v["event"].as_str() == kill_at;
        events.push(v);
        if kill {
            child.kill().await?;
            return Ok((-1, events));
        }
    }
    let code = child.wait().await?.code().unwrap_or(-1);
    marker.store(AFTER, Ordering::SeqCst);
    Ok((code, events))
}

pub fn containers(s: &Stack) -> Vec<serde_json::Value> {
    serde_json::from_str(&s.agent.cli_ok(&["ps", "--json"])).unwrap()
}

pub async fn split(s: &Stack) -> serde_json::Value {
    let store = s.etcd.store().await.unwrap();
    let key = catalog::Keyspace::default().config(&"web".parse().unwrap());
    let kv = catalog::Store::get(&store, &key).await.unwrap().unwrap();
    let c: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    c.get("split").cloned().unwrap_or(serde_json::json!({}))
}
