//! What the metrics endpoint reads from the database at each scrape: jobs not done, servers
//! waiting for a run, servers per reachability, sync requests not yet taken, and the agents of
//! the registry by state.

use super::Store;
use fleetsync_common::sql::Value;

use crate::model::{AgentState, JobState, Reachability, RequestState};

/// The fleet's state as the database holds it (every agent's work, not only this one's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// Jobs not done, by state.
    pub jobs: Vec<(JobState, i64)>,
    /// Servers marked waiting for a run.
    pub servers_waiting: i64,
    /// Servers by reachability.
    pub servers: Vec<(Reachability, i64)>,
    /// Sync requests recorded by migrations and not yet turned into jobs.
    pub outbox_pending: i64,
    /// Agents of the registry by state (gone ones until the retention drops them).
    pub agents: Vec<(AgentState, i64)>,
}

impl Store {
    /// Reads the gauges: four counting queries, each served by an index or a small table
    /// except the reachability count, one scan of `servers`.
    pub async fn gauges(&self) -> Result<FleetGauges, sqlx::Error> {
        let jobs = self
            .db
            .fetch(
                "SELECT state, COUNT(*) FROM sync_jobs WHERE state <> ? GROUP BY state",
                &[JobState::Done.as_str().into()],
            )
            .await?
            .iter()
            .map(fleetsync_common::sql::Row::decode)
            .collect::<Result<_, sqlx::Error>>()?;
        let servers = self
            .db
            .fetch(
                "SELECT reachability, COUNT(*) FROM servers GROUP BY reachability",
                &[],
            )
            .await?
            .iter()
            .map(fleetsync_common::sql::Row::decode)
            .collect::<Result<_, sqlx::Error>>()?;
        let mut agents: Vec<(AgentState, i64)> = Vec::new();
        for agent in self.agents().await? {
            match agents.iter_mut().find(|(s, _)| *s == agent.status.state) {
                Some((_, n)) => *n += 1,
                None => agents.push((agent.status.state, 1)),
            }
        }
        let count = |sql: &'static str, args: Vec<Value>| async move {
            let row = self.db.fetch_optional(sql, &args).await?;
            row.map_or(Ok(0), |r| r.decode())
        };
        Ok(FleetGauges {
            jobs,
            servers_waiting: count(
                "SELECT COUNT(*) FROM server_leases WHERE pending_since IS NOT NULL",
                Vec::new(),
            )
            .await?,
            servers,
            outbox_pending: count(
                "SELECT COUNT(*) FROM sync_requests WHERE state <> ?",
                vec![RequestState::Taken.as_str().into()],
            )
            .await?,
            agents,
        })
    }
}
