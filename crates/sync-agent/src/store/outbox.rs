//! The outbox from the agent's side: sync requests that migrations recorded (in the same
//! transaction as their schema change) and that no job has taken yet.

use super::Store;

/// A sync request a migration recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// `migration-VERSION`: the job made from it takes this as its request id.
    pub id: String,
    /// What the migration asked to re-read (`databases,charsets`, ...).
    pub scopes: String,
    /// Why, for the job's reason.
    pub reason: String,
}

impl Store {
    /// Sync requests recorded by migrations that no job has taken yet, oldest first.
    pub async fn untaken_requests(&self) -> Result<Vec<SyncRequest>, sqlx::Error> {
        self.db
            .fetch(
                "SELECT id, scopes, reason FROM sync_requests WHERE state <> 'taken' \
                 ORDER BY created_at, id",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(SyncRequest {
                    id: r.text(0)?,
                    scopes: r.text(1)?,
                    reason: r.text(2)?,
                })
            })
            .collect()
    }
}
