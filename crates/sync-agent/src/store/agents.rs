//! The registry of sync-agents (`sync_agents`): each agent writes its own row, at start, on
//! every heartbeat and when it stops; any agent lists them all, with "gone" decided by the
//! database's clock (no heartbeat for two of that agent's lease TTLs). Two things are written
//! by others: the second-opinion counts (`overruled`, `confirmed`: by the agent whose run judged
//! this one's failure, in that completion's transaction) and an operator's resume request
//! (`resume_requested_at`, by whichever agent took the `ResumeAgent` call); the agent reads
//! both back on its heartbeat.

use std::collections::BTreeMap;

use fleetsync_common::{
    AgentId, Backend,
    model::RegistryRow,
    sql::{Row, Value, now_ms_sql},
};

use super::Store;
use crate::{model::AgentState, schema};

/// What an agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    /// The holder its leases carry.
    pub id: AgentId,
    /// The machine it runs on.
    pub host: String,
    /// Its build's version.
    pub version: String,
    /// The newest migration it needs: the start of its schema range.
    pub schema_version: i64,
    /// The newest migration it was built with: the end of its range (`None`: an agent older
    /// than the rule, which declares none).
    pub schema_max: Option<i64>,
    /// SHA256 fingerprints of its SSH keys.
    pub key_fingerprints: Vec<String>,
    /// Its zone (empty: none).
    pub zone: String,
    /// Its lease TTL (ms): two of them without a heartbeat and it is gone.
    pub lease_ttl_ms: i64,
}

/// How an agent is doing, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// Serving, draining, quarantined, or gone (stopped).
    pub state: AgentState,
    /// Why, when not serving.
    pub reason: String,
    /// Leases held.
    pub leases: i64,
    /// SSH runs in flight.
    pub in_flight: i64,
    /// Runs recorded since it started, by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// Failures it handed to a peer for a second opinion since it started.
    pub asked: u64,
}

/// What others wrote on an agent's row, as its heartbeat reads it back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// Its failures a peer then succeeded on, since it started.
    pub overruled: u64,
    /// Its failures a peer failed on too, since it started.
    pub confirmed: u64,
    /// An operator asked it to serve again (ms, database clock), not yet acted on.
    pub resume_requested_at: Option<i64>,
}

/// An agent as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// What it said about itself.
    pub report: AgentReport,
    /// Its last heartbeat's status; `state` is `Gone` for an agent whose heartbeat stopped.
    pub status: AgentStatus,
    /// When it started (ms, database clock).
    pub started_at: i64,
    /// Its last heartbeat (ms, database clock).
    pub heartbeat_at: i64,
    /// What its peers' second opinions said of its failures.
    pub verdicts: Verdicts,
}

impl AgentStatus {
    /// `state, reason, leases, in_flight, outcomes, asked`, as bound.
    fn values(&self) -> [Value; 6] {
        [
            self.state.as_str().into(),
            self.reason.as_str().into(),
            self.leases.into(),
            self.in_flight.into(),
            serde_json::to_string(&self.outcomes)
                .expect("counts serialize")
                .into(),
            (self.asked as i64).into(),
        ]
    }
}

fleetsync_common::stored_row! {
    /// What others write on an agent's row.
    struct VerdictRow {
        overruled: i64,
        confirmed: i64,
        resume_requested_at: Option<i64>,
    }
}

/// The columns an agent writes itself, as every statement lists them: those of every registry
/// ([`RegistryRow`], declared in `common` for the migrator too), then `asked`, which a later
/// registry added (one column, read by its position: [`ASKED_INDEX`]).
const REGISTRY: &str = RegistryRow::COLUMNS;
/// Where a registry read selects `asked`: right after [`REGISTRY`].
const ASKED_INDEX: usize = RegistryRow::COLUMN_COUNT;
/// What others write on it.
const VERDICT_COLUMNS: &str = VerdictRow::COLUMNS;
/// Where a registry read selects, after [`REGISTRY`], `asked` and [`VERDICT_COLUMNS`], the database's
/// clock, then the end of the agent's range ([`RANGE_COLUMN`]).
const NOW_INDEX: usize = ASKED_INDEX + 1 + VerdictRow::COLUMN_COUNT;

/// Read after the others and the database's clock: the end of the agent's range, which a
/// build whose range ends before [`schema::RANGES_RECORDED`] does not know.
const RANGE_COLUMN: &str = if schema::RECORDS_RANGE {
    ", schema_max"
} else {
    ""
};

