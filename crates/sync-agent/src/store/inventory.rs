//! Writing what syncs read from servers, a batch at a time: databases, users and charsets,
//! diffed against what is stored (new ones added, changed ones updated, vanished ones marked
//! gone; retention deletes them once gone longer than the retention).

use std::collections::{BTreeMap, HashMap};

use fleetsync_common::ServerId;
use fleetsync_common::sql::Tx;

use super::quote_identifiers;
use crate::model::{InventoryStatus, ServiceType};

/// What a sync read, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InventoryWrite {
    /// The service's version as it reports it.
    pub version: Option<String>,
    /// The charset list, unless the server said it is unchanged since `key` was stored.
    pub charsets: Option<Charsets>,
    /// Its databases, system databases excluded, by name.
    pub databases: Vec<DatabaseRead>,
    /// Its users, by (username, host).
    pub users: Vec<UserRead>,
}

/// A database as a sync read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRead {
    /// Its name.
    pub name: String,
    /// Its default charset (the server's, where it has none of its own).
    pub charset: String,
    /// Its default collation (empty where the server reports none).
    pub collation: String,
}

/// A database user as a sync read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRead {
    /// The login name.
    pub username: String,
    /// The host it may connect from (`%`, `localhost`; empty on PostgreSQL).
    pub host: String,
    /// The databases it is granted, as read (unsorted, may repeat).
    pub databases: Vec<String>,
}

/// A service's charsets and collations, as read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Charsets {
    /// What `services.type_data` stores.
    pub document: CharsetsDocument,
    /// What they were read under (`services.inventory_key`): `version|default charset`.
    pub key: String,
}

/// `services.type_data` of a database service, as the agent writes it and reads it back (the
/// panel's shape: `{"charsets": {charset: {"default": collation, "list": [collations]}},
/// "defaultCharset": charset}`). A stored document of another shape is a decode error.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CharsetsDocument {
    /// Each charset with its collations.
    pub charsets: BTreeMap<String, CharsetEntry>,
    /// The server's default charset.
    #[serde(rename = "defaultCharset")]
    pub default_charset: String,
}

/// One charset of a [`CharsetsDocument`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CharsetEntry {
    /// Its default collation, if the server named one.
    pub default: Option<String>,
    /// Its collations, sorted, each once.
    pub list: Vec<String>,
}

impl CharsetsDocument {
    /// The stored text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a charsets document serialises")
    }

    /// From the stored text: another shape is an error, never an empty list.
    pub fn decode(text: &str) -> Result<Self, sqlx::Error> {
        serde_json::from_str(text).map_err(|e| {
            sqlx::Error::Decode(
                format!("services.type_data is not a charsets document: {e}").into(),
            )
        })
    }
}

/// What a write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct InventoryCounts {
    /// Databases seen for the first time.
    pub databases_added: u32,
    /// Databases whose charset or collation changed, or that came back.
    pub databases_updated: u32,
    /// Databases marked gone.
    pub databases_gone: u32,
    /// Users seen for the first time.
    pub users_added: u32,
    /// Users whose databases changed, or that came back.
    pub users_updated: u32,
    /// Users marked gone.
    pub users_gone: u32,
    /// Charsets read.
    pub charsets: u32,
}

