//! The crate-level error of the seed's public API, wrapping each module's own error.

use crate::auth::AuthError;
use crate::config::ConfigError;
use crate::ports::PortError;
use crate::protocol::{BuildError, DecodeError};

/// Everything that can go wrong at the public API (the seed's `TunnelError`).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A protocol violation by a peer or by us.
    #[error("protocol error: {message}")]
    Protocol {
        /// What happened.
        message: String,
    },
    /// Authentication was refused.
    #[error("authentication error: {reason}")]
    Auth {
        /// Why.
        reason: String,
    },
    /// A socket or connection failed.
    #[error("connection error: {source}")]
    Connection {
        /// The IO error.
        #[from]
        source: std::io::Error,
    },
    /// A registry refusal (ports, limits, unknown ids).
    #[error("registry error: {message}")]
    Registry {
        /// What happened.
        message: String,
    },
    /// Invalid configuration.
    #[error("configuration error: {message}")]
    Config {
        /// What is wrong, naming the key.
        message: String,
    },
    /// An operation timed out.
    #[error("operation timed out")]
    Timeout,
    /// The component is shutting down.
    #[error("shutting down")]
    Shutdown,
}

impl TunnelError {
    /// A protocol error.
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::Protocol {
            message: message.into(),
        }
    }

    /// An authentication error.
    pub fn auth(reason: impl Into<String>) -> Self {
        Self::Auth {
            reason: reason.into(),
        }
    }

    /// An authentication error from a refusal's text as a peer (or a
    /// status) gives it, which may already begin with this variant's own
    /// "authentication error: " (the original server's does): said once.
    pub(crate) fn auth_refused(text: &str) -> Self {
        const PREFIX: &str = "authentication error: ";
        let said = text
            .get(..PREFIX.len())
            .filter(|head| head.eq_ignore_ascii_case(PREFIX))
            .map_or(text, |_| &text[PREFIX.len()..]);
        Self::auth(said)
    }

    /// A registry error.
    pub fn registry(message: impl Into<String>) -> Self {
        Self::Registry {
            message: message.into(),
        }
    }

    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::Config {
            message: message.into(),
        }
    }

    /// A connection error from any error type.
    pub fn connection<E: std::error::Error + Send + Sync + 'static>(error: E) -> Self {
        Self::Connection {
            source: std::io::Error::other(error),
        }
    }

    /// A connection error from a message.
    pub fn connection_msg(message: impl Into<String>) -> Self {
        Self::Connection {
            source: std::io::Error::other(message.into()),
        }
    }

    /// A timeout.
    pub fn timeout() -> Self {
        Self::Timeout
    }
}

/// The seed's result alias.
pub type Result<T, E = TunnelError> = std::result::Result<T, E>;

impl From<DecodeError> for TunnelError {
    fn from(e: DecodeError) -> Self {
        Self::protocol(e.to_string())
    }
}

impl From<BuildError> for TunnelError {
    fn from(e: BuildError) -> Self {
        Self::protocol(e.to_string())
    }
}

impl From<AuthError> for TunnelError {
    fn from(e: AuthError) -> Self {
        Self::auth(e.to_string())
    }
}

impl From<PortError> for TunnelError {
    fn from(e: PortError) -> Self {
        Self::registry(e.to_string())
    }
}

impl From<ConfigError> for TunnelError {
    fn from(e: ConfigError) -> Self {
        Self::config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::TunnelError;

    #[test]
    fn a_refusal_says_authentication_error_once() {
        for text in [
            "invalid tunnel token",
            "authentication error: invalid tunnel token",
            "Authentication error: invalid tunnel token",
        ] {
            let said = TunnelError::auth_refused(text).to_string();
            assert_eq!(said, "authentication error: invalid tunnel token");
        }
    }
}
