//! A sandbox's network: NATS is the one thing it reaches, and there only what its execution's
//! credentials allow. Real Docker, the agent runtime image and a real nats-server in operator
//! mode. No test traffic leaves the machine: every address probed is this machine's own or one
//! of the test's containers, and name resolution is shown to have no route to send on.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use syntropism_identity::{Authority, ExecutionGrant};
mod common;

use common::{IMAGE, image_present};
use syntropism_sandbox_runner::sandbox::{AGENT_UID, Outcome, RunReport, RunSpec, Sandbox};
use syntropism_test_support::Nats;

const ALICE: &str = "0193a5c4-0000-7000-8000-00000000a11c";
const BOB: &str = "0193a5c4-0000-7000-8000-000000000b0b";

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs (is Docker installed?)");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct World {
    authority: Authority,
    nats: Nats,
}

fn world() -> World {
    image_present();
    let authority = Authority::generate();
    let nats = Nats::start_with_config(&authority.server_config().unwrap());
    World { authority, nats }
}

/// Writes `main.py` and an `env.json` for an execution of ALICE whose credentials expire in
/// `seconds`, and runs it with NATS relayed in.
async fn run_alice(world: &World, name: &str, main: &str, seconds: i64) -> RunReport {
    let dir = tempfile::tempdir().unwrap();
    let execution = format!("net-{name}-{}", std::process::id());
    let grant = ExecutionGrant {
        agent_id: ALICE.into(),
        inbox_prefix: ExecutionGrant::inbox_prefix_for(ALICE, &execution),
        expires_at: now() + seconds,
        name: execution.clone(),
    };
    let credentials = world.authority.execution(&grant).unwrap();
    let env = serde_json::json!({
        "agent_id": ALICE,
        "execution_id": execution,
        "deadline": chrono_like(grant.expires_at),
        "nats": {
            "url": "nats://127.0.0.1:4222",
            "credentials": credentials.to_creds_file(),
            "inbox_prefix": grant.inbox_prefix,
        },
    });
    std::fs::write(dir.path().join("env.json"), env.to_string()).unwrap();
    std::fs::write(dir.path().join("main.py"), main).unwrap();
    own(dir.path());
    let mut spec = RunSpec::new(&execution, ALICE, IMAGE, dir.path().to_path_buf());
    spec.time_limit = Duration::from_secs(40);
    spec.nats_upstream = Some(format!("127.0.0.1:{}", world.nats.port()));
    let sandbox = Sandbox::connect("network-test").unwrap();
    sandbox.run(&spec).await.expect("the run is reported")
}

fn chrono_like(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap()
        .to_rfc3339()
}

fn own(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        std::os::unix::fs::lchown(entry.unwrap().path(), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    }
    std::os::unix::fs::chown(dir, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
}

fn lines<'a>(report: &'a RunReport, prefix: &str) -> Vec<&'a str> {
    report
        .log_tail
        .lines()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// TCP to each target (all on this machine).
const PROBE: &str = r#"
import os, socket, sys
def probe(host, port):
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return "OPEN"
    except OSError as error:
        return f"closed ({error})"
for target in sys.argv[1:] if len(sys.argv) > 1 else os.environ.get("TARGETS", "").split():
    host, port = target.rsplit(":", 1)
    print("PROBE", target, probe(host, port))
"#;

/// The routing table, the interfaces and name resolution: run only inside a sandbox, where
/// there is no route to send a query on (an ordinary container would ask the host's resolver).
const ISOLATION: &str = r#"
import os, socket
routes = [l.split() for l in open("/proc/net/route").read().splitlines()[1:]]
print("ROUTES", len(routes))
print("IFACES", " ".join(sorted(os.listdir("/sys/class/net"))))
try:
    socket.getaddrinfo("syntropism-test.invalid", 80)
    print("DNS resolved")
except OSError as error:
    print("DNS failed", error)
nameservers = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")]
for ns in nameservers:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"", (ns, 53))
        print("NAMESERVER", ns, "SENT")
    except OSError as error:
        print("NAMESERVER", ns, "unsendable", error.errno)
"#;

