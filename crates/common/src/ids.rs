//! Typed ids, carried from the proto edge to SQL: a server (`ServerId`), a job (`JobId`), a sync
//! request (`RequestId`, the idempotency key) and an agent (`AgentId`, a lease's holder). Each
//! binds as a SQL value and decodes as a column; one given in a request is checked once, here,
//! with one message per kind.

use std::fmt;

use crate::{
    ServiceError,
    sql::{Column, Row, Value},
};

/// A registered server's id: positive, the database's own key of `servers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ServerId(i64);

impl ServerId {
    /// A server id given in a request, under the name of its `field` (Fleet's `id`,
    /// `CheckConnection`'s `server_id`, each of `StartSync`'s `server_ids`, `ListJobs`' server
    /// filter): the one check, with the one message.
    pub fn from_request(value: i64, field: &'static str) -> Result<Self, ServiceError> {
        if value <= 0 {
            return Err(ServiceError::invalid(
                field,
                format!("must be a positive server id, got {value}"),
            ));
        }
        Ok(Self(value))
    }

    /// An id the database gave (a row of `servers`, or one read back from another table).
    pub const fn stored(value: i64) -> Self {
        Self(value)
    }

    /// As the proto and SQL carry it.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<ServerId> for Value {
    fn from(id: ServerId) -> Self {
        Value::Int(id.0)
    }
}

impl From<&ServerId> for Value {
    fn from(id: &ServerId) -> Self {
        Value::Int(id.0)
    }
}

impl From<Option<ServerId>> for Value {
    fn from(id: Option<ServerId>) -> Self {
        id.map_or(Value::Null, |id| Value::Int(id.0))
    }
}

impl Column for ServerId {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        Ok(Self(row.int(index)?))
    }
}

impl Column for Option<ServerId> {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        Ok(row.opt_int(index)?.map(ServerId))
    }
}

/// The longest text id a request may give (a job id, a request id).
pub const MAX_TEXT_ID: usize = 128;

/// Text a request gives under the name of its `field`: at most `max` characters, without
/// control characters. The one check of short text, for the ids here and the agent's names.
pub fn short_text(value: &str, field: &'static str, max: usize) -> Result<(), ServiceError> {
    if value.chars().count() > max {
        return Err(ServiceError::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ServiceError::invalid(field, "contains control characters"));
    }
    Ok(())
}

macro_rules! text_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// One given in a request, under the name of its `field`: the one check (not
            /// empty, at most [`MAX_TEXT_ID`] characters, no control characters).
            pub fn from_request(value: &str, field: &'static str) -> Result<Self, ServiceError> {
                if value.is_empty() {
                    return Err(ServiceError::invalid(field, concat!("required: ", $what)));
                }
                short_text(value, field, MAX_TEXT_ID)?;
                Ok(Self(value.to_owned()))
            }

            /// One made by this program, or read back from the database.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// As text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The text, for the proto.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for Value {
            fn from(id: $name) -> Self {
                Value::Text(id.0)
            }
        }

        impl From<&$name> for Value {
            fn from(id: &$name) -> Self {
                Value::Text(id.0.clone())
            }
        }

        impl Column for $name {
            fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
                Ok(Self(row.text(index)?))
            }
        }

        impl Column for Option<$name> {
            fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
                Ok(row.opt_text(index)?.map($name))
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

text_id!(
    /// A sync job's id, as `StartSync` returns it.
    JobId,
    "a job id, as StartSync returns it"
);
text_id!(
    /// A sync request's idempotency key: a caller's `request_id`, or one the agent or the
    /// migrator made (`rpc-…`, `schedule-…`, `recovery-…`, `migration-V`).
    RequestId,
    "the caller's idempotency key"
);
text_id!(
    /// An agent's id in the registry, which is also the holder of the leases it takes.
    AgentId,
    "an agent id, as ListAgents shows it"
);

impl From<Option<AgentId>> for Value {
    fn from(id: Option<AgentId>) -> Self {
        id.map_or(Value::NullText, |id| Value::Text(id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_id_from_a_request_is_positive() {
        assert_eq!(ServerId::from_request(7, "id").unwrap().get(), 7);
        for bad in [0, -1, i64::MIN] {
            let err = ServerId::from_request(bad, "server_ids").unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid server_ids: must be a positive server id, got {bad}")
            );
        }
    }

    #[test]
    fn a_text_id_from_a_request_is_short_printable_text() {
        assert_eq!(
            JobId::from_request("j-1", "job_id").unwrap().as_str(),
            "j-1"
        );
        for (bad, why) in [
            (String::new(), "required: the caller's idempotency key"),
            ("x".repeat(129), "longer than 128 characters"),
            ("a\nb".to_owned(), "contains control characters"),
        ] {
            let err = RequestId::from_request(&bad, "request_id").unwrap_err();
            assert_eq!(err.to_string(), format!("invalid request_id: {why}"));
        }
        assert!(RequestId::from_request(&"é".repeat(128), "request_id").is_ok());
    }

    #[test]
    fn ids_bind_and_decode_as_their_columns() {
        let row = Row(vec![Value::Int(3), Value::Text("a".into()), Value::Null]);
        assert_eq!(ServerId::column(&row, 0).unwrap(), ServerId::stored(3));
        assert_eq!(AgentId::column(&row, 1).unwrap(), AgentId::new("a"));
        assert_eq!(Option::<ServerId>::column(&row, 2).unwrap(), None);
        assert_eq!(Value::from(ServerId::stored(3)), Value::Int(3));
        assert_eq!(Value::from(&JobId::new("j")), Value::Text("j".into()));
    }
}
