//! Servers as registered through the `Fleet` API, with their database service, pinned host key,
//! reachability and inventory.

use fleetsync_common::ServerId;
use fleetsync_common::{
    ServiceError,
    sql::{Row, Value, is_unique_violation, retry},
};

use crate::{
    model::{InventoryStatus, Reachability},
    ssh::HostKey,
};

use super::inventory::CharsetsDocument;
use super::services::{service_type, version_kept, write_services};
use super::{Registered, Store};

fleetsync_common::stored_enum! {
    /// The database service registered for a server (`services.name` of its database service).
    pub enum DatabaseService in "database service in services.name" {
        /// MySQL (`sudo mysql`).
        Mysql => "mysql",
        /// MariaDB (`sudo mariadb`).
        Mariadb => "mariadb",
        /// PostgreSQL (`sudo -u postgres psql`).
        Postgresql => "postgresql",
    }
}

/// What an operator registers (validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Unique name.
    pub name: String,
    /// Address or host name.
    pub ip: String,
    /// SSH port.
    pub port: u16,
    /// Login user.
    pub ssh_user: String,
    /// Database service, if any.
    pub database_service: Option<DatabaseService>,
    /// Its version as registered.
    pub database_version: String,
    /// Lifecycle status; `None` keeps the current one.
    pub status: Option<String>,
    /// The host key the panel knows: pinned now, before any contact (`None` keeps the pin).
    pub host_key: Option<HostKey>,
    /// The zone it lives in (empty: none): only agents of that zone sync it.
    pub zone: String,
}

/// A pinned host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedKey {
    /// The key.
    pub key: HostKey,
    /// When it was pinned (ms).
    pub pinned_at: i64,
}

/// A server row with its database service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRecord {
    /// Server id, assigned by the database.
    pub id: ServerId,
    /// Unique, human-readable name.
    pub name: String,
    /// IP address or host name the agent connects to.
    pub ip: String,
    /// SSH port.
    pub port: u16,
    /// Login user.
    pub ssh_user: String,
    /// Lifecycle status, as the panel wrote it (`ready`, `installing`, ...). Kept as text on
    /// purpose: the panel owns this column and may write values this build does not know;
    /// the agent only relays it (an unknown one is `UNSPECIFIED` in the proto), so reading a
    /// server must not fail on it.
    pub status: String,
    /// `unknown`, `online`, `offline`.
    pub reachability: Reachability,
    /// Last successful contact (ms).
    pub last_seen_at: Option<i64>,
    /// Failed attempts since the last success.
    pub consecutive_failures: i64,
    /// Next probe of an offline server (ms).
    pub next_probe_at: Option<i64>,
    /// Pinned host key.
    pub host_key: Option<PinnedKey>,
    /// Registered (ms).
    pub created_at: i64,
    /// Registration changed (ms).
    pub updated_at: i64,
    /// Database service.
    pub database_service: Option<DatabaseService>,
    /// Its version.
    pub database_version: String,
    /// What the stored charset list was read under (`version|default charset`, as the server
    /// reported them), if a sync read one.
    pub inventory_key: Option<String>,
    /// The zone it lives in (empty: none).
    pub zone: String,
}

fleetsync_common::stored_row! {
    /// A server's registration as stored (with its database service), before it is checked:
    /// the columns every read of a server selects.
    pub(super) struct ServerRow {
        id: ServerId = "s.id",
        name: String = "s.name",
        ip: String = "s.ip",
        port: i64 = "s.port",
        ssh_user: String = "s.ssh_user",
        status: String = "s.status",
        reachability: String = "s.reachability",
        last_seen_at: Option<i64> = "s.last_seen_at",
        consecutive_failures: i64 = "s.consecutive_failures",
        next_probe_at: Option<i64> = "s.next_probe_at",
        host_key_algorithm: Option<String> = "s.host_key_algorithm",
        host_key_fingerprint: Option<String> = "s.host_key_fingerprint",
        host_key_pinned_at: Option<i64> = "s.host_key_pinned_at",
        created_at: i64 = "s.created_at",
        updated_at: i64 = "s.updated_at",
        service: Option<String> = "sv.name",
        service_version: Option<String> = "sv.version",
        inventory_key: Option<String> = "sv.inventory_key",
        zone: String = "s.zone",
    }
}

/// The columns of [`ServerRow`].
pub(super) const SERVER_COLUMNS: &str = ServerRow::COLUMNS;
/// How many columns [`SERVER_COLUMNS`] has.
pub(super) const SERVER_COLUMN_COUNT: usize = ServerRow::COLUMN_COUNT;
/// The servers with their database service: its one parameter, first of the statement, is
/// [`service_type`].
pub(super) const SERVER_FROM: &str =
    "servers s LEFT JOIN services sv ON sv.server_id = s.id AND sv.type = ?";

