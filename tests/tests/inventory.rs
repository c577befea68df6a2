//! What a sync stores of a server's inventory: databases, users and charsets appear, change and
//! go (marked, never deleted); hostile names round-trip byte for byte.

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{self as pb, DatabaseService, GetServerRequest, Outcome};
use fleetsync_tests::{
    Scenario,
    events::{mariadb_exec, outcomes, postgres_exec, unique},
    fleet::SSH_USER,
    services::{register_server, sync_events as sync},
};

#[tokio::test]
async fn databases_appear_change_and_go_and_hostile_names_round_trip() {
    let scenario = Scenario::on(Backend::Sqlite).hosts(2).start().await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());
    let maria = register_server(
        &mut fleet_api,
        "maria",
        fleet.host(0),
        SSH_USER,
        DatabaseService::Mariadb,
    )
    .await;
    let pg = register_server(
        &mut fleet_api,
        "pg",
        fleet.host(1),
        SSH_USER,
        DatabaseService::Postgresql,
    )
    .await;

    let tag = unique("fst");
    let plain = format!("{tag}_plain");
    // Quotes, a tab, a pipe, a newline, unicode, and the 64-character limit.
    let hostile = [
        format!("{tag} it's \"quoted\""),
        format!("{tag}\ttab|pipe"),
        format!("{tag}\nnewline"),
        format!("{tag} é日本"),
        format!("{tag}{}", "x".repeat(64 - tag.len())),
    ];
    // PostgreSQL names stop at 63 bytes.
    let pg_names: Vec<String> = hostile
        .iter()
        .map(|n| {
            if n.len() > 63 {
                n[..63].to_owned()
            } else {
                n.clone()
            }
        })
        .collect();
    let mysql_ident = |name: &str| format!("`{}`", name.replace('`', "``"));
    let pg_ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    mariadb_exec(&format!(
        "CREATE DATABASE {} CHARACTER SET latin1 COLLATE latin1_swedish_ci",
        mysql_ident(&plain)
    ))
    .await;
    for name in &hostile {
        mariadb_exec(&format!("CREATE DATABASE {}", mysql_ident(name))).await;
    }
    for name in &pg_names {
        postgres_exec(&format!("CREATE DATABASE {}", pg_ident(name))).await;
    }
    let user = format!("{tag}_user");
    mariadb_exec(&format!("CREATE USER '{user}'@'10.%' IDENTIFIED BY 'x'")).await;
    mariadb_exec(&format!(
        "GRANT ALL ON {}.* TO '{user}'@'10.%'",
        mysql_ident(&plain)
    ))
    .await;

    let first = outcomes(&sync(&mut sync_api, &[maria, pg], &unique("first")).await);
    assert_eq!(
        first[&maria].outcome(),
        Outcome::Ok,
        "{}",
        first[&maria].message
    );
    assert_eq!(first[&pg].outcome(), Outcome::Ok, "{}", first[&pg].message);

    let inventory = |id| {
        let mut client = fleet_api.clone();
        async move {
            client
                .get_server(GetServerRequest { id })
                .await
                .expect("get")
                .into_inner()
                .inventory
                .expect("inventory")
        }
    };
    let maria_inv = inventory(maria).await;
    let found = maria_inv
        .databases
        .iter()
        .find(|d| d.name == plain)
        .expect("plain database");
    assert_eq!(
        (found.charset.as_str(), found.collation.as_str()),
        ("latin1", "latin1_swedish_ci")
    );
    let pg_inv = inventory(pg).await;
    for name in &hostile {
        assert!(
            maria_inv.databases.iter().any(|d| &d.name == name),
            "MariaDB lost {name:?}"
        );
    }
    for name in &pg_names {
        let d = pg_inv.databases.iter().find(|d| &d.name == name);
        let d = d.unwrap_or_else(|| panic!("PostgreSQL lost {name:?}"));
        assert_eq!(d.charset, "UTF8");
        assert_eq!(d.state(), pb::DatabaseState::Ready);
    }
    let u = maria_inv
        .users
        .iter()
        .find(|u| u.username == user)
        .expect("user");
    assert_eq!(
        (u.host.as_str(), u.databases.clone()),
        ("10.%", vec![plain.clone()])
    );

    // Changed, dropped and new, between two syncs.
    mariadb_exec(&format!(
        "ALTER DATABASE {} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        mysql_ident(&plain)
    ))
    .await;
    mariadb_exec(&format!("DROP DATABASE {}", mysql_ident(&hostile[0]))).await;
    let newer = format!("{tag}_new");
    mariadb_exec(&format!("CREATE DATABASE {}", mysql_ident(&newer))).await;
    mariadb_exec(&format!("DROP USER '{user}'@'10.%'")).await;
    let second = outcomes(&sync(&mut sync_api, &[maria], &unique("second")).await);
    let counts = second[&maria].counts.expect("counts");
    assert!(
        counts.databases_added >= 1 && counts.databases_updated >= 1 && counts.databases_gone >= 1,
        "{counts:?}"
    );
    assert!(counts.users_gone >= 1, "{counts:?}");
    let maria_inv = inventory(maria).await;
    let state = |name: &str| {
        maria_inv
            .databases
            .iter()
            .find(|d| d.name == name)
            .map(|d| (d.state(), d.collation.clone()))
    };
    assert_eq!(
        state(&plain),
        Some((pb::DatabaseState::Ready, "utf8mb4_bin".into()))
    );
    assert_eq!(
        state(&hostile[0]).map(|s| s.0),
        Some(pb::DatabaseState::Gone),
        "dropped is marked gone, kept"
    );
    assert_eq!(state(&newer).map(|s| s.0), Some(pb::DatabaseState::Ready));
    let gone_user = maria_inv
        .users
        .iter()
        .find(|u| u.username == user)
        .expect("user kept");
    assert_eq!(gone_user.state(), pb::DatabaseState::Gone);

    // A sync with no change since the last one changes nothing. The MariaDB server is the
    // machine's, shared with every test running meanwhile (each makes its own database), so
    // one of them may change the listing between two syncs: a few tries, one must be clean.
    let mut clean = None;
    for attempt in 0..5 {
        let again = outcomes(
            &sync(
                &mut sync_api,
                &[maria],
                &unique(&format!("again-{attempt}")),
            )
            .await,
        );
        let c = again[&maria].counts.expect("counts");
        if (c.databases_added, c.databases_updated, c.databases_gone) == (0, 0, 0) {
            clean = Some(c);
            break;
        }
    }
    assert!(
        clean.is_some(),
        "no sync without changes in five tries: not idempotent"
    );

    for name in hostile.iter().skip(1).chain([&plain, &newer]) {
        mariadb_exec(&format!("DROP DATABASE IF EXISTS {}", mysql_ident(name))).await;
    }
    for name in &pg_names {
        postgres_exec(&format!("DROP DATABASE IF EXISTS {}", pg_ident(name))).await;
    }
    scenario.stop().await;
}
