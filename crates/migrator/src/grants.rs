//! Least privilege for the sync-agent: `migrate --agent-role ROLE` grants a database role
//! exactly the rights the agent needs on the tables this migrator made (rows, never the
//! schema), on PostgreSQL and MySQL/MariaDB. Kept beside the migrations, so that a migration
//! that adds a table the agent uses adds its grant here too.

use fleetsync_common::{Backend, Db};

/// What the sync-agent does with each table.
pub const AGENT_RIGHTS: &[(&str, &str)] = &[
    ("servers", "SELECT, INSERT, UPDATE, DELETE"),
    ("services", "SELECT, INSERT, UPDATE, DELETE"),
    ("databases", "SELECT, INSERT, UPDATE, DELETE"),
    ("database_users", "SELECT, INSERT, UPDATE, DELETE"),
    ("server_leases", "SELECT, INSERT, UPDATE, DELETE"),
    ("sync_jobs", "SELECT, INSERT, UPDATE, DELETE"),
    ("sync_job_servers", "SELECT, INSERT, UPDATE, DELETE"),
    ("sync_runs", "SELECT, INSERT, UPDATE, DELETE"),
    // Each agent's own row: written at start, on each heartbeat and at stop; gone ones pruned.
    ("sync_agents", "SELECT, INSERT, UPDATE, DELETE"),
    // The migrations' requests: taken, never made.
    ("sync_requests", "SELECT, UPDATE"),
    // Read at start, to check the schema is recent enough.
    ("fleetsync_schema_history", "SELECT"),
];

/// Why the rights could not be granted.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// Not a role name this command takes.
    #[error(
        "invalid --agent-role {0:?}: a role name ([A-Za-z_][A-Za-z0-9_]*, on MySQL optionally \
         NAME@HOST)"
    )]
    InvalidRole(String),
    /// SQLite has no roles.
    #[error("--agent-role needs PostgreSQL or MySQL/MariaDB: SQLite has no roles")]
    NoRoles,
    /// The database refused a grant.
    #[error("granting the sync-agent's rights to {role}: {source}")]
    Database {
        /// The role.
        role: String,
        /// The database's error.
        source: sqlx::Error,
    },
}

fn identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The grant statements for `role` on `backend`.
pub fn statements(backend: Backend, role: &str) -> Result<Vec<String>, GrantError> {
    let invalid = || GrantError::InvalidRole(role.to_owned());
    let grantee = match backend {
        Backend::Sqlite => return Err(GrantError::NoRoles),
        Backend::Postgres if identifier(role) => format!("\"{role}\""),
        Backend::MySql => {
            let (user, host) = role.split_once('@').unwrap_or((role, "%"));
            let host_ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"%._-:".contains(&b));
            if !identifier(user) || !host_ok {
                return Err(invalid());
            }
            format!("'{user}'@'{host}'")
        }
        Backend::Postgres => return Err(invalid()),
    };
    let mut out = Vec::new();
    if backend == Backend::Postgres {
        out.push(format!("GRANT USAGE ON SCHEMA public TO {grantee}"));
    }
    for (table, rights) in AGENT_RIGHTS {
        let table = match backend {
            Backend::MySql => format!("`{table}`"),
            _ => format!("\"{table}\""),
        };
        out.push(format!("GRANT {rights} ON {table} TO {grantee}"));
    }
    Ok(out)
}

/// Grants `role` the sync-agent's rights on `db`.
pub async fn grant_agent(db: &Db, role: &str) -> Result<usize, GrantError> {
    let statements = statements(db.backend(), role)?;
    for sql in &statements {
        db.execute(sql, &[])
            .await
            .map_err(|source| GrantError::Database {
                role: role.to_owned(),
                source,
            })?;
    }
    Ok(AGENT_RIGHTS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_and_quoted() {
        let pg = statements(Backend::Postgres, "fleetsync_agent").expect("valid");
        assert_eq!(pg[0], "GRANT USAGE ON SCHEMA public TO \"fleetsync_agent\"");
        assert!(pg.contains(
            &"GRANT SELECT ON \"fleetsync_schema_history\" TO \"fleetsync_agent\"".to_owned()
        ));
        let my = statements(Backend::MySql, "agent@10.0.0.%").expect("valid");
        assert!(my[0].ends_with("TO 'agent'@'10.0.0.%'"), "{my:?}");
        for bad in ["", "a-b", "x; DROP TABLE servers", "1agent", "a'b"] {
            assert!(statements(Backend::Postgres, bad).is_err(), "{bad}");
        }
        assert!(statements(Backend::MySql, "agent@'x'").is_err());
        assert!(matches!(
            statements(Backend::Sqlite, "agent"),
            Err(GrantError::NoRoles)
        ));
    }
}
