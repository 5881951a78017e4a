//! The crate's one error type, in ureq's shape: a Copy `ErrorKind` that callers decide on, a context
//! text saying what was being done (naming the file or config key), and an optional source.
//! It never logs and never retries: classification methods tell the caller what to do.

use std::error::Error as StdError;
use std::fmt;

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely enough to decide on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration or a command-line argument is invalid.
    Config,
    /// A local file or socket operation failed.
    Io,
    /// TLS setup or handshake failed (certificates, keys, verification).
    Tls,
    /// TCP connect or the WebSocket upgrade failed.
    Handshake,
    /// The peer broke the WebSocket protocol, or sent something we cannot use.
    Protocol,
    /// The link closed (EOF, reset, close frame): a normal end of a session.
    Closed,
    /// A deadline passed (connect, handshake, read, write, request).
    Timeout,
    /// A bounded queue is full.
    Full,
    /// The agent is stopping.
    Stopped,
}

impl ErrorKind {
    /// Starts an error of this kind with a context text.
    pub fn msg(self, context: impl Into<String>) -> Error {
        Error { kind: self, context: context.into(), source: None }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "config error",
            ErrorKind::Io => "i/o error",
            ErrorKind::Tls => "tls error",
            ErrorKind::Handshake => "connect error",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Closed => "connection closed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Full => "queue full",
            ErrorKind::Stopped => "agent stopping",
        })
    }
}

/// An error with its kind, what was being done, and the underlying cause.
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl Error {
    /// Attaches the underlying cause.
    pub fn src(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Error {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// True when the session's link is gone and the supervisor should reconnect.
    pub fn is_link_down(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Closed | ErrorKind::Timeout | ErrorKind::Protocol | ErrorKind::Handshake
        ) || (self.kind == ErrorKind::Io && self.source.is_some())
    }

    /// True when trying the same thing again later may succeed (network trouble, not bad config).
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, ErrorKind::Config | ErrorKind::Stopped)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if !self.context.is_empty() {
            write!(f, ": {}", self.context)?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_chains_kind_context_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = ErrorKind::Tls.msg("load client key /etc/k.pem").src(io);
        assert_eq!(e.to_string(), "tls error: load client key /etc/k.pem: no such file");
        assert!(e.source().is_some());
        assert!(!ErrorKind::Config.msg("x").is_retryable());
        assert!(ErrorKind::Closed.msg("eof").is_link_down());
    }
}
