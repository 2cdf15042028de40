//! The sandbox's only way out: Unix sockets the runner listens on, mounted read-only into the
//! container at `/run/syntropism`.
//!
//! A sandbox has no network interface but loopback (`network none`): no route, no resolver, no
//! peer. The runtime's launcher listens on the container's `127.0.0.1:4222` and copies each
//! connection to `nats.sock`; the runner copies each connection on `nats.sock` to the NATS server.
//! So NATS is the one thing a sandbox reaches, and the NATS server still checks the execution's
//! own credentials on every connection. (On Kubernetes the same holds with a NetworkPolicy that
//! lets agent pods reach only the NATS service; the relay is then not needed.)
//!
//! Debug mode adds `debug.sock`: the launcher dials it; when a debugger connects to the runner
//! host's `127.0.0.1:<debug port>`, the runner answers `!` on the dial and joins the two.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where the socket directory is mounted in the container.
pub const CONTAINER_DIR: &str = "/run/syntropism";
pub const NATS_SOCKET: &str = "nats.sock";
pub const DEBUG_SOCKET: &str = "debug.sock";

/// One execution's sockets; dropping it closes every connection and removes the directory.
#[derive(Debug)]
pub struct Relays {
    dir: PathBuf,
    stop: CancellationToken,
    tasks: TaskTracker,
    debug_address: Option<SocketAddr>,
}

impl Relays {
    /// Creates `dir` (which must not exist) and listens on `nats.sock`, relaying each connection
    /// to `nats_upstream` (`host:port`), at most `max_connections` at once. With `debug`, also
    /// listens on `debug.sock` and on that TCP address (127.0.0.1 only).
    pub async fn start(
        dir: &Path,
        nats_upstream: &str,
        max_connections: usize,
        debug: Option<SocketAddr>,
    ) -> std::io::Result<Relays> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(address) = debug
            && !address.ip().is_loopback()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the debug port is published on loopback only",
            ));
        }
        std::fs::DirBuilder::new().mode(0o755).create(dir)?;
        let relays = Relays {
            dir: dir.to_owned(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            debug_address: None,
        };
        let nats = UnixListener::bind(dir.join(NATS_SOCKET))?;
        // The agent's uid must be able to connect.
        std::fs::set_permissions(
            dir.join(NATS_SOCKET),
            std::fs::Permissions::from_mode(0o666),
        )?;
        let slots = Arc::new(Semaphore::new(max_connections.max(1)));
        let (stop, tasks, upstream) = (
            relays.stop.clone(),
            relays.tasks.clone(),
            nats_upstream.to_owned(),
        );
        relays.tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = nats.accept() => accepted,
                };
                let Ok((mut inside, _)) = accepted else {
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("sandbox NATS connection refused: too many");
                    continue;
                };
                let (stop, upstream) = (stop.clone(), upstream.clone());
                tasks.spawn(async move {
                    let Ok(mut outside) = TcpStream::connect(&upstream).await else {
                        tracing::warn!(%upstream, "sandbox relay cannot reach NATS");
                        return;
                    };
                    let _ = outside.set_nodelay(true);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inside, &mut outside) => {}
                    }
                    drop(permit);
                });
            }
        });
        let mut relays = relays;
        if let Some(address) = debug {
            relays.debug_address = Some(relays.start_debug(address).await?);
        }
        Ok(relays)
    }

    async fn start_debug(&self, address: SocketAddr) -> std::io::Result<SocketAddr> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(DEBUG_SOCKET);
        let dial = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let debugger = TcpListener::bind(address).await?;
        let local = debugger.local_addr()?;
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                // The container dials first; then a debugger on the host is joined to it.
                let inside = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = dial.accept() => accepted,
                };
                let Ok((mut inside, _)) = inside else {
                    continue;
                };
                let outside = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = debugger.accept() => accepted,
                };
                let Ok((mut outside, peer)) = outside else {
                    continue;
                };
                tracing::info!(%peer, "debugger attached to a sandbox");
                if inside.write_all(b"!").await.is_err() {
                    continue;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::io::copy_bidirectional(&mut inside, &mut outside) => {}
                }
            }
        });
        Ok(local)
    }

    /// The directory to mount at [`CONTAINER_DIR`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a debugger connects, in debug mode.
    pub fn debug_address(&self) -> Option<SocketAddr> {
        self.debug_address
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
