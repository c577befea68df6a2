//! The control-plane database: one handle over the three supported backends (SQLite, the
//! embedded default; PostgreSQL; MySQL/MariaDB), opened from a URL.

use std::{fmt, str::FromStr, time::Duration};

use sqlx::{
    MySqlPool, PgPool, SqlitePool,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// How long to wait for a connection (to open one, or to get one from the pool): a call made
/// while the database is down fails with UNAVAILABLE after this long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long SQLite waits on a lock held by another connection before `SQLITE_BUSY`.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// SQLite's page cache per connection, in KiB (`PRAGMA cache_size`, negative: KiB). SQLite's
/// default, 2 MiB, holds the upper levels of a 100,000-server control plane's indexes but not
/// of a 1,000,000-server one, whose claims and completions then read most pages from the
/// operating system again. A cache fills only as far as a connection reads.
pub const SQLITE_CACHE_KIB: i64 = 32 * 1024;
/// WAL pages past which a SQLite writer checkpoints on its own, inside its commit
/// (`PRAGMA wal_autocheckpoint`; SQLite's default is 1,000). A checkpoint copies every page the
/// log holds into the database file: at 1,000,000 runs stored, a retention batch's 1,000 pages
/// took 15 ms to copy after a 7 ms transaction, and every writer waited. The agent checkpoints
/// from a connection of its own instead ([`Db::checkpoint`]: WAL mode lets one checkpoint run
/// beside a write), so a writer does so only when that falls behind; 4,096 frames are one
/// segment of the log's index, which readers search for every page they read.
pub const SQLITE_AUTOCHECKPOINT_PAGES: i64 = 4096;
/// Connections in a PostgreSQL or MySQL pool unless the caller says otherwise.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// How to open the control-plane database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbOptions {
    /// How long to wait for a connection (to open one, or to get one from the pool).
    pub connect_timeout: Duration,
    /// Most connections in the pool (PostgreSQL and MySQL; SQLite has one writer and keeps 8).
    pub pool_size: u32,
    /// What every session of the pool runs under.
    pub limits: SessionLimits,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            limits: SessionLimits::default(),
        }
    }
}

/// Bounds on every session, so that no connection of ours waits forever behind someone else's
/// lock, runs a statement forever, or sits in a transaction forever (holding its locks), and a
/// dead peer is noticed. Each backend in its own terms:
///
/// | limit | PostgreSQL | MySQL / MariaDB | SQLite |
/// |---|---|---|---|
/// | `statement` | `statement_timeout` | `max_statement_time` (MariaDB), `max_execution_time` (MySQL, reads only) | none (no network, our own transactions) |
/// | `lock` | `lock_timeout` | `innodb_lock_wait_timeout` and `lock_wait_timeout` (whole seconds, at least 1) | `busy_timeout` (always [`SQLITE_BUSY_TIMEOUT`]: one writer at a time) |
/// | `idle_in_transaction` | `idle_in_transaction_session_timeout` | `idle_transaction_timeout` (MariaDB; MySQL has none) | none |
///
/// TCP keepalive (30 s idle, then every 10 s, 3 probes) is set on every connection to
/// PostgreSQL and MySQL (`vendor/sqlx-core`). A statement cut short by these limits is
/// transient (`sql::classify`): its transaction is tried again, never recorded as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest statement.
    pub statement: Duration,
    /// Longest wait for a lock another session holds.
    pub lock: Duration,
    /// Longest pause inside a transaction before the server ends the session.
    pub idle_in_transaction: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            statement: Duration::from_secs(60),
            lock: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(60),
        }
    }
}

impl SessionLimits {
    /// PostgreSQL's startup parameters.
    fn postgres(&self) -> [(&'static str, String); 3] {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        [
            ("statement_timeout", ms(self.statement)),
            ("lock_timeout", ms(self.lock)),
            (
                "idle_in_transaction_session_timeout",
                ms(self.idle_in_transaction),
            ),
        ]
    }

    /// MySQL's and MariaDB's session settings; a variable the server does not know (MariaDB's
    /// on MySQL and the reverse) is skipped.
    fn mysql(&self) -> Vec<String> {
        let secs = |d: Duration| d.as_secs_f64().ceil().max(1.0) as u64;
        vec![
            format!("SET SESSION innodb_lock_wait_timeout = {}", secs(self.lock)),
            format!("SET SESSION lock_wait_timeout = {}", secs(self.lock)),
            format!(
                "SET SESSION max_statement_time = {:.3}",
                self.statement.as_secs_f64()
            ),
            format!(
                "SET SESSION max_execution_time = {}",
                self.statement.as_millis()
            ),
            format!(
                "SET SESSION idle_transaction_timeout = {}",
                secs(self.idle_in_transaction)
            ),
        ]
    }
}

