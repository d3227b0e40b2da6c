//! The runtime's error type: every failure says what it was doing.

/// Why the runtime could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Setup(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Attaches "what we were doing" to io and nix errors.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Io {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Sys {
            what: what(),
            source,
        })
    }
}