fn count(n: i64, what: &str) -> Result<u64, sqlx::Error> {
    u64::try_from(n)
        .map_err(|_| sqlx::Error::Decode(format!("sync_agents.{what}: count {n}").into()))
}

impl TryFrom<VerdictRow> for Verdicts {
    type Error = sqlx::Error;

    fn try_from(r: VerdictRow) -> Result<Self, sqlx::Error> {
        Ok(Verdicts {
            overruled: count(r.overruled, "overruled")?,
            confirmed: count(r.confirmed, "confirmed")?,
            resume_requested_at: r.resume_requested_at,
        })
    }
}

/// A registry read's row (`REGISTRY, asked, VERDICT_COLUMNS, now RANGE_COLUMN`), "gone" judged
/// by the database's clock it carries.
fn decode(r: &Row) -> Result<AgentRecord, sqlx::Error> {
    let a = RegistryRow::try_from(r)?;
    let now = r.int(NOW_INDEX)?;
    fn json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, sqlx::Error> {
        serde_json::from_str(text)
            .map_err(|e| sqlx::Error::Decode(format!("sync_agents.{what}: {e}").into()))
    }
    let report = AgentReport {
        key_fingerprints: json(&a.key_fingerprints, "key_fingerprints")?,
        schema_max: if schema::RECORDS_RANGE {
            r.opt_int(NOW_INDEX + 1)?
        } else {
            None
        },
        id: a.id,
        host: a.host,
        version: a.version,
        schema_version: a.schema_version,
        zone: a.zone,
        lease_ttl_ms: a.lease_ttl_ms,
    };
    let silent = now - a.heartbeat_at > 2 * report.lease_ttl_ms;
    let (state, reason) = if silent && a.state != AgentState::Gone {
        (
            AgentState::Gone,
            format!(
                "no heartbeat for {} s (last state: {})",
                (now - a.heartbeat_at) / 1000,
                a.state
            ),
        )
    } else {
        (a.state, a.reason)
    };
    Ok(AgentRecord {
        report,
        status: AgentStatus {
            state,
            reason,
            leases: a.leases,
            in_flight: a.in_flight,
            outcomes: json(&a.outcomes, "outcomes")?,
            asked: count(r.int(ASKED_INDEX)?, "asked")?,
        },
        started_at: a.started_at,
        heartbeat_at: a.heartbeat_at,
        verdicts: VerdictRow::read(r, ASKED_INDEX + 1)?.try_into()?,
    })
}

impl Store {
    /// Writes this agent's row as it starts (a restarted agent with the same id starts afresh).
    pub async fn register_agent(
        &self,
        report: &AgentReport,
        status: &AgentStatus,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let upsert = match self.backend() {
            Backend::MySql => {
                "ON DUPLICATE KEY UPDATE host = VALUES(host), version = VALUES(version), \
                 schema_version = VALUES(schema_version), \
                 key_fingerprints = VALUES(key_fingerprints), zone = VALUES(zone), \
                 lease_ttl_ms = VALUES(lease_ttl_ms), started_at = VALUES(started_at), \
                 heartbeat_at = VALUES(heartbeat_at), state = VALUES(state), \
                 reason = VALUES(reason), leases = VALUES(leases), \
                 in_flight = VALUES(in_flight), outcomes = VALUES(outcomes), \
                 asked = VALUES(asked), overruled = 0, confirmed = 0, resume_requested_at = NULL"
            }
            _ => {
                "ON CONFLICT (id) DO UPDATE SET host = excluded.host, version = excluded.version, \
                 schema_version = excluded.schema_version, \
                 key_fingerprints = excluded.key_fingerprints, zone = excluded.zone, \
                 lease_ttl_ms = excluded.lease_ttl_ms, started_at = excluded.started_at, \
                 heartbeat_at = excluded.heartbeat_at, state = excluded.state, \
                 reason = excluded.reason, leases = excluded.leases, \
                 in_flight = excluded.in_flight, outcomes = excluded.outcomes, \
                 asked = excluded.asked, overruled = 0, confirmed = 0, \
                 resume_requested_at = NULL"
            }
        };
        let (range_value, range_update) = match (schema::RECORDS_RANGE, self.backend()) {
            (false, _) => ("", ""),
            (true, Backend::MySql) => (", ?", ", schema_max = VALUES(schema_max)"),
            (true, _) => (", ?", ", schema_max = excluded.schema_max"),
        };
        let mut values: Vec<Value> = [
            report.id.as_str().into(),
            report.host.as_str().into(),
            report.version.as_str().into(),
            report.schema_version.into(),
            serde_json::to_string(&report.key_fingerprints)
                .expect("strings serialize")
                .into(),
            report.zone.as_str().into(),
            report.lease_ttl_ms.into(),
        ]
        .into_iter()
        .chain(status.values())
        .collect();
        if schema::RECORDS_RANGE {
            values.push(report.schema_max.into());
        }
        self.db
            .execute(
                &format!(
                    "INSERT INTO sync_agents ({REGISTRY}, asked{RANGE_COLUMN}) VALUES \
                     (?, ?, ?, ?, ?, ?, ?, {now}, {now}, ?, ?, ?, ?, ?, ?{range_value}) \
                     {upsert}{range_update}"
                ),
                &values,
            )
            .await?;
        Ok(())
    }

