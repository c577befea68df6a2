//! Registration by name, one server or a whole fleet at once (`Fleet/ImportServers`, and
//! `UpsertServer` without an id): the stored registrations of a batch are read in one statement
//! per chunk, each spec is merged in order, and only new or changed servers are written, in
//! multi-row upserts sorted by name (so concurrent importers lock in one order).

use std::collections::HashMap;

use fleetsync_common::ServerId;
use fleetsync_common::{
    Backend, ServiceError,
    sql::{Tx, Value, is_unique_violation, retry},
};

use super::{
    Store, rows,
    servers::ServerSpec,
    services::{service_type, version_kept, write_services},
};
use crate::model::HostKey;

/// What registering one spec did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new server.
    Created,
    /// A registered server changed.
    Updated,
    /// The spec equals what was registered: nothing was written for it.
    Unchanged,
}

/// One spec's server and what registering it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// The server's id.
    pub id: ServerId,
    /// Created, updated or unchanged.
    pub action: Registered,
}

/// The part of a server an import writes, as stored: what decides "unchanged".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registration {
    ip: String,
    port: u16,
    ssh_user: String,
    status: String,
    /// The pinned key.
    host_key: Option<HostKey>,
    /// The database service's stored name and version.
    service: Option<(String, String)>,
    /// The zone (empty: none).
    zone: String,
}

fleetsync_common::stored_row! {
    /// A server's registration as an import compares it (a row of `servers`).
    struct StoredServer {
        id: ServerId,
        name: String,
        ip: String,
        port: i64,
        ssh_user: String,
        status: String,
        host_key_algorithm: Option<String>,
        host_key_fingerprint: Option<String>,
        zone: String,
    }
}

fleetsync_common::stored_row! {
    /// A server's database service as an import compares it.
    struct StoredService {
        server_id: ServerId,
        name: String,
        version: String,
    }
}

/// A name of the batch: as stored before it, as its specs leave it, and the host key they gave.
struct Entry<'a> {
    stored: Option<(ServerId, Registration)>,
    now: Option<Registration>,
    given_key: Option<&'a HostKey>,
}

/// Rows per multi-row statement: 11 columns each, within every backend's bind limit.
const ROWS: usize = 500;

impl Store {
    /// Registers `specs` by name in one transaction (retried on conflicts): each creates its
    /// server or updates the one with its name; a name given twice is applied twice, in order.
    /// One result per spec, in order.
    pub async fn import_servers(
        &self,
        specs: &[ServerSpec],
    ) -> Result<Vec<Imported>, ServiceError> {
        retry("import servers", || self.import_once(specs)).await
    }

