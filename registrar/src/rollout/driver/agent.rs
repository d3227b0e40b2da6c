//! The rollout's view of the local agent: this service's containers, and starting,
//! draining and removing them through the agent's socket.

use std::time::Duration;

use catalog::Store;
use serde_json::json;

use super::Rollout;
use crate::api::{self, ContainerInfo, Request, Response};
use crate::rollout::RolloutError;
use crate::rollout::state::RolloutState;

/// Time a step may take to stop one container: drain timeout + grace, plus slack.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub(super) fn alive(c: &ContainerInfo) -> bool {
    c.state != "exited"
}

impl<S: Store> Rollout<S> {
    pub(super) async fn agent(&self, req: Request) -> Result<Response, RolloutError> {
        match api::call(&self.socket, &req)
            .await
            .map_err(|e| RolloutError::Agent(e.to_string()))?
        {
            Response::Error { message } => Err(RolloutError::Agent(message)),
            r => Ok(r),
        }
    }

    /// This service's containers on the agent.
    pub(super) async fn ps(&self) -> Result<Vec<ContainerInfo>, RolloutError> {
        match self.agent(Request::Ps).await? {
            Response::Containers { containers } => Ok(containers
                .into_iter()
                .filter(|c| c.service == self.svc.as_str())
                .collect()),
            other => Err(RolloutError::Agent(format!("unexpected answer {other:?}"))),
        }
    }

    /// Alive containers of the new version.
    pub(super) async fn new_alive(&self, st: &RolloutState) -> Result<Vec<String>, RolloutError> {
        Ok(self
            .ps()
            .await?
            .into_iter()
            .filter(|c| c.version == st.to && alive(c))
            .map(|c| c.name)
            .collect())
    }

    /// Drains and stops containers together (each: draining → drain timeout → SIGTERM →
    /// grace → SIGKILL → key deleted, done by the agent).
    pub(super) async fn stop(
        &self,
        st: &mut RolloutState,
        names: &[String],
        old: bool,
    ) -> Result<(), RolloutError> {
        if names.is_empty() {
            return Ok(());
        }
        if old {
            // Recorded first: if we die while they drain, a rollback starts them again.
            st.stopped_old.extend(names.iter().cloned());
            self.save(st).await?;
        }
        self.progress.emit(
            "draining",
            || format!("draining {}", names.join(" ")),
            json!({"containers": names}),
        );
        let stops = names.iter().map(|n| {
            self.agent(Request::Stop {
                name: n.clone(),
                version: None,
                grace: STOP_GRACE,
            })
        });
        for r in futures::future::join_all(stops).await {
            match r {
                Ok(_) => {}
                // Already gone is what we want.
                Err(RolloutError::Agent(m)) if m.starts_with("no container") => {}
                Err(e) => return Err(e),
            }
        }
        self.progress.emit(
            "stopped",
            || format!("stopped {}", names.join(" ")),
            json!({"containers": names}),
        );
        Ok(())
    }

    pub(super) async fn remove(&self, names: &[String]) -> Result<(), RolloutError> {
        for n in names {
            match self.agent(Request::Rm { name: n.clone() }).await {
                Ok(_) => {}
                Err(RolloutError::Agent(m)) if m.starts_with("no container") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