/// Which database server the control plane lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite file, the embedded default.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

impl Backend {
    /// The backend a URL names, by its scheme.
    pub fn from_url(url: &str) -> Result<Self, DbError> {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
            .ok_or_else(|| DbError::InvalidUrl {
                url: redact_url(url),
                reason: "expected a URL like sqlite://fleetsync.db, postgres://... or mysql://..."
                    .into(),
            })?;
        match scheme.as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::MySql),
            other => Err(DbError::InvalidUrl {
                url: redact_url(url),
                reason: format!(
                    "unsupported scheme `{other}`: use sqlite://, postgres:// or mysql://"
                ),
            }),
        }
    }

    /// Short name: `sqlite`, `postgres` or `mysql`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is not one we can use.
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database did not answer, or refused us.
    // The driver's message already includes its causes: not a `#[source]`, so that error
    // chains do not print them twice.
    #[error("cannot connect to {url}: {error}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// The driver's error.
        error: sqlx::Error,
    },
    /// No connection within the timeout.
    #[error("cannot connect to {url}: no connection within {timeout:?}")]
    Timeout {
        /// The URL, password removed.
        url: String,
        /// How long we waited.
        timeout: Duration,
    },
}

/// An open control-plane database: a connection pool for one of the three backends.
///
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub enum Db {
    /// SQLite file in WAL mode with a busy timeout.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
    /// MySQL or MariaDB.
    MySql(MySqlPool),
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Db").field(&self.backend()).finish()
    }
}

impl Db {
    /// Opens the database a URL names, with the default timeout.
    ///
    /// SQLite files are created if missing and opened in WAL mode with a busy timeout, so that
    /// several processes can share one file.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::connect_with_timeout(url, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Opens the database a URL names, waiting at most `timeout` for the first connection.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Self, DbError> {
        Self::connect_with(
            url,
            DbOptions {
                connect_timeout: timeout,
                ..DbOptions::default()
            },
        )
        .await
    }

    /// Opens the database a URL names with these options.
    ///
    /// MySQL sessions run at `READ COMMITTED`: every statement sees what is committed when it
    /// starts, as on PostgreSQL, and InnoDB takes no gap locks (the source of most deadlocks
    /// between concurrent inserts).
    pub async fn connect_with(url: &str, options: DbOptions) -> Result<Self, DbError> {
        let timeout = options.connect_timeout;
        let limits = options.limits;
        let pool_size = options.pool_size.max(2);
        let backend = Backend::from_url(url)?;
        let redacted = redact_url(url);
        let invalid = |source: sqlx::Error| DbError::InvalidUrl {
            url: redacted.clone(),
            reason: source.to_string(),
        };
        let connect = async {
            match backend {
                Backend::Sqlite => {
                    let options = SqliteConnectOptions::from_str(url)
                        .map_err(invalid)?
                        .create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(SQLITE_BUSY_TIMEOUT)
                        .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
                        .pragma(
                            "wal_autocheckpoint",
                            SQLITE_AUTOCHECKPOINT_PAGES.to_string(),
                        )
                        .foreign_keys(true);
                    SqlitePoolOptions::new()
                        .max_connections(8)
                        .acquire_timeout(timeout)
                        .connect_with(options)
                        .await
                        .map(Self::Sqlite)
                }
                // One direct connection first: the pool would retry a refused connection until
                // its timeout and then report only the timeout, not why.
                Backend::Postgres => {
                    let options = PgConnectOptions::from_str(url)
                        .map_err(invalid)?
                        .options(limits.postgres());
                    probe::<sqlx::PgConnection>(&options).await.map(|()| {
                        Self::Postgres(
                            PgPoolOptions::new()
                                .max_connections(pool_size)
                                .acquire_timeout(timeout)
                                .connect_lazy_with(options),
                        )
                    })
                }
                Backend::MySql => {
                    let url = url.replacen("mariadb:", "mysql:", 1);
                    let options = MySqlConnectOptions::from_str(&url).map_err(invalid)?;
                    probe::<sqlx::MySqlConnection>(&options).await.map(|()| {
                        Self::MySql(
                            MySqlPoolOptions::new()
                                .max_connections(pool_size)
                                .acquire_timeout(timeout)
                                .after_connect(move |conn, _| {
                                    let settings = limits.mysql();
                                    Box::pin(async move {
                                        use sqlx::Executor;
                                        conn.execute(
                                            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                                        )
                                        .await?;
                                        for setting in settings {
                                            match sqlx::raw_sql(sqlx::AssertSqlSafe(setting)).execute(&mut *conn).await {
                                                Ok(_) => {}
                                                // 1193: unknown system variable.
                                                Err(sqlx::Error::Database(db))
                                                    if db
                                                        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                                                        .is_some_and(|e| e.number() == 1193) => {}
                                                Err(err) => return Err(err),
                                            }
                                        }
                                        Ok(())
                                    })
                                })
                                .connect_lazy_with(options),
                        )
                    })
                }
            }
            .map_err(|source| match source {
                sqlx::Error::PoolTimedOut => DbError::Timeout {
                    url: redacted.clone(),
                    timeout,
                },
                error => DbError::Connect {
                    url: redacted.clone(),
                    error,
                },
            })
        };
        // The pool's own timeout does not cover every stage (DNS, TLS): bound the whole thing.
        match tokio::time::timeout(timeout + Duration::from_secs(1), connect).await {
            Ok(result) => result,
            Err(_) => Err(DbError::Timeout {
                url: redacted,
                timeout,
            }),
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
            Self::MySql(_) => Backend::MySql,
        }
    }

    /// Runs `SELECT 1`: succeeds if the database answers now.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Self::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Self::MySql(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        }
    }

    /// SQLite: copies the pages the write-ahead log holds into the database file (a passive
    /// checkpoint: it waits for no one and runs beside a writer; the pages of transactions
    /// still read by an older snapshot wait for the next one). A no-op on PostgreSQL and
    /// MySQL.
    pub async fn checkpoint(&self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(pool)
                .await
                .map(drop),
            Self::Postgres(_) | Self::MySql(_) => Ok(()),
        }
    }

    /// Closes every connection of the pool, waiting for those in use to be returned.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
            Self::MySql(pool) => pool.close().await,
        }
    }
}