    async fn import_once(&self, specs: &[ServerSpec]) -> Result<Vec<Imported>, ServiceError> {
        let now = crate::now_ms();
        let backend = self.backend();
        let mut tx = self.db.begin().await?;
        if backend == Backend::Postgres {
            // Lookups by name and id here are always selective; a table that a large import has
            // just filled has no statistics yet, and PostgreSQL would scan all of it for each
            // chunk (at 100,000 servers, 11 ms a chunk instead of 0.8).
            tx.execute("SET LOCAL enable_seqscan = off", &[]).await?;
        }
        let mut entries = stored(&mut tx, specs).await?;

        // Each spec against the registration its name has at that point, in order.
        let mut actions = Vec::with_capacity(specs.len());
        for spec in specs {
            let entry = entries
                .get_mut(spec.name.as_str())
                .expect("every name was read");
            let wanted = Registration {
                ip: spec.ip.clone(),
                port: spec.port,
                ssh_user: spec.ssh_user.clone(),
                status: spec
                    .status
                    .clone()
                    .or_else(|| entry.now.as_ref().map(|r| r.status.clone()))
                    .unwrap_or_else(|| "ready".to_owned()),
                host_key: match &spec.host_key {
                    Some(key) => Some(key.clone()),
                    None => entry.now.as_ref().and_then(|r| r.host_key.clone()),
                },
                service: spec.database_service.map(|s| {
                    let stored = entry.now.as_ref().and_then(|r| r.service.as_ref());
                    let version = match stored {
                        Some((name, version))
                            if name == s.as_str()
                                && version_kept(&spec.database_version, version) =>
                        {
                            version.clone()
                        }
                        _ => spec.database_version.clone(),
                    };
                    (s.as_str().to_owned(), version)
                }),
                zone: spec.zone.clone(),
            };
            actions.push(match &entry.now {
                None => Registered::Created,
                Some(now) if *now == wanted => Registered::Unchanged,
                Some(_) => Registered::Updated,
            });
            if spec.host_key.is_some() {
                entry.given_key = spec.host_key.as_ref();
            }
            entry.now = Some(wanted);
        }

        let changed = changed_names(&entries);
        let mut ids = write_servers(&mut tx, backend, now, &changed)
            .await
            .map_err(|err| {
                conflict_if_taken(err, "a concurrent call registered one of these names")
            })?;

        // The written rows' ids (MySQL has no RETURNING: they are read back).
        let unread: Vec<&str> = changed
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !ids.contains_key(*name))
            .collect();
        for row in tx
            .fetch_in(
                "SELECT id, name FROM servers WHERE name IN $ids",
                &[],
                &unread,
            )
            .await?
        {
            let (id, name): (ServerId, String) = row.decode()?;
            ids.insert(name, id);
        }
        // A server read above and deleted since (a DeleteServer committed between the read
        // and the write) was inserted again by the upsert, under a new id and with nothing
        // else: from here on it is a new server, written whole below (its lease, its service),
        // and the first spec of its name created it. (Starting over instead could lose every
        // attempt to a stream of deletes.)
        let reborn: Vec<&str> = changed
            .iter()
            .filter(|(name, e)| matches!(&e.stored, Some((id, _)) if ids.get(*name) != Some(id)))
            .map(|(name, _)| *name)
            .collect();
        drop(changed);
        for name in &reborn {
            if let Some(entry) = entries.get_mut(name) {
                entry.stored = None;
            }
            if let Some(first) = specs.iter().position(|s| s.name == *name) {
                actions[first] = Registered::Created;
            }
        }
        let changed = changed_names(&entries);
        // Lease rows of the new servers, with their zone (the queue's copy).
        let new_leases: Vec<(ServerId, &str)> = changed
            .iter()
            .filter(|(_, e)| e.stored.is_none())
            .filter_map(|(name, e)| Some((*ids.get(*name)?, zone_of(e))))
            .collect();
        for chunk in new_leases.chunks(ROWS) {
            let args: Vec<Value> = chunk
                .iter()
                .flat_map(|(id, zone)| [(*id).into(), (*zone).into()])
                .collect();
            tx.execute(
                &format!(
                    "INSERT INTO server_leases (server_id, token, zone) VALUES {}",
                    rows(chunk.len(), 2).replace("(?, ?)", "(?, 0, ?)")
                ),
                &args,
            )
            .await
            .map_err(|err| {
                conflict_if_taken(err, "a concurrent call registered one of these names")
            })?;
        }

        // Servers that moved to another zone: their lease rows follow (claims read the copy).
        let mut moved: HashMap<&str, Vec<ServerId>> = HashMap::new();
        for (_, entry) in &changed {
            if let Some((id, before)) = &entry.stored
                && before.zone != zone_of(entry)
            {
                moved.entry(zone_of(entry)).or_default().push(*id);
            }
        }
        for (zone, ids) in moved {
            tx.execute_in(
                "UPDATE server_leases SET zone = ? WHERE server_id IN $ids",
                &[zone.into()],
                &ids,
            )
            .await?;
        }

