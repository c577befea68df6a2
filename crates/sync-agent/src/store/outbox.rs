//! The outbox from the agent's side: sync requests that migrations recorded (in the same
//! transaction as their schema change) and that no job has taken yet.

use super::Store;
pub use fleetsync_common::model::SyncRequest;

/// Marks a request taken by the job made from it (binds the job id, then the request id). A
/// job's request id is its request's id, so this is a no-op for a job no migration asked for.
pub(super) const TAKE_REQUEST: &str =
    "UPDATE sync_requests SET state = 'taken', job_id = ? WHERE id = ? AND state <> 'taken'";

impl Store {
    /// Sync requests recorded by migrations that no job has taken yet, oldest first.
    pub async fn untaken_requests(&self) -> Result<Vec<SyncRequest>, sqlx::Error> {
        self.db
            .fetch(
                &format!(
                    "SELECT {} FROM sync_requests WHERE state <> 'taken' ORDER BY created_at, id",
                    SyncRequest::COLUMNS
                ),
                &[],
            )
            .await?
            .iter()
            .map(SyncRequest::try_from)
            .collect()
    }
}
