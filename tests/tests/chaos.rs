//! The small version of `just chaos`: one forced job of about 400 servers (real sshd hosts,
//! silent and refused addresses) on PostgreSQL with three agents, while one agent is SIGKILLed
//! and restarted, another SIGSTOPped past its lease, PostgreSQL restarts, every fleetsync
//! connection is terminated and a third agent is rolled: the job is done, one outcome per
//! server, cursors 1..N and the summary at N+1, the healthy hosts OK, each run recorded once.

use fleetsync_tests::chaos::{Plan, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_every_fault_at_once() {
    let report = run(Plan {
        hosts: 6,
        silent: 300,
        refused: 100,
        in_flight: 16,
        handshake_s: 2,
    })
    .await;
    let text = report.markdown();
    eprintln!("{text}");
    assert!(report.passed(), "{text}");
}