        // Database services that changed.
        let id_of = |name: &str, entry: &Entry<'_>| -> Result<ServerId, ServiceError> {
            match &entry.stored {
                Some((id, _)) => Ok(*id),
                None => ids.get(name).copied().ok_or_else(|| {
                    ServiceError::Aborted(format!("server {name:?} was deleted while registered"))
                }),
            }
        };
        let mut services = Vec::new();
        for (name, entry) in &changed {
            let before = entry.stored.as_ref().and_then(|(_, r)| r.service.as_ref());
            let after = entry.now.as_ref().and_then(|r| r.service.as_ref());
            if before != after {
                services.push((
                    id_of(name, entry)?,
                    after.map(|(n, v)| (n.as_str(), v.as_str())),
                ));
            }
        }
        write_services(&mut tx, now, &services)
            .await
            .map_err(|err| {
                conflict_if_taken(
                    err,
                    "a concurrent call registered one of these servers' services",
                )
            })?;
        tx.commit().await?;

        specs
            .iter()
            .zip(actions)
            .map(|(spec, action)| {
                let entry = &entries[spec.name.as_str()];
                Ok(Imported {
                    id: id_of(&spec.name, entry)?,
                    action,
                })
            })
            .collect()
    }
}

/// The names whose registration the batch changes, by name: importers racing on the same
/// names lock them in one order, and never deadlock.
fn changed_names<'e, 'a>(
    entries: &'e HashMap<&'a str, Entry<'a>>,
) -> Vec<(&'a str, &'e Entry<'a>)> {
    let mut changed: Vec<(&str, &Entry<'_>)> = entries
        .iter()
        .filter(|(_, e)| e.now.as_ref() != e.stored.as_ref().map(|(_, r)| r))
        .map(|(name, e)| (*name, e))
        .collect();
    changed.sort_unstable_by_key(|(name, _)| *name);
    changed
}

/// The zone a batch leaves a name in.
fn zone_of<'e>(entry: &'e Entry<'_>) -> &'e str {
    entry.now.as_ref().map_or("", |r| r.zone.as_str())
}

/// The stored registration of every name in `specs`.
async fn stored<'a>(
    tx: &mut Tx,
    specs: &'a [ServerSpec],
) -> Result<HashMap<&'a str, Entry<'a>>, sqlx::Error> {
    let mut entries: HashMap<&str, Entry<'_>> = HashMap::with_capacity(specs.len());
    for spec in specs {
        entries.entry(spec.name.as_str()).or_insert(Entry {
            stored: None,
            now: None,
            given_key: None,
        });
    }
    let names: Vec<&str> = entries.keys().copied().collect();
    let mut by_id: HashMap<ServerId, &str> = HashMap::new();
    let sql = format!(
        "SELECT {} FROM servers WHERE name IN $ids",
        StoredServer::COLUMNS
    );
    for r in tx.fetch_in(&sql, &[], &names).await? {
        let r = StoredServer::try_from(&r)?;
        // Names compare byte for byte on every backend (MySQL's columns are utf8mb4_bin).
        let Some((&name, _)) = entries.get_key_value(r.name.as_str()) else {
            continue;
        };
        let port = r.port;
        let registration = Registration {
            ip: r.ip,
            port: u16::try_from(port).map_err(|_| {
                sqlx::Error::Decode(format!("server {name:?} has port {port}").into())
            })?,
            ssh_user: r.ssh_user,
            status: r.status,
            host_key: HostKey::stored(r.host_key_algorithm, r.host_key_fingerprint),
            service: None,
            zone: r.zone,
        };
        let id = r.id;
        by_id.insert(id, name);
        if let Some(entry) = entries.get_mut(name) {
            entry.stored = Some((id, registration));
        }
    }
    // Their services, by id: a join here would scan every service on PostgreSQL.
    let ids: Vec<ServerId> = by_id.keys().copied().collect();
    let sql = format!(
        "SELECT {} FROM services WHERE type = ? AND server_id IN $ids",
        StoredService::COLUMNS
    );
    for r in tx.fetch_in(&sql, &[service_type()], &ids).await? {
        let r = StoredService::try_from(&r)?;
        let Some(entry) = by_id.get(&r.server_id).and_then(|n| entries.get_mut(n)) else {
            continue;
        };
        if let Some((_, stored)) = &mut entry.stored {
            stored.service = Some((r.name, r.version));
        }
    }
    for entry in entries.values_mut() {
        entry.now = entry.stored.as_ref().map(|(_, r)| r.clone());
    }
    Ok(entries)
}

