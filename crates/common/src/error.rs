//! The one mapping from domain errors to gRPC status codes.
//!
//! Services return `ServiceError`; `From<ServiceError> for Status` decides the code. Internal
//! details are logged where the error is handled and never sent to the client.

use std::error::Error as StdError;

use tonic::{Code, Status};

/// An error a request can end with, as the client should see it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; names the field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field, e.g. `spec.port`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// What the request names does not exist.
    #[error("{what} {id} not found")]
    NotFound {
        /// What kind of thing, e.g. `server`.
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// The request conflicts with existing state, e.g. a duplicate name.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows this, e.g. the schema is too old.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (the database) is unavailable right now; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// A concurrency conflict in the database that persisted through every retry; the
    /// client may try again.
    #[error("{0}")]
    Aborted(String),
    /// A limit on open streams or calls is reached; retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A position (a cursor) past the end of what exists.
    #[error("{0}")]
    OutOfRange(String),
    /// The RPC exists in the contract but arrives in a later version.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    /// The caller has no valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// A bug or an unexpected failure. The detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// A not-found error for the `what` with id `id`.
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Aborted(_) => Code::Aborted,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(err: sqlx::Error) -> Self {
        use crate::sql::{Failure, classify};
        match classify(&err) {
            Failure::Unavailable => {
                Self::Unavailable(format!("control-plane database unavailable: {err}"))
            }
            Failure::Conflict => Self::Aborted(format!(
                "the control-plane database reported a conflict with concurrent writes: {err}"
            )),
            Failure::Permanent => Self::Internal(format!("database error: {err}")),
        }
    }
}

impl From<crate::model::UnknownValue> for ServiceError {
    /// The database holds a value this build does not know: an internal error, not a guess.
    fn from(err: crate::model::UnknownValue) -> Self {
        Self::Internal(format!("database holds {err}"))
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        let code = err.code();
        let message = match &err {
            // Internal details stay in the log: logged here, once, where the call ends.
            ServiceError::Internal(detail) => {
                tracing::error!(error = %detail, "request failed");
                "internal error, see the server log".to_owned()
            }
            other => other.to_string(),
        };
        Status::new(code, message)
    }
}

/// The error and its sources, each said once: transport errors repeat their source's text
/// ("tcp connect error: tcp connect error: Connection refused").
pub fn causes(err: &(dyn StdError + 'static)) -> String {
    join_causes(Vec::new(), err)
}

/// `parts`, then the error and its sources, each said once.
pub fn join_causes(mut parts: Vec<String>, err: &(dyn StdError + 'static)) -> String {
    parts.retain(|p| !p.trim().is_empty());
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let text = text.trim();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(text)) {
            // A part that repeats this one whole gives way to it.
            parts.retain(|p| !text.contains(p.as_str()));
            parts.push(text.to_owned());
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for E {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let err = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E(
                    "tcp connect error",
                    Some(Box::new(E("Connection refused (os error 111)", None))),
                ))),
            ))),
        );
        assert_eq!(
            causes(&err),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
        let err = E(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(E("UnknownIssuer", None))),
        );
        assert_eq!(causes(&err), "invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn maps_codes_and_hides_internals() {
        let status = Status::from(ServiceError::invalid("spec.port", "must be 1-65535, got 0"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid spec.port: must be 1-65535, got 0"
        );

        let status = Status::from(ServiceError::not_found("server", 42));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "server 42 not found");

        let status = Status::from(ServiceError::Internal("secret detail".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));

        let status = Status::from(ServiceError::from(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
