//! Domain values both services store: the sync scopes a migration asks for and a job records,
//! the outbox's sync requests (written by the migrator, read by both) and their states, the
//! agents' states (written by the agents, read by the migrator too), the inventory and service
//! vocabularies shared with the panel, and `stored_enum!`, which gives each service's enums one stored name per variant with a parse
//! that refuses unknown text (`UnknownValue`, a decode error at the database edge).

use std::fmt;

use crate::proto::sync::v1 as pb;

/// Stored text that names no known value: the database holds something this build does not
/// know (a newer version wrote it, or someone edited a row). Refused, never guessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownValue {
    /// What was being read, e.g. `outcome in sync_job_servers`.
    pub what: &'static str,
    /// The text found.
    pub value: String,
}

impl From<UnknownValue> for sqlx::Error {
    fn from(err: UnknownValue) -> Self {
        sqlx::Error::Decode(Box::new(err))
    }
}

/// A value stored as one of a fixed set of names (what `stored_enum!` declares): a column of
/// it decodes with [`crate::sql::Column`], unknown text an error.
pub trait Stored: Sized {
    /// From its stored name.
    fn from_stored(text: &str) -> Result<Self, UnknownValue>;
}

/// An enum stored as text: one name per variant (`as_str`, `Display`), `parse` back from it
/// (unknown text is an `UnknownValue`), and `ALL` variants in declaration order.
///
/// ```ignore
/// stored_enum! {
///     /// Where a job came from.
///     pub enum JobOrigin in "job origin" {
///         /// An RPC.
///         Rpc => "rpc",
///     }
/// }
/// ```
#[macro_export]
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident in $what:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// Stored name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// From its stored name; anything else is an error, never a guess.
            pub fn parse(s: &str) -> Result<Self, $crate::model::UnknownValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err($crate::model::UnknownValue {
                        what: $what,
                        value: other.to_owned(),
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::model::Stored for $name {
            fn from_stored(text: &str) -> Result<Self, $crate::model::UnknownValue> {
                Self::parse(text)
            }
        }
    };
}

stored_enum! {
    /// Data a sync refreshes. Declared in alphabetical order: a set's stored form lists them so.
    pub enum Scope in "sync scope" {
        /// Charsets and collations of the database service.
        Charsets => "charsets",
        /// Databases with their charset and collation.
        Databases => "databases",
        /// Database users and the databases they can use.
        Users => "users",
    }
}

impl From<Scope> for pb::SyncScope {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Charsets => pb::SyncScope::Charsets,
            Scope::Databases => pb::SyncScope::Databases,
            Scope::Users => pb::SyncScope::Users,
        }
    }
}

impl TryFrom<pb::SyncScope> for Scope {
    type Error = pb::SyncScope;

    /// `UNSPECIFIED` names no scope: it comes back as the error.
    fn try_from(scope: pb::SyncScope) -> Result<Self, pb::SyncScope> {
        match scope {
            pb::SyncScope::Charsets => Ok(Scope::Charsets),
            pb::SyncScope::Databases => Ok(Scope::Databases),
            pb::SyncScope::Users => Ok(Scope::Users),
            pb::SyncScope::Unspecified => Err(scope),
        }
    }
}

/// A set of scopes. Stored comma-joined in `Scope` order (`charsets,databases,users`), so two
/// equal sets are equal text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl crate::sql::Column for Scopes {
    /// Its stored form (`charsets,databases`); an unknown scope is a decode error.
    fn column(row: &crate::sql::Row, index: usize) -> Result<Self, sqlx::Error> {
        Ok(Self::parse(&row.text(index)?)?)
    }
}

impl Scopes {
    /// Every scope: what the periodic and recovery syncs are for.
    pub const ALL: Scopes = Scopes((1 << Scope::ALL.len()) - 1);

    /// No scope.
    pub const fn empty() -> Self {
        Scopes(0)
    }

    fn bit(scope: Scope) -> u8 {
        1 << scope as u8
    }

    /// Adds one; true if it was not there.
    pub fn insert(&mut self, scope: Scope) -> bool {
        let had = self.contains(scope);
        self.0 |= Self::bit(scope);
        !had
    }

