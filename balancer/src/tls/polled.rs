//! Files polled for changes — a listener's certificate, key and OCSP response, a
//! service's client certificate and key: their contents compared, poll after poll, with
//! what was last seen. A change is handed out once; a file that cannot be read is reported
//! once per change of what the files hold (unreadable ones count as empty), not every poll.

use std::path::PathBuf;

use super::certs::{self, CertError};

pub struct Polled {
    paths: Vec<PathBuf>,
    /// What the files held at the last poll (unreadable ones as empty).
    seen: Vec<Vec<u8>>,
}

/// What a poll found.
pub enum Poll {
    Same,
    /// New contents, one per path: to load. They now count as seen, so contents that fail
    /// to load are reported once.
    Changed(Vec<Vec<u8>>),
    /// A file could not be read (first time for what the files hold now).
    Unreadable(CertError),
}

impl Polled {
    /// Reads `paths` for the first load: the watch and the contents.
    pub fn read(paths: Vec<PathBuf>) -> Result<(Self, Vec<Vec<u8>>), CertError> {
        let contents = read_all(&paths)?;
        let seen = contents.clone();
        Ok((Self { paths, seen }, contents))
    }

    pub fn poll(&mut self) -> Poll {
        match read_all(&self.paths) {
            Ok(now) if now == self.seen => Poll::Same,
            Ok(now) => {
                self.seen.clone_from(&now);
                Poll::Changed(now)
            }
            Err(e) => {
                let now: Vec<_> = (self.paths.iter())
                    .map(|p| std::fs::read(p).unwrap_or_default())
                    .collect();
                if now == self.seen {
                    return Poll::Same;
                }
                self.seen = now;
                Poll::Unreadable(e)
            }
        }
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, CertError> {
    paths.iter().map(|p| certs::read(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_once_and_failures_once_per_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "x").unwrap();
        let (mut p, first) = Polled::read(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(first, [b"1".to_vec(), b"x".to_vec()]);
        assert!(matches!(p.poll(), Poll::Same));
        std::fs::write(&a, "2").unwrap();
        assert!(matches!(p.poll(), Poll::Changed(c) if c[0] == b"2"));
        assert!(matches!(p.poll(), Poll::Same));
        std::fs::remove_file(&b).unwrap();
        assert!(matches!(p.poll(), Poll::Unreadable(_)));
        assert!(matches!(p.poll(), Poll::Same), "reported once");
        std::fs::write(&b, "x").unwrap();
        assert!(matches!(p.poll(), Poll::Changed(_)), "back: loaded again");
    }
}