/// Inserts or updates the changed servers' rows. A key given is pinned (its pin time kept when
/// it is the key already pinned); without one the stored pin stays, also one an agent made
/// since the batch was read. Returns the rows' ids by name where the backend can say them.
async fn write_servers(
    tx: &mut Tx,
    backend: Backend,
    now: i64,
    changed: &[(&str, &Entry<'_>)],
) -> Result<HashMap<String, ServerId>, sqlx::Error> {
    let mut ids = HashMap::new();
    let upsert = match backend {
        // Assignments run left to right and see the new values: the pin time goes first.
        Backend::MySql => {
            "ON DUPLICATE KEY UPDATE ip = VALUES(ip), port = VALUES(port), \
             ssh_user = VALUES(ssh_user), status = VALUES(status), \
             host_key_pinned_at = CASE WHEN VALUES(host_key_fingerprint) IS NULL \
               OR VALUES(host_key_fingerprint) = host_key_fingerprint THEN host_key_pinned_at \
               ELSE VALUES(host_key_pinned_at) END, \
             host_key_algorithm = COALESCE(VALUES(host_key_algorithm), host_key_algorithm), \
             host_key_fingerprint = COALESCE(VALUES(host_key_fingerprint), host_key_fingerprint), \
             zone = VALUES(zone), updated_at = VALUES(updated_at)"
        }
        _ => {
            "ON CONFLICT (name) DO UPDATE SET ip = excluded.ip, port = excluded.port, \
             ssh_user = excluded.ssh_user, status = excluded.status, \
             host_key_pinned_at = CASE WHEN excluded.host_key_fingerprint IS NULL \
               OR excluded.host_key_fingerprint = servers.host_key_fingerprint \
               THEN servers.host_key_pinned_at ELSE excluded.host_key_pinned_at END, \
             host_key_algorithm = COALESCE(excluded.host_key_algorithm, servers.host_key_algorithm), \
             host_key_fingerprint = COALESCE(excluded.host_key_fingerprint, servers.host_key_fingerprint), \
             zone = excluded.zone, updated_at = excluded.updated_at RETURNING id, name"
        }
    };
    for chunk in changed.chunks(ROWS) {
        let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * 11);
        for (name, entry) in chunk {
            let r = entry
                .now
                .as_ref()
                .expect("a changed name has a registration");
            let key = entry.given_key;
            args.extend([
                (*name).into(),
                r.ip.as_str().into(),
                i64::from(r.port).into(),
                r.ssh_user.as_str().into(),
                r.status.as_str().into(),
                key.map(|k| k.algorithm.as_str()).into(),
                key.map(|k| k.fingerprint.as_str()).into(),
                key.map(|_| now).into(),
                r.zone.as_str().into(),
                now.into(),
                now.into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO servers (name, ip, port, ssh_user, status, host_key_algorithm, \
             host_key_fingerprint, host_key_pinned_at, zone, created_at, updated_at) \
             VALUES {} {upsert}",
            rows(chunk.len(), 11)
        );
        if backend == Backend::MySql {
            tx.execute(&sql, &args).await?;
        } else {
            for row in tx.fetch(&sql, &args).await? {
                let (id, name): (ServerId, String) = row.decode()?;
                ids.insert(name, id);
            }
        }
    }
    Ok(ids)
}

/// A unique violation means a concurrent call inserted the same key, a foreign key one that it
/// deleted the server: a conflict, retried (the next attempt reads the rows as they are now).
fn conflict_if_taken(err: sqlx::Error, what: &str) -> ServiceError {
    let raced = is_unique_violation(&err)
        || matches!(&err, sqlx::Error::Database(db) if db.is_foreign_key_violation());
    if raced {
        ServiceError::Aborted(what.to_owned())
    } else {
        err.into()
    }
}
