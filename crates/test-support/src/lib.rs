//! Real infrastructure for tests, never mocks.
//!
//! [`Nats::start`] runs a private `nats-server` (JetStream on) on a free port in a temporary
//! directory; [`Postgres::fresh_database`] creates a new, empty database on the project's
//! Postgres. Both fail loudly, naming the setup command, when the program or server is missing,
//! so a test never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

pub mod otlp;

pub use otlp::OtlpCollector;

/// The command that installs and starts everything tests need.
pub const SETUP_HINT: &str =
    "run `scripts/setup.sh` (installs and starts PostgreSQL and nats-server)";

/// The agent runtime image tests run agents in.
pub const AGENT_IMAGE: &str = "syntropism/agent-runtime:latest";

/// Fails the test, naming the build command, when the agent runtime image (or Docker) is
/// missing.
pub fn require_agent_image() {
    let ok = Command::new("docker")
        .args(["image", "inspect", AGENT_IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{AGENT_IMAGE} is missing (or Docker is not running): run `just agent-image` (scripts/test.sh builds it)"
    );
}

/// Admin URL of the Postgres that tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("SYNTROPISM_TEST_DATABASE_URL").unwrap_or_else(|_| {
        let port = std::env::var("SYNTROPISM_PG_PORT").unwrap_or_else(|_| "55432".into());
        format!("postgres://syntropism:syntropism@127.0.0.1:{port}/syntropism")
    })
}

