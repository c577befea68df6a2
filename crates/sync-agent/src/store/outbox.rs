//! The outbox from the agent's side: sync requests that migrations recorded (in the same
//! transaction as their schema change) and that no job has taken yet.

use fleetsync_common::{JobId, RequestId, sql::Value};

use super::Store;
use crate::model::RequestState;
pub use fleetsync_common::model::SyncRequest;

/// The statement that marks a request taken by the job made from it, and its arguments. A
/// job's request id is its request's id, so this is a no-op for a job no migration asked for.
pub(super) fn take_request(job_id: &JobId, request_id: &RequestId) -> (&'static str, [Value; 4]) {
    (
        "UPDATE sync_requests SET state = ?, job_id = ? WHERE id = ? AND state <> ?",
        [
            RequestState::Taken.as_str().into(),
            job_id.into(),
            request_id.into(),
            RequestState::Taken.as_str().into(),
        ],
    )
}

impl Store {
    /// Sync requests recorded by migrations that no job has taken yet, oldest first.
    pub async fn untaken_requests(&self) -> Result<Vec<SyncRequest>, sqlx::Error> {
        self.db
            .fetch(
                &format!(
                    "SELECT {} FROM sync_requests WHERE state <> ? ORDER BY created_at, id",
                    SyncRequest::COLUMNS
                ),
                &[RequestState::Taken.as_str().into()],
            )
            .await?
            .iter()
            .map(SyncRequest::try_from)
            .collect()
    }
}
