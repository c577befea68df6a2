//! The migrator's domain values: where a migration stands, stored as text in the history table
//! and converted at the database edge (`history`) and the proto edge (`service`). The sync
//! scopes a migration asks for are `common::model::Scopes`, shared with the agent.

pub use fleetsync_common::model::{Scope, Scopes, SyncRequest};
use fleetsync_common::stored_enum;

stored_enum! {
    /// Where one migration stands. `Pending` is never stored: it is the absence of a history
    /// row.
    pub enum State in "migration state in fleetsync_schema_history" {
        /// Not applied.
        Pending => "pending",
        /// Applied to the end and recorded.
        Applied => "applied",
        /// Interrupted part-way (journaled migrations); resumable.
        Partial => "partial",
        /// Failed on a statement; re-run once fixed.
        Failed => "failed",
    }
}

stored_enum! {
    /// Where the way down of one migration stands (a row of `fleetsync_schema_rollbacks`).
    pub enum RollbackState in "state in fleetsync_schema_rollbacks" {
        /// Under way, or interrupted (journaled reverses): the next `migrate` finishes it first.
        Reverting => "reverting",
        /// Done: the migration's history row is gone and its reverse ran to the end.
        Reverted => "reverted",
    }
}