/// Opens and closes one connection, to surface the real error (refused, bad password, unknown
/// database) at once.
async fn probe<C: sqlx::Connection>(options: &C::Options) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    let connection = options.connect().await?;
    connection.close().await
}

/// Where a database URL points, for messages: the absolute path of a SQLite file (a relative
/// path is taken from the working directory, where it is created if missing), or the URL with
/// its password redacted.
pub fn describe_url(url: &str) -> String {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return redact_url(url);
    };
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return "an in-memory SQLite database".into();
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.into());
    format!("the SQLite file {}", absolute.display())
}

/// The URL with its password replaced by `***`, fit for messages and logs: the one in the
/// user info (`user:PASSWORD@host`) and any `password=` query parameter (sqlx accepts both).
pub fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_scheme() {
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("sqlite:x.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("mariadb://h/db").unwrap(), Backend::MySql);
        assert_eq!(Backend::from_url("MYSQL://h/db").unwrap(), Backend::MySql);
        let err = Backend::from_url("redis://h").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme `redis`"), "{err}");
        let err = Backend::from_url("fleetsync.db").unwrap_err().to_string();
        assert!(err.contains("expected a URL"), "{err}");
    }

    #[test]
    fn describes_where_a_url_points() {
        let here = std::env::current_dir().expect("cwd");
        assert_eq!(
            describe_url("sqlite://fleetsync.db?mode=rwc"),
            format!("the SQLite file {}", here.join("fleetsync.db").display())
        );
        assert_eq!(
            describe_url("sqlite:///var/lib/fleetsync/cp.db"),
            "the SQLite file /var/lib/fleetsync/cp.db"
        );
        assert_eq!(
            describe_url("sqlite::memory:"),
            "an in-memory SQLite database"
        );
        assert_eq!(
            describe_url("postgres://app:s3cret@db/cp"),
            "postgres://app:***@db/cp"
        );
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:s3cr:et@db.example:5432/cp?sslmode=require"),
            "postgres://app:***@db.example:5432/cp?sslmode=require"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1:3306/test"),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(redact_url("sqlite://fleetsync.db"), "sqlite://fleetsync.db");
        assert_eq!(
            redact_url("postgres://u:p@h/db@x"),
            "postgres://u:***@h/db@x"
        );
        assert_eq!(
            redact_url("postgres://app@db:5432/cp?sslmode=disable&password=s3cret"),
            "postgres://app@db:5432/cp?sslmode=disable&password=***"
        );
        assert_eq!(
            redact_url("mysql://root@h/db?PASSWORD=x&ssl-mode=required"),
            "mysql://root@h/db?PASSWORD=***&ssl-mode=required"
        );
    }
}
