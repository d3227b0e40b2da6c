//! `registrar rollout`: zero-downtime rolling upgrades and canary releases, driven from the
//! operator's shell against the local agent (containers) and etcd (split, health, state).
//!
//! - [`plan`]: pure decisions (steps, split per step, next move of a plain rollout);
//! - [`gate`]: pure judgement of a step window from the balancers' counters;
//! - [`scrape`]: fetching and parsing the balancers' `/metrics`;
//! - [`state`]: the rollout's state in etcd (`services/<svc>/rollout`), for resume/abort;
//! - [`progress`]: human or JSON lines;
//! - [`driver`]: the orchestration (begin, forward phases, promote/rollback, readiness and
//!   metrics gates, each in its own module).

pub mod driver;
pub mod gate;
pub mod plan;
pub mod progress;
pub mod scrape;
pub mod state;

pub use driver::{Action, Options, Outcome, Rollout};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("etcd: {0}")]
    Store(#[from] catalog::StoreError),
    #[error("{0}")]
    Operator(#[from] crate::operator::OperatorError),
    #[error("agent: {0}")]
    Agent(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("metrics: {0}")]
    Scrape(#[from] scrape::ScrapeError),
    #[error("{0}")]
    NotReady(String),
}
