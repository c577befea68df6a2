//! Catalog dumps: the schema of a control-plane database as sorted text lines, to compare two
//! databases (a clean run against one recovered from a crash), plus the engine's own records.

use fleetsync_common::{Backend, Db};
use sqlx::AssertSqlSafe;

/// Everything that defines the schema and the migration records, one fact per line.
pub async fn dump(db: &Db) -> Vec<String> {
    let queries: &[&str] = match db.backend() {
        Backend::Sqlite => &[
            "SELECT type || ' ' || name || ' ' || tbl_name || ' ' || COALESCE(sql, '') \
             FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        ],
        Backend::Postgres => &[
            // PostgreSQL keeps a dropped column's ordinal position: a column's place is its rank
            // among the columns that exist (a table rolled back and migrated again reads the
            // same as a fresh one).
            "SELECT table_name || '.' || column_name || ' ' || \
             row_number() OVER (PARTITION BY table_name ORDER BY ordinal_position) || ' ' || \
             data_type || ' ' || is_nullable || ' ' || COALESCE(column_default, 'NULL') \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             ORDER BY table_name, ordinal_position",
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY indexname",
            "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
             FROM pg_constraint WHERE connamespace = current_schema()::regnamespace \
             ORDER BY conrelid::regclass::text, conname",
        ],
        Backend::MySql => &[
            "SELECT CONCAT_WS(' ', table_name, column_name, ordinal_position, column_type, \
             is_nullable, IFNULL(column_default, 'NULL'), IFNULL(collation_name, '-')) \
             FROM information_schema.columns WHERE table_schema = DATABASE() \
             ORDER BY table_name, ordinal_position",
            "SELECT CONCAT_WS(' ', table_name, index_name, non_unique, seq_in_index, column_name) \
             FROM information_schema.statistics WHERE table_schema = DATABASE() \
             ORDER BY table_name, index_name, seq_in_index",
            "SELECT CONCAT_WS(' ', constraint_name, table_name, referenced_table_name, \
             delete_rule) FROM information_schema.referential_constraints \
             WHERE constraint_schema = DATABASE() ORDER BY constraint_name",
        ],
    };
    let mut lines = Vec::new();
    for query in queries {
        lines.extend(strings(db, query).await);
    }
    lines.extend(
        strings(
            db,
            "SELECT CONCAT(version, ' ', state, ' ', statements_applied, ' ', checksum) \
             FROM fleetsync_schema_history ORDER BY version",
        )
        .await
        .into_iter()
        .map(|l| format!("history {l}")),
    );
    lines.extend(
        strings(
            db,
            "SELECT CONCAT(id, ' ', scopes, ' ', state) FROM sync_requests ORDER BY id",
        )
        .await
        .into_iter()
        .map(|l| format!("outbox {l}")),
    );
    lines
}

/// Rows of one text column.
pub async fn strings(db: &Db, sql: &str) -> Vec<String> {
    let sql = AssertSqlSafe(sql.to_owned());
    let result = match db {
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        Db::MySql(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
    };
    result.unwrap_or_else(|err| panic!("catalog query failed: {err}"))
}

/// Runs one statement (test setup: registering servers, faking history).
pub async fn execute(db: &Db, sql: &str) {
    let sql = AssertSqlSafe(sql.to_owned());
    let result = match db {
        Db::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Db::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Db::MySql(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    };
    result.unwrap_or_else(|err| panic!("statement failed: {err}"));
}

/// Inserts `n` servers named `srv-{i}` at `ip(i)`:`port` with plain SQL, a thousand per
/// statement (fleets for benchmarks and migrations; the Fleet API is measured elsewhere).
pub async fn insert_servers(db: &Db, n: usize, port: u16, ip: impl Fn(usize) -> String) {
    for start in (0..n).step_by(1000) {
        let values: Vec<String> = (start..(start + 1000).min(n))
            .map(|i| format!("('srv-{i}', '{}', {port}, 'vito', 'ready', 0, 0)", ip(i)))
            .collect();
        execute(
            db,
            &format!(
                "INSERT INTO servers (name, ip, port, ssh_user, status, created_at, updated_at) \
                 VALUES {}",
                values.join(", ")
            ),
        )
        .await;
    }
}

/// Registers a MariaDB service (version `version`) on every server, with plain SQL.
pub async fn add_mariadb_everywhere(db: &Db, version: &str) {
    execute(
        db,
        &format!(
            "INSERT INTO services (server_id, type, name, version, status, created_at, \
             updated_at) SELECT id, 'database', 'mariadb', '{version}', 'ready', 0, 0 FROM servers"
        ),
    )
    .await;
}

/// Refreshes the planner's statistics of every table, as autovacuum (PostgreSQL, MariaDB's
/// persistent statistics) does within a minute of a bulk load: benches that load by SQL and
/// measure at once would otherwise measure plans made for empty tables. SQLite has no
/// automatic analysis: it plans from its heuristics until `ANALYZE` runs, as in production.
pub async fn analyze(db: &Db) {
    match db.backend() {
        Backend::Postgres => execute(db, "ANALYZE").await,
        Backend::MySql => {
            for table in [
                "servers",
                "services",
                "server_leases",
                "sync_jobs",
                "sync_job_servers",
                "sync_runs",
            ] {
                execute(db, &format!("ANALYZE TABLE {table}")).await;
            }
        }
        Backend::Sqlite => {}
    }
}

/// One integer.
pub async fn count(db: &Db, sql: &str) -> i64 {
    let sql = AssertSqlSafe(sql.to_owned());
    let result = match db {
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Db::MySql(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    };
    result.unwrap_or_else(|err| panic!("count failed: {err}"))
}

/// Waits (polling every 20 ms, at most `within`) until the integer `sql` returns satisfies
/// `done`; returns it. Panics with `what` and the last value if it never does.
pub async fn wait_for_count(
    db: &Db,
    sql: &str,
    done: impl Fn(i64) -> bool,
    within: std::time::Duration,
    what: &str,
) -> i64 {
    crate::poll_until(what, within, || async {
        let value = count(db, sql).await;
        if done(value) {
            Ok(value)
        } else {
            Err(format!("still {value}"))
        }
    })
    .await
}
