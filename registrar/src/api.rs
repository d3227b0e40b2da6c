//! The agent's local API: one JSON request per line on a unix socket, one JSON response
//! line back. Used by `registrar run|ps|logs|stop|rm|register|deregister`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::restart::RestartPolicy;
use crate::runtime::Limits;

/// Network mode of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Host,
    Bridge,
}

/// `registrar run`: start `replicas` containers of a service version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub service: String,
    pub version: String,
    /// rootfs dir, OCI layout dir or docker-save tarball (path on the agent's host).
    pub image: String,
    /// Port of the first replica; replica i gets port + i on the host network. On a bridge
    /// every replica gets this port on its own address.
    pub port: u16,
    #[serde(default = "one")]
    pub replicas: u16,
    /// Index of the first replica: containers are named `<service>-<version>-<first + i>`
    /// (a rollout starts the replicas of a version one batch at a time).
    #[serde(default)]
    pub first: u16,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub protocol: catalog::Protocol,
    pub command: Vec<String>,
}

fn one() -> u16 {
    1
}

/// What `ps` shows about a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub name: String,
    pub service: String,
    pub version: String,
    pub instance: String,
    pub addr: String,
    pub port: u16,
    /// starting | running | serving | draining | restarting | exited
    pub state: String,
    pub helper_pid: Option<i32>,
    pub exit_code: Option<i32>,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Run(RunRequest),
    Ps,
    Logs {
        name: String,
    },
    /// Drain then stop every container matching `name` (a container name, or a service
    /// name, optionally with `version`).
    Stop {
        name: String,
        #[serde(default)]
        version: Option<String>,
        /// Time between SIGTERM and SIGKILL.
        #[serde(default = "default_grace", with = "catalog::model::duration_str")]
        grace: Duration,
    },
    Rm {
        name: String,
    },
    /// Start an exited container again with its recorded spec (a rollback brings back the
    /// old replicas a rollout had stopped).
    Start {
        name: String,
    },
    /// The run parameters of a container, as a `RunRequest` for one replica (what a
    /// rollout copies when the operator only names a new image).
    Inspect {
        name: String,
    },
    /// Register a process wharf did not start, under this node's lease.
    Register {
        service: String,
        version: String,
        addr: std::net::IpAddr,
        port: u16,
        #[serde(default)]
        protocol: catalog::Protocol,
    },
    Deregister {
        service: String,
        port: u16,
    },
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok {
        #[serde(default)]
        message: String,
    },
    Containers {
        containers: Vec<ContainerInfo>,
    },
    Logs {
        text: String,
    },
    Spec {
        run: Box<RunRequest>,
    },
    Error {
        message: String,
    },
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is `registrar agent` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent sent a malformed answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits for its answer.
pub async fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await?;
    Ok(serde_json::from_str(&answer)?)
}
