//! A fresh control-plane database per test, on each backend: a SQLite file in a temp dir, or a
//! uniquely named database on the machine's PostgreSQL or MariaDB, dropped afterwards.

use std::time::Duration;

use fleetsync_common::{Backend, Db};
use sqlx::{AssertSqlSafe, Connection};
use tempfile::TempDir;

/// PostgreSQL server for tests (a database on it is created per test).
pub fn postgres_admin_url() -> String {
    std::env::var("FLEETSYNC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// MariaDB/MySQL server for tests (a database on it is created per test).
pub fn mysql_admin_url() -> String {
    std::env::var("FLEETSYNC_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// Every backend, for tests that run on all three.
pub const ALL_BACKENDS: [Backend; 3] = [Backend::Sqlite, Backend::Postgres, Backend::MySql];

/// A database that exists for one test. Dropped (with its data) on drop.
#[derive(Debug)]
pub struct TestDb {
    backend: Backend,
    url: String,
    name: String,
    _dir: Option<TempDir>,
}

impl TestDb {
    /// Creates an empty database on `backend`. Panics, saying how to fix it, if the server
    /// does not answer: a test never skips silently.
    pub async fn create(backend: Backend) -> Self {
        let name = format!(
            "fleetsync_t{}_{:x}",
            std::process::id(),
            crate::random_u64() >> 16
        );
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("fleetsync-db-")
                    .tempdir()
                    .expect("create sqlite temp dir");
                let url = format!("sqlite://{}/{name}.db", dir.path().display());
                Self {
                    backend,
                    url,
                    name,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|err| {
                        panic!(
                            "PostgreSQL at {admin} is not answering ({err}); start it with \
                         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                        )
                    });
                sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create postgres test database");
                conn.close().await.ok();
                let url = replace_db_name(&admin, &name);
                Self {
                    backend,
                    url,
                    name,
                    _dir: None,
                }
            }
            Backend::MySql => {
                let admin = mysql_admin_url();
                let mut conn = sqlx::MySqlConnection::connect(&admin).await.unwrap_or_else(|err| {
                    panic!(
                        "MariaDB at {admin} is not answering ({err}); start it with \
                         `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`"
                    )
                });
                sqlx::query(AssertSqlSafe(format!(
                    "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )))
                .execute(&mut conn)
                .await
                .expect("create mariadb test database");
                conn.close().await.ok();
                let url = replace_db_name(&admin, &name);
                Self {
                    backend,
                    url,
                    name,
                    _dir: None,
                }
            }
        }
    }

    /// A fresh SQLite database.
    pub async fn sqlite() -> Self {
        Self::create(Backend::Sqlite).await
    }

    /// A fresh PostgreSQL database.
    pub async fn postgres() -> Self {
        Self::create(Backend::Postgres).await
    }

    /// A fresh MariaDB database.
    pub async fn mariadb() -> Self {
        Self::create(Backend::MySql).await
    }

    /// Its URL, for `--database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database's name (the file stem for SQLite).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens it.
    pub async fn connect(&self) -> Db {
        Db::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let statement = match self.backend {
            // The temp dir goes with `_dir`.
            Backend::Sqlite => return,
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            Backend::MySql => format!("DROP DATABASE IF EXISTS {}", self.name),
        };
        let backend = self.backend;
        // Drop may run inside a runtime: do the async cleanup on a thread of its own.
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let run = async {
                    match backend {
                        Backend::Postgres => {
                            let mut conn =
                                sqlx::PgConnection::connect(&postgres_admin_url()).await?;
                            sqlx::query(AssertSqlSafe(statement))
                                .execute(&mut conn)
                                .await?;
                        }
                        Backend::MySql => {
                            let mut conn =
                                sqlx::MySqlConnection::connect(&mysql_admin_url()).await?;
                            sqlx::query(AssertSqlSafe(statement))
                                .execute(&mut conn)
                                .await?;
                        }
                        Backend::Sqlite => {}
                    }
                    Ok::<_, sqlx::Error>(())
                };
                tokio::time::timeout(Duration::from_secs(30), run).await
            })
        })
        .join();
        if !matches!(result, Ok(Ok(Ok(())))) {
            eprintln!(
                "warning: could not drop test database {}: {result:?}",
                self.name
            );
        }
    }
}

/// `scheme://user@host:port/old?params` with the database path replaced by `name`.
fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_database_name() {
        assert_eq!(
            super::replace_db_name("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::replace_db_name("mysql://root@h:3306/test?ssl-mode=disabled", "y"),
            "mysql://root@h:3306/y?ssl-mode=disabled"
        );
        assert_eq!(
            super::replace_db_name("mysql://root@h", "z"),
            "mysql://root@h/z"
        );
    }
}