    /// This agent's heartbeat in the registry, and what others wrote on its row since.
    /// `None` if its row is gone (pruned while this agent stalled): the caller registers again.
    pub async fn agent_heartbeat(
        &self,
        id: &AgentId,
        status: &AgentStatus,
    ) -> Result<Option<Verdicts>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let updated = self
            .db
            .execute(
                &format!(
                    "UPDATE sync_agents SET heartbeat_at = {now}, state = ?, reason = ?, \
                     leases = ?, in_flight = ?, outcomes = ?, asked = ? WHERE id = ?"
                ),
                &status
                    .values()
                    .into_iter()
                    .chain([id.into()])
                    .collect::<Vec<_>>(),
            )
            .await?;
        if updated == 0 {
            return Ok(None);
        }
        let row = self
            .db
            .fetch_optional(
                &format!("SELECT {VERDICT_COLUMNS} FROM sync_agents WHERE id = ?"),
                &[id.into()],
            )
            .await?;
        row.map(|r| VerdictRow::try_from(&r)?.try_into())
            .transpose()
    }

    /// The heartbeat of an agent that stands down because the schema is outside its range: only
    /// the columns the registry has had since it was made (a schema rolled back below the
    /// agent's range may lack the others), and nothing when even the registry is gone.
    pub async fn agent_standing_down(
        &self,
        id: &AgentId,
        status: &AgentStatus,
    ) -> Result<(), sqlx::Error> {
        if !crate::schema::table_exists(&self.db, "sync_agents").await? {
            return Ok(());
        }
        let now = now_ms_sql(self.backend());
        self.db
            .execute(
                &format!(
                    "UPDATE sync_agents SET heartbeat_at = {now}, state = ?, reason = ?, \
                     leases = ?, in_flight = ? WHERE id = ?"
                ),
                &[
                    status.state.as_str().into(),
                    status.reason.as_str().into(),
                    status.leases.into(),
                    status.in_flight.into(),
                    id.into(),
                ],
            )
            .await?;
        Ok(())
    }

    /// An operator asks a quarantined agent to serve again: recorded on its row, acted on at
    /// its next heartbeat. `None` for an unknown id; the record (as it was) says whether it
    /// was quarantined, and only then is the request recorded.
    pub async fn request_resume(&self, id: &AgentId) -> Result<Option<AgentRecord>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        self.db
            .execute(
                &format!(
                    "UPDATE sync_agents SET resume_requested_at = {now} WHERE id = ? AND state = ?"
                ),
                &[id.into(), AgentState::Quarantined.as_str().into()],
            )
            .await?;
        let row = self
            .db
            .fetch_optional(
                &format!(
                    "SELECT {REGISTRY}, asked, {VERDICT_COLUMNS}, {now}{RANGE_COLUMN} FROM sync_agents \
                     WHERE id = ?"
                ),
                &[id.into()],
            )
            .await?;
        row.map(|r| decode(&r)).transpose()
    }

    /// The agent acted on its operator's resume request (made at `at`): cleared, unless a newer
    /// one came meanwhile.
    pub async fn clear_resume_request(&self, id: &AgentId, at: i64) -> Result<(), sqlx::Error> {
        self.db
            .execute(
                "UPDATE sync_agents SET resume_requested_at = NULL \
                 WHERE id = ? AND resume_requested_at = ?",
                &[id.into(), at.into()],
            )
            .await?;
        Ok(())
    }

    /// Every agent in the registry, oldest first.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, sqlx::Error> {
        let now = now_ms_sql(self.backend());
        let rows = self
            .db
            .fetch(
                &format!(
                    "SELECT {REGISTRY}, asked, {VERDICT_COLUMNS}, {now}{RANGE_COLUMN} FROM sync_agents \
                     ORDER BY started_at, id"
                ),
                &[],
            )
            .await?;
        rows.iter().map(decode).collect()
    }
}
