//! Printing an error with its causes, for logs (anyhow's `{:#}` does this at the command line).

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, joined by `: `.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;
    use crate::fetch::FetchError;

    #[test]
    fn shows_every_cause() {
        let io = std::io::Error::other("disk on fire");
        let e = FetchError::backend("/cache/x", io);
        assert_eq!(e.to_string(), "/cache/x");
        assert_eq!(Chain(&e).to_string(), "/cache/x: disk on fire");
    }
}