impl ServerRecord {
    /// The pinned host key, as the SSH check wants it.
    pub fn pinned_key(&self) -> Option<&HostKey> {
        self.host_key.as_ref().map(|pin| &pin.key)
    }

    /// Where and as whom to connect, checking against its [`pinned_key`](Self::pinned_key).
    pub fn target(&self) -> crate::ssh::Target<'_> {
        crate::ssh::Target {
            host: &self.ip,
            port: self.port,
            user: &self.ssh_user,
            pinned: self.pinned_key(),
        }
    }
}

/// A registration the agent cannot read: a port out of range, a database service or a state
/// this build does not know (written by hand, or by a newer panel). It becomes that server's own
/// outcome (`PARSE_FAILED`, with the reason), never a failed batch of claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The server.
    pub id: ServerId,
    /// What could not be read.
    pub reason: String,
}

/// A claimed server's registration: the record, or why it cannot be read.
pub type Registration = Result<ServerRecord, Unreadable>;

/// Decodes a row of [`SERVER_COLUMNS`] for a claim: an unreadable registration is the row's
/// own (its id is always readable: the primary key).
pub(super) fn registration(row: &Row) -> Result<Registration, sqlx::Error> {
    let row = ServerRow::try_from(row)?;
    let id = row.id;
    Ok(ServerRecord::try_from(row).map_err(|err| Unreadable {
        id,
        reason: match err {
            sqlx::Error::Decode(why) => why.to_string(),
            other => other.to_string(),
        },
    }))
}

impl Unreadable {
    /// The server of a registration, readable or not.
    pub fn id_of(registration: &Registration) -> ServerId {
        match registration {
            Ok(server) => server.id,
            Err(unreadable) => unreadable.id,
        }
    }
}

impl TryFrom<&Row> for ServerRecord {
    type Error = sqlx::Error;

    fn try_from(row: &Row) -> Result<Self, sqlx::Error> {
        ServerRow::try_from(row)?.try_into()
    }
}

impl TryFrom<ServerRow> for ServerRecord {
    type Error = sqlx::Error;

    /// The registration checked: a port out of range, or a reachability or database service
    /// this build does not know, is a decode error that names the server (so that a listing
    /// that meets it says which one to mend).
    fn try_from(r: ServerRow) -> Result<Self, sqlx::Error> {
        let unreadable = |why: String| {
            sqlx::Error::Decode(format!("server {} ({}): {why}", r.id, r.name).into())
        };
        let port = u16::try_from(r.port)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| {
                unreadable(format!(
                    "servers.port {} is not a TCP port (1 to 65535)",
                    r.port
                ))
            })?;
        let reachability =
            Reachability::parse(&r.reachability).map_err(|e| unreadable(e.to_string()))?;
        let database_service = r
            .service
            .as_deref()
            .map(DatabaseService::parse)
            .transpose()
            .map_err(|e| unreadable(e.to_string()))?;
        let host_key =
            HostKey::stored(r.host_key_algorithm, r.host_key_fingerprint).map(|key| PinnedKey {
                key,
                pinned_at: r.host_key_pinned_at.unwrap_or(0),
            });
        Ok(Self {
            id: r.id,
            name: r.name,
            ip: r.ip,
            port,
            ssh_user: r.ssh_user,
            status: r.status,
            reachability,
            last_seen_at: r.last_seen_at,
            consecutive_failures: r.consecutive_failures,
            next_probe_at: r.next_probe_at,
            host_key,
            created_at: r.created_at,
            updated_at: r.updated_at,
            database_service,
            database_version: r.service_version.unwrap_or_default(),
            inventory_key: r.inventory_key,
            zone: r.zone,
        })
    }
}

/// Whether an upsert created or updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertOutcome {
    /// The server as stored.
    pub server: ServerRecord,
    /// True if it was created.
    pub created: bool,
}

fleetsync_common::stored_row! {
    /// A database as last read from a server (a row of `databases`).
    pub struct DatabaseRecord {
        /// Name, byte for byte.
        pub name: String,
        /// Default charset, as the server reported it.
        pub charset: Option<String>,
        /// Default collation, as the server reported it.
        pub collation: Option<String> = "\"collation\"",
        /// `ready` or `gone` (or a state the panel gave it).
        pub status: InventoryStatus,
        /// Last seen (ms).
        pub updated_at: i64,
    }
}

fleetsync_common::stored_row! {
    /// A row of `database_users` as stored, its database list still JSON text.
    struct UserRow {
        username: String,
        host: String,
        databases: String = "\"databases\"",
        status: InventoryStatus,
    }
}

impl TryFrom<UserRow> for UserRecord {
    type Error = sqlx::Error;

