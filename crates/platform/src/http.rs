//! Each service's HTTP surface: `/healthz` (the process is alive), `/readyz` (its dependencies
//! answer and it is not shutting down) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

type Check = Box<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What `/readyz` asks before saying yes.
#[derive(Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
    stopping: AtomicBool,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.checks.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

impl Readiness {
    pub fn check<F, Fut>(mut self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name, Box::new(move || Box::pin(check()))));
        self
    }

    /// From now on `/readyz` fails, so load balancers stop sending work.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    async fn report(&self) -> (bool, String) {
        if self.stopping.load(Ordering::SeqCst) {
            return (false, "stopping\n".into());
        }
        let mut ok = true;
        let mut text = String::new();
        for (name, check) in &self.checks {
            let result = tokio::time::timeout(Duration::from_secs(2), check())
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            match result {
                Ok(()) => text.push_str(&format!("{name}: ok\n")),
                Err(error) => {
                    ok = false;
                    text.push_str(&format!("{name}: {error}\n"));
                }
            }
        }
        (ok, text)
    }
}

/// The process-wide Prometheus recorder (installed once, shared by every service in a process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test harness); then this
            // handle renders only what it sees, which is still valid output.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: PrometheusHandle,
}

/// Serves the endpoints on `listen` until `stop`; returns the bound address (useful with port 0).
pub async fn serve(
    listen: SocketAddr,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let metrics = metrics_handle();
    let upkeep = metrics.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                _ = upkeep_stop.cancelled() => break,
            }
        }
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(state): State<AppState>| async move { state.metrics.render() }),
        )
        .with_state(AppState { readiness, metrics });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen: cannot bind {listen}: {e}"))?;
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "http server failed");
        }
    });
    tracing::info!(%address, "health and metrics endpoints listening");
    Ok((address, task))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let (ok, text) = state.readiness.report().await;
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        text,
    )
}
