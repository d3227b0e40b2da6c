//! The local API on the agent's unix socket: one JSON request line in, one JSON response
//! line out, dispatched to the operation that serves it.

use std::sync::Arc;

use catalog::Store;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::Shared;
use super::containers::{inspect, logs, ps, rm, start_again, stop};
use super::external::{deregister_external, register_external};
use super::launch::handle_run;
use crate::api::{Request, Response};

pub(super) async fn serve_conn<S: Store + Clone>(sh: Arc<Shared<S>>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(1 << 20);
    let resp = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&sh, req).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        },
        Err(e) => Response::Error {
            message: format!("read: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&resp).expect("response serializes");
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

async fn handle<S: Store + Clone>(sh: &Arc<Shared<S>>, req: Request) -> Response {
    let op = match &req {
        Request::Run(_) => "run",
        Request::Ps => "ps",
        Request::Logs { .. } => "logs",
        Request::Stop { .. } => "stop",
        Request::Rm { .. } => "rm",
        Request::Start { .. } => "start",
        Request::Inspect { .. } => "inspect",
        Request::Register { .. } => "register",
        Request::Deregister { .. } => "deregister",
    };
    sh.metrics.api_requests.with_label_values(&[op]).inc();
    let r = match req {
        Request::Run(run) => handle_run(sh, run).await,
        Request::Ps => Ok(Response::Containers { containers: ps(sh) }),
        Request::Logs { name } => logs(sh, &name),
        Request::Stop {
            name,
            version,
            grace,
        } => stop(sh, &name, version.as_deref(), grace).await,
        Request::Rm { name } => rm(sh, &name),
        Request::Start { name } => start_again(sh, &name),
        Request::Inspect { name } => inspect(sh, &name),
        Request::Register {
            service,
            version,
            addr,
            port,
            protocol,
        } => register_external(sh, &service, &version, addr, port, protocol).await,
        Request::Deregister { service, port } => deregister_external(sh, &service, port).await,
    };
    r.unwrap_or_else(|message| Response::Error { message })
}

pub(super) fn ok(message: impl Into<String>) -> Response {
    Response::Ok {
        message: message.into(),
    }
}