    fn try_from(r: UserRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            databases: serde_json::from_str(&r.databases).map_err(|e| {
                sqlx::Error::Decode(
                    format!("database_users.databases is not a JSON list: {e}").into(),
                )
            })?,
            username: r.username,
            host: r.host,
            status: r.status,
        })
    }
}

/// A database user as last read from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// User name.
    pub username: String,
    /// Host part.
    pub host: String,
    /// Databases it can use.
    pub databases: Vec<String>,
    /// `ready` or `gone` (or a state the panel gave it).
    pub status: InventoryStatus,
}

/// What the last syncs stored about a server's database service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    /// The charsets a sync stored (`services.type_data`), if one did.
    pub charsets: Option<CharsetsDocument>,
    /// Databases, system ones left out, gone ones kept and marked.
    pub databases: Vec<DatabaseRecord>,
    /// Database users, gone ones kept and marked.
    pub users: Vec<UserRecord>,
}

/// A unique violation on the name means a concurrent call took it: a conflict, retried (the
/// next attempt sees the other server and updates it or reports the clash).
fn name_taken(err: sqlx::Error, name: &str) -> ServiceError {
    if is_unique_violation(&err) {
        ServiceError::Aborted(format!("a concurrent call registered {name:?}"))
    } else {
        err.into()
    }
}

/// What resetting a server's host key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyReset {
    /// No server has that id.
    NoSuchServer,
    /// The server's key is forgotten: the next sync pins the one it presents.
    Forgotten {
        /// The key that was pinned, if one was.
        previous: Option<PinnedKey>,
    },
}