    /// Whether it holds this one.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & Self::bit(scope) != 0
    }

    /// Whether it holds none.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Its scopes, in `Scope` order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL
            .iter()
            .copied()
            .filter(move |s| self.contains(*s))
    }

    /// From the stored, comma-joined form (empty text is the empty set); an unknown name is an
    /// error.
    pub fn parse(stored: &str) -> Result<Self, UnknownValue> {
        stored
            .split(',')
            .filter(|s| !s.is_empty())
            .map(Scope::parse)
            .collect()
    }

    /// As the proto's enum values, in `Scope` order.
    pub fn to_proto(self) -> Vec<i32> {
        self.iter().map(|s| pb::SyncScope::from(s) as i32).collect()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut set = Scopes::empty();
        for scope in iter {
            set.insert(scope);
        }
        set
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

stored_enum! {
    /// How a sync-agent is doing, as the registry (`sync_agents`) shows it.
    pub enum AgentState in "agent state in sync_agents" {
        /// Claiming and running work.
        Serving => "serving",
        /// Shutting down: claims nothing new, finishes or hands over what it holds.
        Draining => "draining",
        /// Claims nothing: its own attempts keep failing where its peers succeed.
        Quarantined => "quarantined",
        /// Claims nothing: the schema is outside the range it works with.
        Incompatible => "incompatible",
        /// Stopped, or its heartbeat stopped.
        Gone => "gone",
    }
}

stored_enum! {
    /// Where a sync request of the outbox stands (`sync_requests.state`): recorded by a
    /// migration, handed to an agent by the migrator, made a job by an agent.
    pub enum RequestState in "state in sync_requests" {
        /// Recorded, not handed over yet.
        Pending => "pending",
        /// The migrator handed it to an agent (which may not have made the job yet).
        Dispatched => "dispatched",
        /// An agent made it a job.
        Taken => "taken",
    }
}

stored_enum! {
    /// Who recorded a sync request (`sync_requests.origin`).
    pub enum RequestOrigin in "origin in sync_requests" {
        /// A migration that declared `resync=...`.
        Migration => "migration",
    }
}

stored_enum! {
    /// Where an inventory row stands (`databases.status`, `database_users.status`): the panel's
    /// states (Vito writes `creating`, `ready`, `failed`, `deleting`) and the agent's `gone`
    /// (no longer on the server). The agent writes `ready` and `gone`.
    pub enum InventoryStatus in "status in databases or database_users" {
        /// The panel is creating it.
        Creating => "creating",
        /// On the server, as the last sync saw it.
        Ready => "ready",
        /// The panel failed to create it.
        Failed => "failed",
        /// The panel is deleting it.
        Deleting => "deleting",
        /// No longer on the server (kept until the retention).
        Gone => "gone",
    }
}

stored_enum! {
    /// Where a service row stands (`services.status`): the agent registers services as
    /// `ready`; the panel writes others (installing, ...), which the agent never reads.
    pub enum ServiceStatus in "status in services" {
        /// Installed and usable.
        Ready => "ready",
    }
}

stored_enum! {
    /// The kind of service row the agent reads and writes (`services.type`). The panel stores
    /// others (web servers, PHP, ...), which the agent never selects.
    pub enum ServiceType in "type in services" {
        /// A database service: MySQL, MariaDB or PostgreSQL.
        Database => "database",
    }
}

/// The migrator's history of migrations; the agent reads which are applied.
pub const SCHEMA_HISTORY_TABLE: &str = "fleetsync_schema_history";
/// The applied migrations declared `stops-agents` (version, name, when): the migrator writes a
/// row in the transaction that marks such a migration applied; every agent reads whether one
/// is newer than the end of its schema range.
pub const SCHEMA_BREAKS_TABLE: &str = "fleetsync_schema_breaks";

crate::stored_row! {
    /// An agent's row of the registry (`sync_agents`, written by the agent itself) in the
    /// columns every version of the table has: declared once for the agent, which reads its
    /// later columns after these, and the migrator, which reads the end of the agent's schema
    /// range after these where the table has it.
    pub struct RegistryRow {
        /// The agent, and the holder of its leases.
        pub id: crate::AgentId,
        /// The machine it runs on.
        pub host: String,
        /// Its build's version.
        pub version: String,
        /// The start of its schema range: the newest migration it needs.
        pub schema_version: i64,
        /// Its SSH client keys' fingerprints, a JSON array.
        pub key_fingerprints: String,
        /// Its zone (empty: none).
        pub zone: String,
        /// Its lease TTL (ms): it is gone after two of them without a heartbeat.
        pub lease_ttl_ms: i64,
        /// When it started (ms, database clock).
        pub started_at: i64,
        /// Its last heartbeat (ms, database clock).
        pub heartbeat_at: i64,
        /// Its state as it last wrote it.
        pub state: AgentState,
        /// Why it is in that state.
        pub reason: String,
        /// Leases it held.
        pub leases: i64,
        /// Runs it had in flight.
        pub in_flight: i64,
        /// Its outcomes since it started, a JSON object of outcome name to count.
        pub outcomes: String,
    }
}

crate::stored_row! {
    /// A sync request a migration recorded in the outbox (`sync_requests`).
    pub struct SyncRequest {
        /// `migration-VERSION`: the job made from it takes this as its request id.
        pub id: crate::RequestId,
        /// What the migration asked to re-read.
        pub scopes: Scopes,
        /// Why, for the job's reason.
        pub reason: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_in_one_canonical_order() {
        let set = Scopes::parse("users,databases,users").unwrap();
        assert_eq!(set.to_string(), "databases,users");
        assert_eq!(Scopes::parse(&set.to_string()).unwrap(), set);
        assert_eq!(Scopes::ALL.to_string(), "charsets,databases,users");
        assert!(Scopes::parse("").unwrap().is_empty());
        assert_eq!(
            set.to_proto(),
            [pb::SyncScope::Databases as i32, pb::SyncScope::Users as i32]
        );
    }

    #[test]
    fn unknown_names_are_refused_not_dropped() {
        let err = Scopes::parse("databases,tables").unwrap_err();
        assert_eq!(err.value, "tables");
        assert_eq!(err.to_string(), "unknown sync scope \"tables\"");
        assert!(matches!(sqlx::Error::from(err), sqlx::Error::Decode(_)));
        assert!(Scope::try_from(pb::SyncScope::Unspecified).is_err());
    }
}
