//! Access control on the agent (and the migrator's client of it): bearer token on every RPC
//! but health, TLS, and no unauthenticated listening beyond loopback.

use std::{path::Path, process::Command};

use fleetsync_common::Backend;
use fleetsync_common::proto::sync::v1::{ListServersRequest, fleet_client::FleetClient};
use fleetsync_tests::{Scenario, migrator::migrator, process::bin_path, tls::TestTls};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn grpcurl(args: &[&str]) -> std::process::Output {
    let program = std::env::var("FLEETSYNC_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    Command::new(&program)
        .args(args)
        .output()
        .expect("run grpcurl (`just setup`)")
}

fn write_token(dir: &Path) -> String {
    let path = dir.join("token");
    std::fs::write(&path, "s3cret-token\n").expect("write token");
    path.to_str().expect("utf-8").to_owned()
}

#[tokio::test]
async fn without_the_token_every_rpc_but_health_is_unauthenticated() {
    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let token = write_token(scenario.dir());
    let agent = scenario.start_process(&scenario.agent_process().flag("--auth-token-file", &token));
    let channel = fleetsync_tests::services::connect(agent.addr).await;

    // Health answers anyone.
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token")
        .into_inner();
    assert_eq!(health.status, 1);

    let err = FleetClient::new(channel.clone())
        .list_servers(ListServersRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(ListServersRequest::default());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        FleetClient::new(channel.clone())
            .list_servers(wrong)
            .await
            .expect_err("wrong")
            .code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(ListServersRequest::default());
    right.metadata_mut().insert(
        "authorization",
        "Bearer s3cret-token".parse().expect("header"),
    );
    FleetClient::new(channel)
        .list_servers(right)
        .await
        .expect("the right token");

    // Reflection too: grpcurl needs the header.
    let addr = agent.addr.to_string();
    let denied = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let allowed = grpcurl(&[
        "-plaintext",
        "-H",
        "authorization: Bearer s3cret-token",
        &addr,
        "list",
    ]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("fleetsync.sync.v1.Fleet"));
    assert!(
        !agent.log().contains("s3cret-token"),
        "the token must never be logged"
    );
}

/// A token is rotated without a restart: the file holds the old and the new one while clients
/// move over, then only the new one; the agent reads it again by itself.
#[tokio::test]
async fn a_token_is_rotated_without_a_restart() {
    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let dir = scenario.dir();
    let served = dir.join("served-tokens");
    std::fs::write(&served, "old-token\n").expect("write");
    let agent = scenario.start_process(
        &scenario
            .agent_process()
            .flag("--auth-token-file", served.display()),
    );
    let url = format!("http://{}", agent.addr);
    let client_file = |name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{name}\n")).expect("write");
        path
    };
    let (old, new) = (client_file("old-token"), client_file("new-token"));
    let lists = |token: &Path| {
        Command::new(bin_path("sync-agent"))
            .args(["servers", "--agent-url", &url, "--agent-token-file"])
            .arg(token)
            .output()
            .expect("run sync-agent")
            .status
            .code()
    };
    // Until the file changes, only the old token (3: refused, Unauthenticated).
    let accepts = |old_code: i32, new_code: i32| {
        let (lists, old, new) = (&lists, &old, &new);
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            loop {
                let seen = (lists(old), lists(new));
                if seen == (Some(old_code), Some(new_code)) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "wanted old {old_code}, new {new_code}; saw {seen:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    accepts(0, 3).await;
    std::fs::write(&served, "# rotating\nnew-token\nold-token\n").expect("write");
    accepts(0, 0).await;
    std::fs::write(&served, "new-token\n").expect("write");
    accepts(3, 0).await;
    // A file that holds no token keeps the tokens in use.
    std::fs::write(&served, "\n").expect("write");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!((lists(&old), lists(&new)), (Some(3), Some(0)));
    assert!(
        agent.log().contains("keeping the bearer tokens in use"),
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn with_tls_plaintext_fails_and_the_ca_works() {
    let scenario = Scenario::on(Backend::Sqlite).agents(0).start().await;
    let tls = TestTls::create(scenario.dir());
    let token = write_token(scenario.dir());
    let db = &scenario.db;
    let agent = scenario.start_process(
        &scenario
            .agent_process()
            .flag("--auth-token-file", &token)
            .flag("--tls-cert", tls.cert.display())
            .flag("--tls-key", tls.key.display()),
    );
    let addr = agent.addr.to_string();
    let auth = "authorization: Bearer s3cret-token";
    let plain = grpcurl(&[
        "-plaintext",
        "-H",
        auth,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(!plain.status.success(), "plaintext must fail against TLS");
    let ca_path = tls.ca.to_str().expect("utf-8");
    let secure = grpcurl(&[
        "-cacert",
        ca_path,
        "-H",
        auth,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(
        secure.status.success(),
        "{}",
        String::from_utf8_lossy(&secure.stderr)
    );
    assert!(String::from_utf8_lossy(&secure.stdout).contains("SERVING"));
    let untrusted = grpcurl(&["-H", auth, &addr, "grpc.health.v1.Health/Check"]);
    assert!(
        !untrusted.status.success(),
        "a certificate from an unknown CA must be refused"
    );

    // A typed client with the CA.
    let ca = std::fs::read(&tls.ca).expect("read ca");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .expect("tls")
        .connect()
        .await
        .expect("connect over TLS");
    let mut request = tonic::Request::new(ListServersRequest::default());
    request.metadata_mut().insert(
        "authorization",
        "Bearer s3cret-token".parse().expect("header"),
    );
    FleetClient::new(channel)
        .list_servers(request)
        .await
        .expect("list over TLS");

    // The CLI: with the CA and the token it lists; `http://` against TLS says what to change,
    // a CA it does not know says so once; both exit 4 (unreachable).
    let cli = |url: String, ca: Option<&str>| {
        let mut command = Command::new(bin_path("sync-agent"));
        command.args([
            "servers",
            "--agent-url",
            &url,
            "--agent-token-file",
            &token,
            "--timeout",
            "5s",
        ]);
        if let Some(ca) = ca {
            command.args(["--agent-ca", ca]);
        }
        command.output().expect("run sync-agent")
    };
    let listed = cli(format!("https://{addr}"), Some(ca_path));
    assert_eq!(
        listed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let plain = cli(format!("http://{addr}"), None);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("use https://"), "{stderr}");
    let unknown_ca = cli(format!("https://{addr}"), None);
    let stderr = String::from_utf8_lossy(&unknown_ca.stderr);
    assert_eq!(unknown_ca.status.code(), Some(4), "{stderr}");
    assert_eq!(stderr.matches("UnknownIssuer").count(), 1, "{stderr}");

    // The migrator hands its request over through TLS with the token.
    let run = migrator(
        db.url(),
        &[
            "migrate",
            "--agent-url",
            &format!("https://{addr}"),
            "--agent-ca",
            tls.ca.to_str().expect("utf-8"),
            "--agent-token-file",
            &token,
        ],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        !run.stderr.contains("stays pending"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    // Without the token it stays pending, with a clear reason, and still exits 0.
    let conn = db.connect().await;
    fleetsync_tests::catalog::execute(&conn, "UPDATE sync_requests SET state = 'pending'").await;
    let https = format!("https://{addr}");
    let (url, ca) = (db.url(), tls.ca.to_str().expect("utf-8"));
    let hand_over = |extra: Vec<&str>| {
        let mut args: Vec<String> = vec!["migrate".into(), "--agent-url".into(), https.clone()];
        args.extend(extra.into_iter().map(str::to_owned));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            migrator(url, &args).await
        }
    };
    let run = hand_over(vec!["--agent-ca", ca]).await;
    assert_eq!(run.code(), 0);
    assert!(run.stderr.contains("Unauthenticated"), "{}", run.stderr);
    // A CA it does not know: still pending, the cause said once.
    let run = hand_over(vec!["--agent-token-file", &token]).await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(
        run.stderr.matches("UnknownIssuer").count(),
        1,
        "{}",
        run.stderr
    );
    // A token file that cannot be read is a warning too: the migration stands, exit 0, and the
    // request waits in the outbox.
    let run = hand_over(vec!["--agent-token-file", "/nonexistent/token"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("warning: not contacting the sync-agent")
            && run.stderr.contains("/nonexistent/token"),
        "{}",
        run.stderr
    );
}

#[test]
fn listening_beyond_loopback_without_a_token_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = fleetsync_tests::services::serve_command("sync-agent", dir.path())
        .args([
            "--listen",
            "0.0.0.0:0",
            "--database-url",
            "sqlite:///nonexistent/never-opened.db",
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without --auth-token-file"),
        "{stderr}"
    );
}