impl Store {
    /// One server.
    pub async fn server(&self, id: ServerId) -> Result<Option<ServerRecord>, sqlx::Error> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM {SERVER_FROM} WHERE s.id = ?");
        self.db
            .fetch_optional(&sql, &[service_type(), id.into()])
            .await?
            .as_ref()
            .map(ServerRecord::try_from)
            .transpose()
    }

    /// Servers by ascending id, after `after` (from the first: `None`), optionally with one
    /// reachability.
    pub async fn servers(
        &self,
        reachability: Option<Reachability>,
        after: Option<ServerId>,
        limit: u32,
    ) -> Result<Vec<ServerRecord>, sqlx::Error> {
        let (filter, mut args): (&str, Vec<Value>) = match reachability {
            Some(r) => ("AND s.reachability = ?", vec![r.as_str().into()]),
            None => ("", vec![]),
        };
        let sql = format!(
            "SELECT {SERVER_COLUMNS} FROM {SERVER_FROM} WHERE s.id > ? {filter} ORDER BY s.id LIMIT ?"
        );
        args.insert(0, after.map_or(0, ServerId::get).into());
        args.insert(0, service_type());
        args.push(i64::from(limit).into());
        self.db
            .fetch(&sql, &args)
            .await?
            .iter()
            .map(ServerRecord::try_from)
            .collect()
    }

    /// Creates or updates a server: by id if given (NOT_FOUND if absent), else by name.
    pub async fn upsert_server(
        &self,
        id: Option<ServerId>,
        spec: &ServerSpec,
    ) -> Result<UpsertOutcome, ServiceError> {
        let (id, created) = match id {
            None => {
                let imported = self.import_servers(std::slice::from_ref(spec)).await?;
                let imported = imported.first().ok_or_else(|| {
                    ServiceError::Internal("an import of one server returned nothing".into())
                })?;
                (imported.id, imported.action == Registered::Created)
            }
            Some(id) => (
                retry("update server", || self.update_server_once(id, spec)).await?,
                false,
            ),
        };
        let server = self
            .server(id)
            .await?
            .ok_or_else(|| ServiceError::not_found("server", id))?;
        Ok(UpsertOutcome { server, created })
    }

    /// One attempt at changing the server with this id (a rename included).
    async fn update_server_once(
        &self,
        id: ServerId,
        spec: &ServerSpec,
    ) -> Result<ServerId, ServiceError> {
        let now = crate::now_ms();
        let mut tx = self.db.begin().await?;
        let Some(current) = tx
            .fetch_optional(
                &format!("SELECT sv.name, sv.version FROM {SERVER_FROM} WHERE s.id = ?"),
                &[service_type(), id.into()],
            )
            .await?
        else {
            return Err(ServiceError::not_found("server", id));
        };
        let clash = tx
            .fetch_optional(
                "SELECT id FROM servers WHERE name = ? AND id <> ?",
                &[spec.name.as_str().into(), id.into()],
            )
            .await?;
        if let Some(other) = clash {
            return Err(ServiceError::AlreadyExists(format!(
                "another server (id {}) is named {:?}",
                other.decode::<ServerId>()?,
                spec.name
            )));
        }
        tx.execute(
            "UPDATE servers SET name = ?, ip = ?, port = ?, ssh_user = ?, \
             status = COALESCE(?, status), updated_at = ? WHERE id = ?",
            &[
                spec.name.as_str().into(),
                spec.ip.as_str().into(),
                i64::from(spec.port).into(),
                spec.ssh_user.as_str().into(),
                spec.status.clone().into(),
                now.into(),
                id.into(),
            ],
        )
        .await
        .map_err(|err| name_taken(err, &spec.name))?;
        if let Some(key) = &spec.host_key {
            tx.execute(
                "UPDATE servers SET host_key_pinned_at = CASE WHEN host_key_fingerprint = ? \
                 THEN host_key_pinned_at ELSE ? END, host_key_algorithm = ?, \
                 host_key_fingerprint = ? WHERE id = ?",
                &[
                    key.fingerprint.as_str().into(),
                    now.into(),
                    key.algorithm.as_str().into(),
                    key.fingerprint.as_str().into(),
                    id.into(),
                ],
            )
            .await?;
        }
        let (name, version): (Option<String>, Option<String>) = current.decode()?;
        let stored = name.map(|name| (name, version.unwrap_or_default()));
        let wanted = spec
            .database_service
            .map(|s| (s.as_str(), spec.database_version.as_str()));
        let kept = match (&stored, wanted) {
            (Some((name, version)), Some((wanted, given))) => {
                name == wanted && version_kept(given, version)
            }
            (None, None) => true,
            _ => false,
        };
        if !kept {
            write_services(&mut tx, now, &[(id, wanted)]).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Deletes a server with its inventory and lease; the job rows waiting for it end as
    /// `CANCELLED`, in the same transaction. False if there was none.
    pub async fn delete_server(&self, id: ServerId) -> Result<bool, sqlx::Error> {
        retry("delete server", || self.delete_server_once(id)).await
    }

    async fn delete_server_once(&self, id: ServerId) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        // The locks every filler of job rows takes, in the same order: the server's lease row
        // (a completion of this server holds it; a twin delete queues here), then the job rows
        // in id order (in `cancel_waiting`).
        tx.fetch(
            &format!(
                "SELECT token FROM server_leases WHERE server_id = ?{}",
                super::for_update(self.backend())
            ),
            &[id.into()],
        )
        .await?;
        super::fill::cancel_waiting(&mut tx, id).await?;
        // Explicit deletes: MySQL and PostgreSQL cascade, SQLite only with foreign keys on.
        for sql in [
            "DELETE FROM server_leases WHERE server_id = ?",
            "DELETE FROM sync_runs WHERE server_id = ?",
            "DELETE FROM database_users WHERE server_id = ?",
            "DELETE FROM \"databases\" WHERE server_id = ?",
            "DELETE FROM services WHERE server_id = ?",
        ] {
            tx.execute(&self.sql(sql), &[id.into()]).await?;
        }
        let deleted = tx
            .execute("DELETE FROM servers WHERE id = ?", &[id.into()])
            .await?;
        tx.commit().await?;
        Ok(deleted > 0)
    }

    /// Forgets a server's pinned host key.
    pub async fn reset_host_key(&self, id: ServerId) -> Result<HostKeyReset, sqlx::Error> {
        let Some(server) = self.server(id).await? else {
            return Ok(HostKeyReset::NoSuchServer);
        };
        self.db
            .execute(
                "UPDATE servers SET host_key_algorithm = NULL, host_key_fingerprint = NULL, \
                 host_key_pinned_at = NULL WHERE id = ?",
                &[id.into()],
            )
            .await?;
        Ok(HostKeyReset::Forgotten {
            previous: server.host_key,
        })
    }

    /// What the syncs stored about a server.
    pub async fn inventory(&self, id: ServerId) -> Result<Inventory, sqlx::Error> {
        let type_data = self
            .db
            .fetch_optional(
                "SELECT type_data FROM services WHERE server_id = ? AND type = ?",
                &[id.into(), service_type()],
            )
            .await?
            .map(|row| row.decode::<Option<String>>())
            .transpose()?
            .flatten()
            .map(|text| CharsetsDocument::decode(&text))
            .transpose()?;
        let databases = self
            .db
            .fetch(
                &self.sql(&format!(
                    "SELECT {} FROM \"databases\" WHERE server_id = ? ORDER BY name",
                    DatabaseRecord::COLUMNS
                )),
                &[id.into()],
            )
            .await?
            .iter()
            .map(DatabaseRecord::try_from)
            .collect::<Result<_, sqlx::Error>>()?;
        let users = self
            .db
            .fetch(
                &self.sql(&format!(
                    "SELECT {} FROM database_users WHERE server_id = ? ORDER BY username, host",
                    UserRow::COLUMNS
                )),
                &[id.into()],
            )
            .await?
            .iter()
            .map(|r| UserRow::try_from(r)?.try_into())
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Inventory {
            charsets: type_data,
            databases,
            users,
        })
    }
}