#[tokio::test]
async fn nothing_but_nats_is_reachable_from_a_sandbox() {
    let world = world();
    // A service port on every host interface, a Postgres-like port, and a neighbour
    // container listening on the default bridge: each reachable from an ordinary container,
    // none from a sandbox.
    let service = TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    // The host's address on Docker's default bridge.
    let bridge = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{index .Options \"com.docker.network.bridge.name\"}}",
    ]);
    let addresses = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &bridge])
        .output()
        .expect("ip (iproute2) runs");
    let gateway = String::from_utf8_lossy(&addresses.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no IPv4 address on {bridge}"));
    let neighbour = docker(&[
        "run",
        "-d",
        "--rm",
        "--label",
        "org.syntropism.test=network",
        IMAGE,
        "python3",
        "-m",
        "http.server",
        "8080",
    ]);
    let neighbour_ip = docker(&[
        "inspect",
        &neighbour,
        "--format",
        "{{.NetworkSettings.IPAddress}}",
    ]);
    let targets = [
        format!("{gateway}:{service_port}"),
        format!("{gateway}:{}", world.nats.port()),
        format!("127.0.0.1:{}", world.nats.port()),
        "127.0.0.1:5432".to_owned(),
        format!("{gateway}:5432"),
        format!("{neighbour_ip}:8080"),
    ];
    // Control: an ordinary container on the default bridge reaches the service port and the
    // neighbour, so a closed result below is the sandbox's doing.
    let mut control = None;
    let mut last = String::new();
    for _ in 0..20 {
        let out = docker(&[
            "run",
            "--rm",
            "-e",
            &format!(
                "TARGETS={} {}",
                format_args!("{gateway}:{service_port}"),
                format_args!("{neighbour_ip}:8080")
            ),
            IMAGE,
            "python3",
            "-c",
            PROBE,
        ]);
        if out.matches("OPEN").count() == 2 {
            control = Some(out);
            break;
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        control.is_some(),
        "an ordinary container should reach the host's service port and the neighbour: {last}"
    );

    let main = format!(
        "import sys\nsys.argv = ['probe', {}]\n{PROBE}\n{ISOLATION}",
        targets
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = run_alice(&world, "probe", &main, 60).await;
    docker(&["rm", "-f", &neighbour]);
    drop(service);
    assert_eq!(report.outcome, Outcome::Completed, "{}", report.log_tail);
    let probes = lines(&report, "PROBE");
    assert_eq!(probes.len(), targets.len(), "{}", report.log_tail);
    for probe in probes {
        assert!(!probe.contains("OPEN"), "reachable from a sandbox: {probe}");
    }
    // No route at all: only loopback, and the resolver cannot even be sent a packet.
    assert!(
        lines(&report, "ROUTES").contains(&"ROUTES 0"),
        "{}",
        report.log_tail
    );
    assert!(
        lines(&report, "IFACES").contains(&"IFACES lo"),
        "{}",
        report.log_tail
    );
    assert!(
        lines(&report, "DNS")
            .iter()
            .all(|l| l.starts_with("DNS failed")),
        "{}",
        report.log_tail
    );
    for ns in lines(&report, "NAMESERVER") {
        assert!(ns.contains("unsendable 101"), "{ns}"); // ENETUNREACH
    }
}

#[tokio::test]
async fn through_the_relay_nats_allows_only_the_executions_rights() {
    let world = world();
    let service = async_nats::ConnectOptions::with_credentials(
        &world.authority.service("test").unwrap().to_creds_file(),
    )
    .unwrap()
    .connect(world.nats.url())
    .await
    .unwrap();
    // Answers ALICE's own requests; records everything else that arrives.
    let mut own = service
        .subscribe(format!("agent.{ALICE}.economy.balance"))
        .await
        .unwrap();
    let mut stray = service.subscribe("agent.*.>").await.unwrap();
    let mut internal = service.subscribe("economy.>").await.unwrap();
    let mut admin = service.subscribe("admin.>").await.unwrap();
    let mut events = service.subscribe("events.>").await.unwrap();
    service.flush().await.unwrap();
    let responder = service.clone();
    tokio::spawn(async move {
        while let Some(message) = own.next().await {
            if let Some(reply) = message.reply {
                responder.publish(reply, "pong".into()).await.unwrap();
            }
        }
    });
    let main = format!(
        r#"
import asyncio, os, tempfile, nats
from syntropism.agent import ExecutionEnv
env = ExecutionEnv.load()
creds = tempfile.NamedTemporaryFile("w", suffix=".creds", delete=False)
creds.write(env.credentials); creds.close()
errors = []
async def on_error(error):
    errors.append(str(error))
async def connect():
    return await nats.connect(env.nats_url, user_credentials=creds.name,
        inbox_prefix=env.inbox_prefix, error_cb=on_error, allow_reconnect=False,
        connect_timeout=3)
async def main():
    nc = await connect()
    reply = await nc.request(f"agent.{{env.agent_id}}.economy.balance", b"ping", timeout=5)
    print("REPLY", reply.data.decode())
    for subject in ["agent.{BOB}.economy.balance", "economy.transfer",
                    "admin.market.update_catalogue", "events.economy.transfers_posted"]:
        await nc.publish(subject, b"forged")
    for subject in [">", "agent.>", "_INBOX_{BOB}.x.>", "economy.>"]:
        await nc.subscribe(subject)
    await nc.flush()
    await asyncio.sleep(1)
    print("ERRORS", len(errors))
    for error in errors:
        print("ERROR", error)
    # The credentials expire: the live connection is cut, and a new one refused.
    await asyncio.sleep(5)
    print("CONNECTED AFTER DEADLINE", nc.is_connected)
    try:
        await connect()
        print("RECONNECTED")
    except Exception as error:
        print("REFUSED", type(error).__name__, error)
asyncio.run(main())
"#
    );
    let report = run_alice(&world, "rights", &main, 4).await;
    assert_eq!(report.outcome, Outcome::Completed, "{}", report.log_tail);
    assert!(
        report.log_tail.contains("REPLY pong"),
        "{}",
        report.log_tail
    );
    let errors: Vec<_> = lines(&report, "ERROR ").into_iter().collect();
    for forbidden in [
        format!("Publish to \"agent.{BOB}.economy.balance\""),
        "Publish to \"economy.transfer\"".to_owned(),
        "Publish to \"admin.market.update_catalogue\"".to_owned(),
        "Publish to \"events.economy.transfers_posted\"".to_owned(),
        "Subscription to \">\"".to_owned(),
        "Subscription to \"agent.>\"".to_owned(),
        format!("Subscription to \"_INBOX_{BOB}.x.>\""),
        "Subscription to \"economy.>\"".to_owned(),
    ] {
        assert!(
            errors
                .iter()
                .map(|e| e.to_lowercase())
                .any(|e| e.contains("permissions violation")
                    && e.contains(&forbidden.to_lowercase())),
            "no refusal of {forbidden}: {}",
            report.log_tail
        );
    }
    assert!(
        report.log_tail.contains("CONNECTED AFTER DEADLINE False"),
        "{}",
        report.log_tail
    );
    assert!(report.log_tail.contains("REFUSED"), "{}", report.log_tail);
    assert!(!report.log_tail.contains("RECONNECTED"));
    // Nothing forged arrived anywhere.
    service.flush().await.unwrap();
    for (name, sub) in [
        ("agent", &mut stray),
        ("internal", &mut internal),
        ("admin", &mut admin),
        ("events", &mut events),
    ] {
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), sub.next()).await
        {
            assert!(
                message.subject.as_str() == format!("agent.{ALICE}.economy.balance"),
                "{name}: {} arrived",
                message.subject
            );
        }
    }
}

#[tokio::test]
async fn a_sandbox_cannot_open_more_than_its_nats_connections() {
    let world = world();
    let main = r#"
import socket, time
held = []
for i in range(20):
    s = socket.create_connection(("127.0.0.1", 4222), timeout=3)
    s.settimeout(3)
    try:
        info = s.recv(4)
    except OSError:
        info = b""
    held.append(s)
    print("CONN", i, "INFO" if info == b"INFO" else "NONE")
"#;
    let report = run_alice(&world, "many", main, 60).await;
    assert_eq!(report.outcome, Outcome::Completed, "{}", report.log_tail);
    let served = lines(&report, "CONN")
        .iter()
        .filter(|l| l.ends_with("INFO"))
        .count();
    // The in-sandbox relay accepts 16; the runner lets 8 through to NATS.
    assert_eq!(served, 8, "{}", report.log_tail);
}