/// Writes the inventories of a batch of servers inside `tx`; returns what changed, in the
/// order given. Reads what is stored for the whole batch in two statements and stamps every
/// database seen in one, so that a sync that changes nothing costs three statements per batch,
/// not a few per server; only rows that changed are written one by one.
pub(super) async fn write_all(
    tx: &mut Tx,
    items: &[(ServerId, &InventoryWrite)],
    now: i64,
) -> Result<Vec<InventoryCounts>, sqlx::Error> {
    let backend = tx.backend();
    let q = |sql: &str| quote_identifiers(backend, sql).into_owned();
    let mut all_counts = Vec::with_capacity(items.len());
    let ids: Vec<ServerId> = items.iter().map(|(id, _)| *id).collect();

    // What is stored, for every server of the batch.
    let mut stored_databases: HashMap<ServerId, BTreeMap<String, StoredDatabase>> = HashMap::new();
    let mut stored_users: HashMap<ServerId, BTreeMap<UserKey, StoredUser>> = HashMap::new();
    let sql = q(&format!(
        "SELECT {} FROM \"databases\" WHERE server_id IN $ids",
        DatabaseRow::COLUMNS
    ));
    for row in tx.fetch_in(&sql, &[], &ids).await? {
        let r = DatabaseRow::try_from(&row)?;
        stored_databases
            .entry(r.server_id)
            .or_default()
            .insert(r.name, (r.charset, r.collation, r.status));
    }
    let sql = q(&format!(
        "SELECT {} FROM database_users WHERE server_id IN $ids",
        UserRow::COLUMNS
    ));
    for row in tx.fetch_in(&sql, &[], &ids).await? {
        let r = UserRow::try_from(&row)?;
        stored_users
            .entry(r.server_id)
            .or_default()
            .insert((r.username, r.host), (r.databases, r.status));
    }

    for (server_id, inventory) in items {
        let server_id = *server_id;
        let mut counts = InventoryCounts {
            charsets: inventory.charsets.as_ref().map_or(0, |c| {
                u32::try_from(c.document.charsets.len()).unwrap_or(u32::MAX)
            }),
            ..InventoryCounts::default()
        };
        // The charset list (a large document) is written only when it was read: when the
        // server's version or default charset differ from the stored key.
        if let Some(charsets) = &inventory.charsets {
            tx.execute(
                "UPDATE services SET type_data = ?, inventory_key = ?, \
                 version = COALESCE(?, version), updated_at = ? \
                 WHERE server_id = ? AND type = ?",
                &[
                    charsets.document.encode().into(),
                    charsets.key.as_str().into(),
                    inventory.version.clone().into(),
                    now.into(),
                    server_id.into(),
                    ServiceType::Database.as_str().into(),
                ],
            )
            .await?;
        }
        let stored = stored_databases.remove(&server_id).unwrap_or_default();
        write_databases(tx, server_id, inventory, &stored, now, &mut counts).await?;
        let stored = stored_users.remove(&server_id).unwrap_or_default();
        write_users(tx, server_id, inventory, &stored, now, &mut counts).await?;
        all_counts.push(counts);
    }

    // Every database a sync saw was seen now (`Database.synced_at`); after the writes above,
    // those are exactly the ready ones.
    tx.execute_in(
        &q("UPDATE \"databases\" SET updated_at = ? WHERE status = ? AND server_id IN $ids"),
        &[now.into(), InventoryStatus::Ready.as_str().into()],
        &ids,
    )
    .await?;
    Ok(all_counts)
}

fleetsync_common::stored_row! {
    /// A database as a sync compares it (a row of `databases`).
    struct DatabaseRow {
        server_id: ServerId,
        name: String,
        charset: Option<String>,
        collation: Option<String> = "\"collation\"",
        status: InventoryStatus,
    }
}

fleetsync_common::stored_row! {
    /// A database user as a sync compares it (a row of `database_users`, its databases as the
    /// stored JSON text).
    struct UserRow {
        server_id: ServerId,
        username: String,
        host: String,
        databases: String = "\"databases\"",
        status: InventoryStatus,
    }
}

/// A stored database: charset, collation, status.
type StoredDatabase = (Option<String>, Option<String>, InventoryStatus);
/// A user's key: username, host.
type UserKey = (String, String);
/// A stored user: its databases (JSON list), status.
type StoredUser = (String, InventoryStatus);

