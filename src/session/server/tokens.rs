//! A token checked on the server, with the lockouts of failed attempts per
//! address (`AuthThrottle`): the decision behind `ServerAction::Authenticate`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::protocol::AuthRefusal;
use crate::throttle::{Admission, AuthThrottle};

/// Why [`check_token`] refused a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// The address is locked out after failed attempts; the token was not looked at.
    #[error("too many failed authentications from this address; retry in {retry_in_s}s")]
    LockedOut {
        /// Seconds until the lockout ends (rounded up).
        retry_in_s: u64,
    },
    /// The token was checked and refused.
    #[error("{reason}")]
    Refused {
        /// The validator's reason.
        reason: String,
        /// Failures from this address so far.
        failures: u32,
        /// The lockout this failure started, if any.
        lockout: Option<Duration>,
    },
}

impl TokenRefusal {
    /// Whether retrying can help: after a lockout, yes; a refused token, no.
    pub fn refusal(&self) -> AuthRefusal {
        match self {
            Self::LockedOut { .. } => AuthRefusal::Later,
            Self::Refused { .. } => AuthRefusal::Token,
        }
    }
}

/// Checks a token from `addr`, unless the address is locked out after failed
/// attempts (then the token is not looked at); a failure counts toward a
/// lockout, a success forgets the address.
pub fn check_token<E: std::fmt::Display>(
    throttle: &mut AuthThrottle,
    addr: IpAddr,
    now: Instant,
    verify: impl FnOnce() -> Result<(), E>,
) -> Result<(), TokenRefusal> {
    if let Admission::LockedOut(left) = throttle.admit(addr, now) {
        return Err(TokenRefusal::LockedOut {
            retry_in_s: left.as_secs() + 1,
        });
    }
    match verify() {
        Ok(()) => {
            throttle.succeeded(addr);
            Ok(())
        }
        Err(e) => {
            let (lockout, failures) = throttle.failed(addr, now);
            Err(TokenRefusal::Refused {
                reason: e.to_string(),
                failures,
                lockout,
            })
        }
    }
}
