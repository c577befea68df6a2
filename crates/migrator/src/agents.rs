//! The sync-agents a migration must mind: the live ones of the registry (`sync_agents`, written
//! by the agents), their schema ranges, and which of them a `stops-agents` migration would stop.
//! `status` and `plan` list them; `migrate` refuses such a migration, or a roll-back below an
//! agent's range, while agents it would stop are serving, unless the operator says to stop them.

use fleetsync_common::{
    AgentId,
    model::{AgentState, RegistryRow},
    sql::{Conn, Row, now_ms_sql},
};

use crate::{
    catalog::{column_exists, table_exists},
    migration::Migration,
};

/// The registry's table.
const AGENTS_TABLE: &str = "sync_agents";

/// A live agent, as the migrator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    /// Its id (the holder its leases carry).
    pub id: AgentId,
    /// The machine it runs on.
    pub host: String,
    /// Its build's version.
    pub version: String,
    /// The start of its schema range: the newest migration it needs.
    pub schema_min: i64,
    /// The end of its range: the newest migration it was built with. `None`: an agent built
    /// before agents declared it, which does not check the schema while it runs.
    pub schema_max: Option<i64>,
    /// Its zone (empty: none).
    pub zone: String,
    /// Serving, draining, quarantined or incompatible.
    pub state: AgentState,
}

impl LiveAgent {
    /// Whether applying `m` takes this agent out of its range.
    pub fn stopped_by(&self, m: &Migration) -> bool {
        m.stops_agents && self.schema_max.is_none_or(|max| max < m.version)
    }

    /// Whether a schema at `version` (after a roll-back) is below its range.
    pub fn needs_newer_than(&self, version: i64) -> bool {
        self.schema_min > version
    }

    /// Whether it claims work now (the agents a stop would interrupt).
    pub fn serving(&self) -> bool {
        self.state == AgentState::Serving
    }

    /// Its range, for people: `20261208000001..20261209000001`, or `20261207000001..?` for an
    /// agent that declares no end.
    pub fn range(&self) -> String {
        match self.schema_max {
            Some(max) => format!("{}..{max}", self.schema_min),
            None => format!("{}..? (declares no end)", self.schema_min),
        }
    }
}

impl std::fmt::Display for LiveAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} (version {}, schema {}, {}{})",
            self.id,
            self.host,
            self.version,
            self.range(),
            self.state,
            if self.zone.is_empty() {
                String::new()
            } else {
                format!(", zone {}", self.zone)
            }
        )
    }
}

/// The agents whose heartbeat is recent (within two of their lease TTLs, by the database's
/// clock) and that have not stopped, oldest first. Empty before the registry exists.
///
/// Which columns the registry has is read first, and another migrator may move the schema
/// across the registry's versions between that and the read (on SQLite nothing holds a lock
/// while a migrator plans, nor while `status` reads): a read that fails where the catalog has
/// changed since is made again against the catalog as it is now.
pub async fn live_agents(conn: &mut Conn) -> Result<Vec<LiveAgent>, sqlx::Error> {
    let mut shape = registry_shape(conn).await?;
    let mut tries = 1;
    loop {
        match read_live_agents(conn, shape).await {
            Err(err) if tries < 5 => {
                let now = registry_shape(conn).await?;
                if now == shape {
                    return Err(err);
                }
                shape = now;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Whether the registry exists, and whether it records the agents' ranges (`schema_max`).
async fn registry_shape(conn: &mut Conn) -> Result<(bool, bool), sqlx::Error> {
    if !table_exists(conn, AGENTS_TABLE).await? {
        return Ok((false, false));
    }
    Ok((true, column_exists(conn, AGENTS_TABLE, "schema_max").await?))
}

async fn read_live_agents(
    conn: &mut Conn,
    (exists, ranges): (bool, bool),
) -> Result<Vec<LiveAgent>, sqlx::Error> {
    if !exists {
        return Ok(Vec::new());
    }
    let max = if ranges { "schema_max" } else { "NULL" };
    let now = now_ms_sql(conn.backend());
    let rows = conn
        .fetch(
            &format!(
                "SELECT {}, {max} FROM {AGENTS_TABLE} \
                 WHERE state <> ? AND heartbeat_at >= {now} - 2 * lease_ttl_ms \
                 ORDER BY started_at, id",
                RegistryRow::COLUMNS
            ),
            &[AgentState::Gone.as_str().into()],
        )
        .await?;
    rows.iter().map(decode).collect()
}

/// A row of [`RegistryRow`], then `schema_max` (NULL where the table has no such column).
fn decode(r: &Row) -> Result<LiveAgent, sqlx::Error> {
    let a = RegistryRow::try_from(r)?;
    Ok(LiveAgent {
        schema_max: r.opt_int(RegistryRow::COLUMN_COUNT)?,
        id: a.id,
        host: a.host,
        version: a.version,
        schema_min: a.schema_version,
        zone: a.zone,
        state: a.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_migration_stops_agents_whose_range_ends_before_it() {
        let agent = |max| LiveAgent {
            id: AgentId::new("a"),
            host: "h".into(),
            version: "0.1.0".into(),
            schema_min: 10,
            schema_max: max,
            zone: String::new(),
            state: AgentState::Serving,
        };
        let plain = Migration::parse(20, "plain", "SELECT 1;").unwrap();
        let stopping =
            Migration::parse(20, "stop", "-- fleetsync: stops-agents\nSELECT 1;").unwrap();
        assert!(
            !agent(Some(10)).stopped_by(&plain),
            "additive: old agents go on"
        );
        assert!(agent(Some(10)).stopped_by(&stopping));
        assert!(agent(None).stopped_by(&stopping), "no declared end");
        assert!(!agent(Some(20)).stopped_by(&stopping), "built with it");
        assert_eq!(agent(Some(20)).range(), "10..20");
    }
}
