//! `just chaos`: one forced job of 4,000 servers (100 real sshd hosts, 1,900 silent addresses,
//! 2,000 refused) on PostgreSQL with three agents, under every fault at once (`tests/src/chaos.rs`
//! says which), against the same job without faults. Prints each check and writes
//! `bench/chaos.md` with the machine's description; exits non-zero if a check fails.

use fleetsync_tests::{
    bench::machine,
    chaos::{Plan, run},
};

#[tokio::main]
async fn main() {
    let report = run(Plan {
        hosts: 100,
        silent: 1_900,
        refused: 2_000,
        in_flight: 64,
        handshake_s: 1,
    })
    .await;
    let mut text = String::from("# `just chaos`\n\n");
    text.push_str(&format!("Machine: {}.\n\n", machine()));
    text.push_str(&report.markdown());
    print!("{text}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/chaos.md");
    std::fs::write(&path, &text).expect("write bench/chaos.md");
    eprintln!("wrote {}", path.display());
    if !report.passed() {
        std::process::exit(1);
    }
}
