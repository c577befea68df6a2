//! What `deploy/` ships is checked: the systemd units pass `systemd-analyze verify` without a
//! single warning (their binaries pointed at the ones built here), and every variable of the
//! environment files is one the binary's `--help` names, so a renamed flag cannot leave a
//! setting silently ignored.

use std::{collections::BTreeSet, path::Path, process::Command};

use fleetsync_tests::process::bin_path;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .expect("deploy/")
}

#[test]
fn the_service_units_verify_cleanly() {
    let analyze = "/usr/bin/systemd-analyze";
    assert!(
        Path::new(analyze).exists(),
        "{analyze} is missing: run `just setup` (installs systemd's tools)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    for (unit, binary, env) in [
        ("fleetsync-agent.service", "sync-agent", "agent.env"),
        ("fleetsync-migrate.service", "migrator", "migrator.env"),
    ] {
        let text = std::fs::read_to_string(deploy().join(unit)).expect("read unit");
        assert!(
            text.contains(&format!("ExecStart=/usr/local/bin/{binary} ")),
            "{unit}"
        );
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "User=fleetsync",
        ] {
            assert!(text.contains(hardening), "{unit} lacks {hardening}");
        }
        let local = text
            .replace(
                &format!("/usr/local/bin/{binary}"),
                bin_path(binary).to_str().expect("utf-8"),
            )
            .replace(
                &format!("/etc/fleetsync/{env}"),
                deploy().join(env).to_str().expect("utf-8"),
            );
        let path = dir.path().join(unit);
        std::fs::write(&path, local).expect("write unit");
        let verified = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&verified.stderr);
        assert!(verified.status.success(), "{unit}: {stderr}");
        assert!(stderr.trim().is_empty(), "{unit}: warnings: {stderr}");
    }
}

#[test]
fn every_setting_of_the_environment_files_is_a_flag_of_its_binary() {
    for (env, binary, command) in [
        ("agent.env", "sync-agent", "serve"),
        ("migrator.env", "migrator", "migrate"),
    ] {
        let help = Command::new(bin_path(binary))
            .args([command, "--help"])
            .output()
            .expect("run --help");
        let help = String::from_utf8_lossy(&help.stdout);
        let text = std::fs::read_to_string(deploy().join(env)).expect("read env file");
        let names: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim()))
            .collect();
        assert!(names.len() >= 4, "{env}: {names:?}");
        for name in names {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{env}: {name} is no setting of `{binary} {command}`"
            );
        }
    }
}
