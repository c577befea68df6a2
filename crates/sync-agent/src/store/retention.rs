//! Retention: finished jobs (with their per-server rows), runs, inventory rows marked gone and
//! agents silent longer ago than the retention period are deleted in small batches, so that history never
//! grows without bound and the tables on the work path stay small. The cutoff is taken by the
//! database's clock, like every time it is compared with. Also ends the rows left waiting for
//! servers that were deleted without going through the Fleet API.

use fleetsync_common::sql::Value;
use fleetsync_common::{JobId, ServerId};

use super::{Store, fill::cancel_waiting, list};
use crate::model::{InventoryStatus, JobState};

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished jobs deleted, with their rows.
    pub jobs: u64,
    /// Runs deleted.
    pub runs: u64,
    /// Waiting rows of deleted servers ended as CANCELLED.
    pub orphans: u64,
    /// Databases and users marked gone before the cutoff, deleted.
    pub gone: u64,
    /// Agents silent since before the cutoff, dropped from the registry.
    pub agents: u64,
}

/// Rows deleted per statement: short transactions that never hold locks for long.
const BATCH: usize = 500;

impl Store {
    /// [`prune`](Self::prune) with the cutoff `age_ms` before now by the database's clock (the
    /// clock every stored time was taken by, whatever this machine's says).
    pub async fn prune_older_than(
        &self,
        age_ms: i64,
        max_batches: usize,
    ) -> Result<Pruned, sqlx::Error> {
        let now = self.db_now().await?;
        self.prune(now - age_ms, max_batches).await
    }

    /// Deletes finished jobs, runs and gone inventory rows from before `cutoff_ms` (ms,
    /// database clock), at most `max_batches` batches of each per call.
    pub async fn prune(&self, cutoff_ms: i64, max_batches: usize) -> Result<Pruned, sqlx::Error> {
        let mut pruned = Pruned::default();
        for _ in 0..max_batches {
            let ids: Vec<JobId> = self
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
                .map(fleetsync_common::sql::Row::decode)
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
        pruned.runs = self
            .delete_old(
                "sync_runs",
                "finished_at",
                ("", None),
                cutoff_ms,
                max_batches,
            )
            .await?;
        pruned.agents = self
            .db
            .execute(
                "DELETE FROM sync_agents WHERE heartbeat_at < ?",
                &[cutoff_ms.into()],
            )
            .await?;
        for table in ["\"databases\"", "database_users"] {
            // Still gone and still old when deleted: a row seen again meanwhile is kept.
            pruned.gone += self
                .delete_old(
                    table,
                    "updated_at",
                    (
                        "status = ? AND ",
                        Some(InventoryStatus::Gone.as_str().into()),
                    ),
                    cutoff_ms,
                    max_batches,
                )
                .await?;
        }
        let orphans: Vec<ServerId> = self
            .db
            .fetch(
                &format!(
                    "SELECT DISTINCT js.server_id FROM sync_job_servers js{} \
                     WHERE js.outcome IS NULL \
                     AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.id = js.server_id)",
                    // The waiting rows by their outcome (MySQL's other index on them starts
                    // with the server and would be read whole).
                    if self.backend() == fleetsync_common::Backend::MySql {
                        " FORCE INDEX (sync_job_servers_open)"
                    } else {
                        ""
                    }
                ),
                &[],
            )
            .await?
            .iter()
            .map(fleetsync_common::sql::Row::decode)
            .collect::<Result<_, _>>()?;
        for server_id in orphans {
            let mut tx = self.db.begin().await?;
            pruned.orphans += cancel_waiting(&mut tx, server_id).await? as u64;
            tx.commit().await?;
        }
        Ok(pruned)
    }

    /// Deletes the rows of `table` (with an `id`) whose `time` is before `cutoff_ms` and that
    /// match `filter` (`"... = ? AND "` and its argument, or empty), oldest first, in batches of 2,000 ids read first
    /// and deleted by id (MySQL has no `LIMIT` in an `IN` subquery), at most `max_batches`.
    /// The delete bounds the time by the batch's oldest and newest, not by the cutoff:
    /// PostgreSQL otherwise walked the time index over every row due (100,000 at 1,000,000
    /// runs) to find the 2,000, and MariaDB over the rows of earlier batches not yet purged.
    async fn delete_old(
        &self,
        table: &str,
        time: &str,
        (filter, filter_arg): (&str, Option<Value>),
        cutoff_ms: i64,
        max_batches: usize,
    ) -> Result<u64, sqlx::Error> {
        let mut deleted = 0;
        let with_filter =
            |rest: Vec<Value>| -> Vec<Value> { filter_arg.iter().cloned().chain(rest).collect() };
        for _ in 0..max_batches {
            let rows = self
                .db
                .fetch(
                    &self.sql(&format!(
                        "SELECT id, {time} FROM {table} WHERE {filter}{time} < ? \
                         ORDER BY {time} LIMIT ?"
                    )),
                    &with_filter(vec![cutoff_ms.into(), (BATCH as i64 * 4).into()]),
                )
                .await?;
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                break;
            };
            // Still this old when deleted: a row whose time moved on meanwhile is kept.
            let ((_, oldest), (_, newest)): ((i64, i64), (i64, i64)) =
                (first.decode()?, last.decode()?);
            let mut args = with_filter(vec![oldest.into(), newest.into()]);
            for row in &rows {
                let (id, _): (i64, i64) = row.decode()?;
                args.push(id.into());
            }
            deleted += self
                .db
                .execute(
                    &self.sql(&format!(
                        "DELETE FROM {table} WHERE {filter}{time} BETWEEN ? AND ? AND id IN {}",
                        list(rows.len())
                    )),
                    &args,
                )
                .await?;
        }
        Ok(deleted)
    }
}
