//! Test fixtures for fleetsync, shared by every scenario in `tests/`: a fleet of real OpenSSH
//! servers with fault controls, network namespaces, a fresh database per test on each backend,
//! and the real services spawned on ephemeral ports with typed gRPC clients.
#![forbid(unsafe_code)]

pub mod bench;
pub mod catalog;
pub mod chaos;
pub mod db;
pub mod events;
pub mod fleet;
pub mod history;
pub mod migrator;
pub mod netns;
pub mod pg18;
pub mod process;
pub mod proxy;
pub mod scenario;
pub mod scrape;
pub mod services;
pub mod tls;

pub use db::TestDb;
pub use fleet::{SshFleet, SshHost};
pub use scenario::{AgentProcess, Scenario};
pub use services::{TestAgent, TestMigrator};

/// One test per backend of a scenario `async fn(Backend)`: `per_backend!(name => scenario);`
/// makes the tests `name::sqlite`, `name::postgres` and `name::mariadb`;
/// `per_backend!(name => scenario; postgres, mariadb);` only those named.
#[macro_export]
macro_rules! per_backend {
    (@variant sqlite) => { fleetsync_common::Backend::Sqlite };
    (@variant postgres) => { fleetsync_common::Backend::Postgres };
    (@variant mariadb) => { fleetsync_common::Backend::MySql };
    ($name:ident => $scenario:ident) => {
        $crate::per_backend!($name => $scenario; sqlite, postgres, mariadb);
    };
    ($name:ident => $scenario:ident; $($backend:ident),+) => {
        mod $name {
            $(
                #[tokio::test]
                async fn $backend() {
                    super::$scenario($crate::per_backend!(@variant $backend)).await;
                }
            )+
        }
    };
}

/// Installs a test log subscriber when `TEST_LOG` is set (tests are silent otherwise).
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "debug,russh=info,sqlx=warn,h2=info".into()),
            )
            .with_test_writer()
            .try_init();
    }
}

pub use fleetsync_common::clock::random_u64;

/// Polls `attempt` every 20 ms until it returns `Ok`, and returns its value. Panics with `what`
/// and the last `Err` (what was seen instead) if `within` passes first. The one waiting loop
/// of the tests: they wait on conditions, not on time.
pub async fn poll_until<T, F, Fut>(what: &str, within: std::time::Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        let seen = match attempt().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "{what} (waited {within:?}): {seen}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits (at most `within`) until `done` holds. Panics with `what` if it never does.
pub async fn wait_until(what: &str, within: std::time::Duration, mut done: impl FnMut() -> bool) {
    poll_until(what, within, || {
        std::future::ready(if done() {
            Ok(())
        } else {
            Err("not yet".into())
        })
    })
    .await;
}
