//! Shared service plumbing, so each service's `main` is: load config, start, serve.
//!
//! - [`config`]: defaults → file → environment (`SYNTROPISM__SECTION__KEY`), validated at start.
//! - [`telemetry`]: `tracing` with JSON or pretty logs and an optional OTLP exporter.
//! - [`nats`]: connection with retry and backoff, optional credentials file.
//! - [`db`]: per-service schema and role, migrations applied safely by concurrent replicas, pool.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`outbox`]: events written in the business transaction, relayed to JetStream de-duplicated.
//! - [`service`]: the lifecycle tying these together, with graceful shutdown.
//! - [`cli`]: the `main` every service binary shares.

pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod nats;
pub mod outbox;
pub mod service;
pub mod shutdown;
pub mod sql;
pub mod telemetry;

pub use config::{ConfigError, PlatformConfig, Problems, Validate};
pub use service::Service;