/// A plain HTTP/1.1 GET on loopback (for health and metrics endpoints): status and body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A private nats-server with JetStream, killed on drop.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts a nats-server on a free port; panics with the setup command if it cannot.
    pub fn start() -> Nats {
        Self::start_with_config("")
    }

    /// Like [`Nats::start`], with extra server configuration (e.g. operator-mode
    /// authorisation); the listen address, port and JetStream directory stay the test's.
    pub fn start_with_config(config: &str) -> Nats {
        let binary = find_nats_server().unwrap_or_else(|| {
            panic!("nats-server is not installed (looked in $NATS_SERVER and $PATH): {SETUP_HINT}")
        });
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        // `-p -1` lets the server pick a free port itself and report it in a ports file, so
        // parallel tests never race for a port.
        let config_file = dir.path().join("server.conf");
        std::fs::write(&config_file, config).expect("nats-server config");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_file)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "--http_port", "-1"])
            .arg("-sd")
            .arg(dir.path().join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {SETUP_HINT}", binary.display()));
        let pid = child.id();
        let mut nats = Nats {
            child,
            port: 0,
            _dir: dir,
        };
        nats.port = wait_for_port(&ports_dir, pid, &mut nats.child);
        nats
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server abruptly (to test what survives a broker loss).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_nats_server() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

fn wait_for_port(ports_dir: &Path, pid: u32, child: &mut Child) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited at start-up ({status}); {SETUP_HINT}");
        }
        let file = std::fs::read_dir(ports_dir).ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(&format!("_{pid}.ports")))
        });
        if let Some(file) = file
            && let Ok(text) = std::fs::read_to_string(&file)
            && let Some(port) = parse_client_port(&text)
        {
            return port;
        }
        if Instant::now() > deadline {
            panic!("nats-server did not report its port within 15 s; {SETUP_HINT}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parse_client_port(text: &str) -> Option<u16> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = json.get("nats")?.as_array()?.iter().next()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// A fresh, empty database, dropped when this value is dropped.
#[derive(Debug)]
pub struct Postgres {
    admin_url: String,
    name: String,
}

impl Postgres {
    /// Creates a uniquely named database; panics with the setup command if Postgres is down.
    pub async fn fresh_database() -> Postgres {
        let admin_url = admin_url();
        let mut admin = AsyncPgConnection::establish(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to the test Postgres at {admin_url}: {e}; {SETUP_HINT}")
            });
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
        Postgres { admin_url, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Superuser URL of the fresh database (what a service's bootstrap uses).
    pub fn admin_url(&self) -> String {
        replace_database(&self.admin_url, &self.name)
    }

    /// URL of the fresh database for `role` with `password`.
    pub fn url_for(&self, role: &str, password: &str) -> String {
        let after_scheme = self
            .admin_url
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        let host_and_path = after_scheme
            .rsplit_once('@')
            .map(|(_, h)| h)
            .unwrap_or(after_scheme);
        replace_database(
            &format!("postgres://{role}:{password}@{host_and_path}"),
            &self.name,
        )
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    format!("{base}/{database}{query}")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Drop the database from a separate thread with its own runtime: Drop cannot await.
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = AsyncPgConnection::establish(&url).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_for_roles_and_databases() {
        let pg = Postgres {
            admin_url: "postgres://root:pw@127.0.0.1:5432/syntropism?sslmode=disable".into(),
            name: "test_x".into(),
        };
        assert_eq!(
            pg.admin_url(),
            "postgres://root:pw@127.0.0.1:5432/test_x?sslmode=disable"
        );
        assert_eq!(
            pg.url_for("economy", "secret"),
            "postgres://economy:secret@127.0.0.1:5432/test_x?sslmode=disable"
        );
        assert_eq!(
            parse_client_port(r#"{"nats":["nats://127.0.0.1:41234"]}"#),
            Some(41234)
        );
    }
}

/// A service's settings for a test, as the `SYNTROPISM__…` environment it reads: the test's
/// nats-server, the fresh database as `role` (whose password is its name), a small pool, no
/// HTTP listener, a fast outbox; then `extra`, which may override any of them.
pub fn service_vars(
    nats: &Nats,
    pg: &Postgres,
    role: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut vars = vec![
        ("SYNTROPISM__NATS__URL".to_owned(), nats.url()),
        (
            "SYNTROPISM__DATABASE__URL".to_owned(),
            pg.url_for(role, role),
        ),
        ("SYNTROPISM__DATABASE__ADMIN_URL".to_owned(), pg.admin_url()),
        ("SYNTROPISM__DATABASE__POOL_SIZE".to_owned(), "4".to_owned()),
        ("SYNTROPISM__HTTP__ENABLED".to_owned(), "false".to_owned()),
        (
            "SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".to_owned(),
            "50".to_owned(),
        ),
    ];
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    vars
}

/// A service running in this test's process: the token that stops it and its task.
#[derive(Debug)]
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Runs `service` (a service's `run()` future), stopped by `stop`.
    pub fn spawn(
        stop: tokio_util::sync::CancellationToken,
        service: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Running {
        Running {
            stop,
            task: tokio::spawn(service),
        }
    }

    /// Stops the service and waits for it to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// The subject a request for `M` goes to: as `agent` for agent-facing methods, else the
/// method's own subject.
pub fn subject_of<M: syntropism_contracts::Method>(
    agent: &syntropism_contracts::AgentId,
) -> String {
    M::ENDPOINT
        .subject(Some(agent))
        .or_else(|_| M::ENDPOINT.subject(None))
        .unwrap()
}

/// Sends bytes that are not a valid request (not protobuf, a truncated field, one byte over the
/// size limit) to each of `subjects`, and asserts each is answered with `INVALID_ARGUMENT` or
/// `PAYLOAD_TOO_LARGE`.
pub async fn assert_garbage_refused(client: &syntropism_contracts::RpcClient, subjects: &[String]) {
    use syntropism_contracts::ErrorCode;
    let garbage = [
        bytes::Bytes::from_static(&[0xff; 16]),
        bytes::Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0f"),
        bytes::Bytes::from_static(b"\x12\x05abc"),
        bytes::Bytes::from(vec![
            0x08;
            syntropism_contracts::rpc::DEFAULT_MAX_REQUEST_BYTES + 1
        ]),
    ];
    for subject in subjects {
        for (i, payload) in garbage.iter().enumerate() {
            let reply = client
                .request_raw(subject, async_nats::HeaderMap::new(), payload.clone())
                .await
                .expect("a reply");
            assert!(
                reply
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get(syntropism_contracts::headers::ERROR).is_some()),
                "{subject} garbage #{i}: answered as if valid"
            );
            // An error reply: its decoding does not depend on the method's response type.
            let error =
                syntropism_contracts::rpc::decode_reply::<syntropism_contracts::pb::Error>(reply)
                    .unwrap_err();
            assert!(
                matches!(
                    error.code,
                    ErrorCode::InvalidArgument | ErrorCode::PayloadTooLarge
                ),
                "{subject} garbage #{i}: {error}"
            );
        }
    }
}
