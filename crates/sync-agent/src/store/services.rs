//! The database service rows (`services`): the one writer of them, for Fleet registration by id
//! and imports alike, and the service type the agent selects.

use fleetsync_common::ServerId;
use fleetsync_common::{
    Backend,
    model::{ServiceStatus, ServiceType},
    sql::{Tx, Value},
};

use super::rows;

/// Rows per multi-row statement: 7 columns each, within every backend's bind limit.
const ROWS: usize = 500;

/// The argument of `servers::SERVER_FROM` (and of every `services.type` the agent selects).
pub(super) fn service_type() -> Value {
    ServiceType::Database.as_str().into()
}

/// Sets the database service of each server in `changes` (its id and the service's name and
/// version, `None` for no service). A service of another kind starts afresh: the charsets and
/// the inventory key read from the old one are dropped.
pub(super) async fn write_services(
    tx: &mut Tx,
    now: i64,
    changes: &[(ServerId, Option<(&str, &str)>)],
) -> Result<(), sqlx::Error> {
    let gone: Vec<ServerId> = changes
        .iter()
        .filter(|(_, s)| s.is_none())
        .map(|(id, _)| *id)
        .collect();
    tx.execute_in(
        "DELETE FROM services WHERE type = ? AND server_id IN $ids",
        &[service_type()],
        &gone,
    )
    .await?;
    let set: Vec<(ServerId, (&str, &str))> = changes
        .iter()
        .filter_map(|(id, s)| s.map(|s| (*id, s)))
        .collect();
    let upsert = match tx.backend() {
        Backend::MySql => {
            "ON DUPLICATE KEY UPDATE \
             type_data = CASE WHEN name = VALUES(name) THEN type_data END, \
             inventory_key = CASE WHEN name = VALUES(name) THEN inventory_key END, \
             name = VALUES(name), version = VALUES(version), updated_at = VALUES(updated_at)"
        }
        _ => {
            "ON CONFLICT (server_id, type) DO UPDATE SET \
             type_data = CASE WHEN services.name = excluded.name THEN services.type_data END, \
             inventory_key = CASE WHEN services.name = excluded.name \
               THEN services.inventory_key END, \
             name = excluded.name, version = excluded.version, updated_at = excluded.updated_at"
        }
    };
    for chunk in set.chunks(ROWS) {
        let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * 7);
        for (id, (name, version)) in chunk {
            args.extend([
                (*id).into(),
                service_type(),
                (*name).into(),
                (*version).into(),
                ServiceStatus::Ready.as_str().into(),
                now.into(),
                now.into(),
            ]);
        }
        tx.execute(
            &format!(
                "INSERT INTO services (server_id, type, name, version, status, created_at, \
                 updated_at) VALUES {} {upsert}",
                rows(chunk.len(), 7)
            ),
            &args,
        )
        .await?;
    }
    Ok(())
}

/// Whether a registered service `given` version leaves the `stored` one as it is: when it says
/// nothing, or the same, or less of it (a panel's "10.11" for the "10.11.19-MariaDB" a sync read
/// from the server since). So registering a fleet again does not undo what its syncs learnt.
pub(super) fn version_kept(given: &str, stored: &str) -> bool {
    given.is_empty()
        || stored
            .strip_prefix(given)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::version_kept;

    #[test]
    fn a_registered_version_stands_for_the_precise_one_a_sync_read() {
        assert!(version_kept("", "10.11.19-MariaDB"));
        assert!(version_kept("10.11", "10.11.19-MariaDB"));
        assert!(version_kept("10.11.19-MariaDB", "10.11.19-MariaDB"));
        assert!(version_kept("16", "16.4"));
        assert!(!version_kept("10.1", "10.11.19-MariaDB"));
        assert!(!version_kept("10.6", "10.11.19-MariaDB"));
        assert!(!version_kept("10.11", ""));
    }
}
