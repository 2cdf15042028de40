//! The `syntropism` binary on its own: its help names every command, and with nothing to talk
//! to it fails with a message that says what to do. (Against a running economy it is tested in
//! crates/orchestrator/tests/cli.rs, which runs this same binary.)

use std::process::Command;

fn syntropism(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_syntropism"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_names_every_command() {
    let out = syntropism(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "status", "agents", "agent", "market", "prompts", "reward", "dismiss", "messages",
        "events", "audit", "watch",
    ] {
        assert!(help.contains(command), "{command} missing from: {help}");
    }
}

#[test]
fn missing_credentials_are_a_clear_error() {
    let out = syntropism(&["--creds", "/nonexistent/cli.creds", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("just nats-config"), "{error}");
}

#[test]
fn a_bad_score_is_refused_before_anything_is_sent() {
    let out = syntropism(&["reward", "p", "x", "1", "2"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
}