/// Databases, by name: new ones added, changed ones updated, vanished ones marked gone.
async fn write_databases(
    tx: &mut Tx,
    server_id: ServerId,
    inventory: &InventoryWrite,
    stored: &BTreeMap<String, StoredDatabase>,
    now: i64,
    counts: &mut InventoryCounts,
) -> Result<(), sqlx::Error> {
    let backend = tx.backend();
    let q = |sql: &str| quote_identifiers(backend, sql).into_owned();
    let seen: BTreeMap<&str, (&str, &str)> = inventory
        .databases
        .iter()
        .map(|d| (d.name.as_str(), (d.charset.as_str(), d.collation.as_str())))
        .collect();
    for (name, (charset, collation)) in &seen {
        match stored.get(*name) {
            None => {
                tx.execute(
                    &q("INSERT INTO \"databases\" (server_id, name, status, charset, \"collation\", \
                        created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                    &[
                        server_id.into(),
                        (*name).into(),
                        InventoryStatus::Ready.as_str().into(),
                        (*charset).into(),
                        (*collation).into(),
                        now.into(),
                        now.into(),
                    ],
                )
                .await?;
                counts.databases_added += 1;
            }
            Some((c, co, status)) => {
                let changed = c.as_deref() != Some(*charset)
                    || co.as_deref() != Some(*collation)
                    || *status != InventoryStatus::Ready;
                if !changed {
                    continue;
                }
                counts.databases_updated += 1;
                tx.execute(
                    &q(
                        "UPDATE \"databases\" SET charset = ?, \"collation\" = ?, status = ?, \
                        updated_at = ? WHERE server_id = ? AND name = ?",
                    ),
                    &[
                        (*charset).into(),
                        (*collation).into(),
                        InventoryStatus::Ready.as_str().into(),
                        now.into(),
                        server_id.into(),
                        (*name).into(),
                    ],
                )
                .await?;
            }
        }
    }
    for (name, (_, _, status)) in stored {
        if *status != InventoryStatus::Gone && !seen.contains_key(name.as_str()) {
            tx.execute(
                &q("UPDATE \"databases\" SET status = ?, updated_at = ? WHERE server_id = ? AND name = ?"),
                &[
                    InventoryStatus::Gone.as_str().into(),
                    now.into(),
                    server_id.into(),
                    name.as_str().into(),
                ],
            )
            .await?;
            counts.databases_gone += 1;
        }
    }
    Ok(())
}

/// Users, by (username, host): new ones added, changed ones updated, vanished ones marked gone.
async fn write_users(
    tx: &mut Tx,
    server_id: ServerId,
    inventory: &InventoryWrite,
    stored: &BTreeMap<UserKey, StoredUser>,
    now: i64,
    counts: &mut InventoryCounts,
) -> Result<(), sqlx::Error> {
    let backend = tx.backend();
    let q = |sql: &str| quote_identifiers(backend, sql).into_owned();
    let mut seen: BTreeMap<(&str, &str), String> = BTreeMap::new();
    for user in &inventory.users {
        let mut databases = user.databases.clone();
        databases.sort();
        databases.dedup();
        let json = serde_json::to_string(&databases).expect("strings serialise");
        seen.insert((user.username.as_str(), user.host.as_str()), json);
    }
    for ((user, host), databases) in &seen {
        match stored.get(&((*user).to_owned(), (*host).to_owned())) {
            None => {
                tx.execute(
                    &q("INSERT INTO database_users (server_id, username, host, \"databases\", status, \
                        created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                    &[
                        server_id.into(),
                        (*user).into(),
                        (*host).into(),
                        databases.as_str().into(),
                        InventoryStatus::Ready.as_str().into(),
                        now.into(),
                        now.into(),
                    ],
                )
                .await?;
                counts.users_added += 1;
            }
            Some((stored_databases, status)) => {
                if stored_databases == databases && *status == InventoryStatus::Ready {
                    continue;
                }
                counts.users_updated += 1;
                tx.execute(
                    &q(
                        "UPDATE database_users SET \"databases\" = ?, status = ?, updated_at = ? \
                        WHERE server_id = ? AND username = ? AND host = ?",
                    ),
                    &[
                        databases.as_str().into(),
                        InventoryStatus::Ready.as_str().into(),
                        now.into(),
                        server_id.into(),
                        (*user).into(),
                        (*host).into(),
                    ],
                )
                .await?;
            }
        }
    }
    for ((user, host), (_, status)) in stored {
        if *status != InventoryStatus::Gone && !seen.contains_key(&(user.as_str(), host.as_str())) {
            tx.execute(
                "UPDATE database_users SET status = ?, updated_at = ? \
                 WHERE server_id = ? AND username = ? AND host = ?",
                &[
                    InventoryStatus::Gone.as_str().into(),
                    now.into(),
                    server_id.into(),
                    user.as_str().into(),
                    host.as_str().into(),
                ],
            )
            .await?;
            counts.users_gone += 1;
        }
    }
    Ok(())
}
