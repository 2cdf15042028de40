//! Agents that misbehave, on the real Docker engine with the agent runtime image: each is
//! contained and its run reported correctly. Needs Docker and `just agent-image`.

use std::path::Path;
use std::time::Duration;

mod common;

use common::{IMAGE, image_present};
use syntropism_sandbox_runner::sandbox::{AGENT_UID, Outcome, RunSpec, Sandbox};

/// A workspace owned by the agent user, holding `main.py`.
fn workspace(main: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.py"), main).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    dir
}

fn spec(name: &str, dir: &Path) -> RunSpec {
    let mut spec = RunSpec::new(
        &format!("test-{name}-{}", std::process::id()),
        "0193a5c4-0000-7000-8000-00000000a11c",
        IMAGE,
        dir.to_path_buf(),
    );
    spec.time_limit = Duration::from_secs(30);
    spec
}

async fn run(
    name: &str,
    main: &str,
    adjust: impl FnOnce(&mut RunSpec),
) -> (
    syntropism_sandbox_runner::sandbox::RunReport,
    tempfile::TempDir,
) {
    image_present();
    let dir = workspace(main);
    let mut spec = spec(name, dir.path());
    adjust(&mut spec);
    let sandbox = Sandbox::connect("test-runner").unwrap();
    let report = sandbox.run(&spec).await.expect("the run is reported");
    // Always removed.
    let left = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("name=syntropism-{}", spec.execution_id),
        ])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "{name}: the container was not removed"
    );
    (report, dir)
}

#[tokio::test]
async fn a_normal_agent_completes_and_keeps_its_workspace() {
    let (report, dir) = run(
        "normal",
        r#"
import os
print("hello from", os.getuid())
open("/workspace/out.txt", "w").write("kept")
"#,
        |_| {},
    )
    .await;
    assert_eq!(report.outcome, Outcome::Completed, "{}", report.log_tail);
    assert!(
        report.log_tail.contains("hello from 10001"),
        "{}",
        report.log_tail
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "kept"
    );
}

#[tokio::test]
async fn an_exit_code_is_a_failure() {
    let (report, _) = run("exit", "import sys; sys.exit(3)", |_| {}).await;
    assert_eq!(report.outcome, Outcome::Failed { exit_code: 3 });
}

#[tokio::test]
async fn spinning_past_the_deadline_is_killed() {
    let (report, _) = run("spin", "while True: pass", |s| {
        s.time_limit = Duration::from_secs(2)
    })
    .await;
    assert_eq!(report.outcome, Outcome::TimedOut);
    assert!(
        report.wall_time < Duration::from_secs(10),
        "{:?}",
        report.wall_time
    );
}

#[tokio::test]
async fn a_memory_bomb_is_oom_killed() {
    let (report, _) = run(
        "oom",
        "x = []\nwhile True: x.append(bytearray(16 * 1024 * 1024))",
        |s| s.memory_mib = 64,
    )
    .await;
    assert_eq!(report.outcome, Outcome::OomKilled, "{}", report.log_tail);
}

#[tokio::test]
async fn a_fork_bomb_hits_the_pids_limit() {
    let (report, _) = run(
        "fork",
        r#"
import os, sys
children = 0
try:
    while True:
        if os.fork() == 0:
            import time; time.sleep(30); os._exit(0)
        children += 1
except OSError as error:
    print("stopped after", children, "children:", error, flush=True)
    os._exit(0)
"#,
        |s| {
            s.pids_limit = 32;
            s.time_limit = Duration::from_secs(10);
        },
    )
    .await;
    assert!(
        report.log_tail.contains("stopped after"),
        "{}",
        report.log_tail
    );
    let children: u32 = report
        .log_tail
        .split("stopped after ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(children < 32, "{children} children");
}

#[tokio::test]
async fn the_root_filesystem_is_read_only_and_tmp_is_capped() {
    let (report, _) = run("fs", r#"
import os
for path in ["/etc/evil", "/opt/syntropism/evil", "/evil"]:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as error:
        print("refused", path, error.strerror)
try:
    with open("/tmp/big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * 1024 * 1024)
    print("WROTE /tmp/big")
except OSError as error:
    print("tmp full:", error.strerror)
status = open("/proc/self/status").read()
print([line for line in status.splitlines() if line.startswith(("CapEff", "NoNewPrivs", "Seccomp:"))])
"#, |s| s.tmp_mib = 16).await;
    assert_eq!(report.outcome, Outcome::Completed, "{}", report.log_tail);
    assert!(!report.log_tail.contains("WROTE"), "{}", report.log_tail);
    assert_eq!(
        report.log_tail.matches("Read-only file system").count(),
        3,
        "{}",
        report.log_tail
    );
    assert!(
        report
            .log_tail
            .contains("tmp full: No space left on device"),
        "{}",
        report.log_tail
    );
    assert!(
        report.log_tail.contains("CapEff:\\t0000000000000000"),
        "{}",
        report.log_tail
    );
    assert!(
        report.log_tail.contains("NoNewPrivs:\\t1"),
        "{}",
        report.log_tail
    );
    assert!(
        report.log_tail.contains("Seccomp:\\t2"),
        "default seccomp (filter mode): {}",
        report.log_tail
    );
}

#[tokio::test]
async fn a_flood_of_output_keeps_only_a_bounded_tail() {
    let (report, _) = run(
        "flood",
        r#"
import sys
line = "x" * 1023 + "\n"
for _ in range(50 * 1024):
    sys.stdout.write(line)
print("THE END")
"#,
        |s| s.log_tail_bytes = 4096,
    )
    .await;
    assert_eq!(report.outcome, Outcome::Completed);
    assert!(report.log_truncated);
    assert!(report.log_tail.len() <= 4096);
    assert!(report.log_tail.contains("THE END"));
}

#[tokio::test]
async fn without_a_network_nothing_is_reachable() {
    let (report, _) = run(
        "net",
        r#"
import socket
for host, port in [("127.0.0.1", 5432), ("172.17.0.1", 4222), ("10.0.0.1", 80)]:
    try:
        socket.create_connection((host, port), timeout=1)
        print("CONNECTED", host)
    except OSError as error:
        print("unreachable", host, error)
print(open("/proc/net/route").read().count("\n") - 1, "routes")
"#,
        |_| {},
    )
    .await;
    assert!(
        !report.log_tail.contains("CONNECTED"),
        "{}",
        report.log_tail
    );
    assert!(report.log_tail.contains("0 routes"), "{}", report.log_tail);
}

#[tokio::test]
async fn orphans_of_a_crashed_runner_are_removed_on_start() {
    image_present();
    let runner = format!("orphan-runner-{}", std::process::id());
    let sandbox = Sandbox::connect(&runner).unwrap();
    // A container this runner created and never cleaned up (as if it crashed mid-run).
    let created = std::process::Command::new("docker")
        .args([
            "create",
            "--label",
            &format!("org.syntropism.runner={runner}"),
            IMAGE,
        ])
        .output()
        .unwrap();
    assert!(created.status.success());
    assert_eq!(sandbox.remove_orphans().await.unwrap(), 1);
    assert_eq!(sandbox.remove_orphans().await.unwrap(), 0);
}

#[tokio::test]
async fn a_workspace_path_that_would_change_the_mount_is_refused() {
    let sandbox = Sandbox::connect("test-runner").unwrap();
    for path in ["/tmp/a:/etc", "/tmp/a,ro", "relative"] {
        let spec = RunSpec::new("bad-path", "a", IMAGE, path.into());
        assert!(sandbox.run(&spec).await.is_err(), "{path}");
    }
}
