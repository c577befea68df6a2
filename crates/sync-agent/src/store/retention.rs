//! Retention: finished jobs (with their per-server rows) and runs older than the retention
//! period are deleted in small batches, so that history never grows without bound and the
//! tables on the work path stay small. Also ends the rows left waiting for servers that were
//! deleted without going through the Fleet API.

use fleetsync_common::sql::Value;

use super::{Store, complete::cancel_waiting, list};
use crate::model::JobState;

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished jobs deleted, with their rows.
    pub jobs: u64,
    /// Runs deleted.
    pub runs: u64,
    /// Waiting rows of deleted servers ended as CANCELLED.
    pub orphans: u64,
}

/// Rows deleted per statement: short transactions that never hold locks for long.
const BATCH: usize = 500;

impl Store {
    /// Deletes finished jobs and runs that finished before `cutoff_ms`, at most `max_batches`
    /// batches of each per call.
    pub async fn prune(&self, cutoff_ms: i64, max_batches: usize) -> Result<Pruned, sqlx::Error> {
        let mut pruned = Pruned::default();
        for _ in 0..max_batches {
            let ids: Vec<String> = self
                .db
                .fetch(
                    "SELECT id FROM sync_jobs WHERE finished_at < ? AND state = ? \
                     ORDER BY finished_at LIMIT ?",
                    &[
                        cutoff_ms.into(),
                        JobState::Done.as_str().into(),
                        (BATCH as i64).into(),
                    ],
                )
                .await?
                .iter()
                .map(|r| r.text(0))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                break;
            }
            let args: Vec<Value> = ids.iter().map(|id| id.as_str().into()).collect();
            let mut tx = self.db.begin().await?;
            tx.execute(
                &format!(
                    "DELETE FROM sync_job_servers WHERE job_id IN {}",
                    list(ids.len())
                ),
                &args,
            )
            .await?;
            pruned.jobs += tx
                .execute(
                    &format!("DELETE FROM sync_jobs WHERE id IN {}", list(ids.len())),
                    &args,
                )
                .await?;
            tx.commit().await?;
        }
        for _ in 0..max_batches {
            let ids: Vec<i64> = self
                .db
                .fetch(
                    "SELECT id FROM sync_runs WHERE finished_at < ? ORDER BY finished_at LIMIT ?",
                    &[cutoff_ms.into(), (BATCH as i64 * 4).into()],
                )
                .await?
                .iter()
                .map(|r| r.int(0))
                .collect::<Result<_, _>>()?;
            if ids.is_empty() {
                break;
            }
            let args: Vec<Value> = ids.iter().map(|&id| Value::Int(id)).collect();
            pruned.runs += self
                .db
                .execute(
                    &format!("DELETE FROM sync_runs WHERE id IN {}", list(ids.len())),
                    &args,
                )
                .await?;
        }
        let orphans: Vec<i64> = self
            .db
            .fetch(
                "SELECT DISTINCT js.server_id FROM sync_job_servers js WHERE js.outcome IS NULL \
                 AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.id = js.server_id)",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        for server_id in orphans {
            let mut tx = self.db.begin().await?;
            pruned.orphans += cancel_waiting(&mut tx, server_id).await? as u64;
            tx.commit().await?;
        }
        Ok(pruned)
    }
}
