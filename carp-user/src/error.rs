//! One line for an error and its causes. Messages never embed their `#[source]` (anyhow in
//! `main` prints the chain), so a log line or a status field that shows one error joins the
//! chain here: each cause once.

use std::{error::Error, fmt};

/// `message: cause: cause`, for logs and status fields.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn every_cause_shows_once() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let line = Chain(&e).to_string();
        assert!(line.starts_with("reading /x: No such file"), "{line}");
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
    }
}
