//! Layered configuration: built-in defaults → optional TOML file → environment variables
//! `SYNTROPISM__<SECTION>__<KEY>` (DESIGN.md §5), then validated once, with errors naming the key.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file, or a value of the wrong type (the message names the key).
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// Values of the right type that break a rule; one line per problem, each naming its key.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// Collects validation problems, each naming the offending key.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records `message` against `key` unless `ok`.
    pub fn check(&mut self, ok: bool, key: &str, message: impl std::fmt::Display) {
        if !ok {
            self.0.push(format!("{key}: {message}"));
        }
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

/// A configuration section that can check its own values.
pub trait Validate {
    fn validate(&self, problems: &mut Problems);
}

/// The settings every service shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[derive(Default)]
pub struct PlatformConfig {
    pub nats: NatsConfig,
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub rpc: RpcConfig,
    pub outbox: OutboxConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    pub url: String,
    /// A NATS `.creds` file (JWT + nkey seed), when the server requires it.
    pub credentials_file: Option<PathBuf>,
    /// How many times to try the first connection before giving up (0: forever).
    pub connect_attempts: u32,
    pub connect_timeout_ms: u64,
    /// How long an outgoing request waits for its reply.
    pub request_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            connect_attempts: 30,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// The service's own role on the shared database; the role's name is taken from here.
    pub url: String,
    /// A superuser URL on the same database. When set, the service creates its role and schema
    /// at start-up if missing; otherwise they must already exist.
    pub admin_url: Option<String>,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            admin_url: None,
            pool_size: 16,
            connect_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Where `/healthz`, `/readyz` and `/metrics` listen (port 0: any free port).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub log_filter: String,
    /// OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`); off when absent.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RpcConfig {
    /// Bound on concurrently running request handlers per replica.
    pub max_in_flight: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self { max_in_flight: 256 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutboxConfig {
    /// How often the relay looks for events written by other replicas.
    pub poll_interval_ms: u64,
    /// After being woken by a commit, how long the relay waits for more events, so that under
    /// load one relay transaction carries many events instead of one each.
    pub linger_ms: u64,
    pub batch_size: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 250,
            linger_ms: 10,
            batch_size: 256,
        }
    }
}

impl Validate for PlatformConfig {
    fn validate(&self, p: &mut Problems) {
        let nats = &self.nats;
        p.check(
            nats.url
                .split(',')
                .all(|u| u.starts_with("nats://") || u.starts_with("tls://")),
            "nats.url",
            format!(
                "{:?} must be nats://host:port (comma-separated for several)",
                nats.url
            ),
        );
        if let Some(file) = &nats.credentials_file {
            p.check(
                file.is_file(),
                "nats.credentials_file",
                format!("{} is not a file", file.display()),
            );
        }
        p.check(
            nats.connect_timeout_ms > 0,
            "nats.connect_timeout_ms",
            "must be > 0",
        );
        p.check(
            nats.request_timeout_ms > 0,
            "nats.request_timeout_ms",
            "must be > 0",
        );
        let db = &self.database;
        p.check(
            is_postgres_url(&db.url),
            "database.url",
            "must be postgres://role:password@host:port/database",
        );
        if let Some(admin) = &db.admin_url {
            p.check(
                is_postgres_url(admin),
                "database.admin_url",
                "must be postgres://user:password@host:port/database",
            );
        }
        p.check(
            (1..=1024).contains(&db.pool_size),
            "database.pool_size",
            "must be between 1 and 1024",
        );
        p.check(
            db.connect_timeout_ms > 0,
            "database.connect_timeout_ms",
            "must be > 0",
        );
        p.check(
            self.rpc.max_in_flight > 0,
            "rpc.max_in_flight",
            "must be > 0",
        );
        p.check(
            self.outbox.poll_interval_ms > 0,
            "outbox.poll_interval_ms",
            "must be > 0",
        );
        p.check(
            self.outbox.linger_ms < 10_000,
            "outbox.linger_ms",
            "must be < 10000",
        );
        p.check(
            (1..=10_000).contains(&self.outbox.batch_size),
            "outbox.batch_size",
            "must be between 1 and 10000",
        );
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            p.check(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "telemetry.otlp_endpoint",
                "must be an http(s):// URL",
            );
        }
        p.check(
            tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_filter).is_ok(),
            "telemetry.log_filter",
            "is not a valid tracing filter",
        );
    }
}

fn is_postgres_url(value: &str) -> bool {
    url::Url::parse(value)
        .map(|u| matches!(u.scheme(), "postgres" | "postgresql") && !u.username().is_empty())
        .unwrap_or(false)
}

/// A service's whole configuration: the shared sections and its own `[<service>]` section.
#[derive(Debug, Clone)]
pub struct ServiceConfig<S> {
    pub platform: PlatformConfig,
    pub service: S,
}

/// Loads the shared sections and the `[section]` of one service: `defaults` (key, value) first,
/// then `file` if given, then the environment (`SYNTROPISM__DATABASE__URL=…`), then validates.
pub fn load<S>(
    section: &str,
    defaults: &[(&str, &str)],
    file: Option<&Path>,
) -> Result<ServiceConfig<S>, ConfigError>
where
    S: DeserializeOwned + Default + Validate,
{
    load_from(section, defaults, file, std::env::vars())
}

/// [`load`] with an explicit environment (tests must not mutate the process environment).
pub fn load_from<S>(
    section: &str,
    defaults: &[(&str, &str)],
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<ServiceConfig<S>, ConfigError>
where
    S: DeserializeOwned + Default + Validate,
{
    let mut builder = config::Config::builder();
    for (key, value) in defaults {
        builder = builder.set_default(*key, *value)?;
    }
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SYNTROPISM__"))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("SYNTROPISM")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(env)),
    );
    let layered = builder.build()?;
    // Two plain deserialisations rather than one `#[serde(flatten)]`: flattening would lose the
    // key path that type errors must name.
    let platform: PlatformConfig = layered.clone().try_deserialize()?;
    let service: S =
        serde::de::DeserializeSeed::deserialize(Section::<S>(section, PhantomData), layered)?;
    let mut problems = Problems::default();
    platform.validate(&mut problems);
    service.validate(&mut problems);
    problems.into_result()?;
    Ok(ServiceConfig { platform, service })
}

/// Deserialises one top-level table through the `Config` deserializer itself, which (unlike
/// `Config::get`) reports the full key path of a wrong value, e.g. `economy.system_shards`.
struct Section<'a, S>(&'a str, PhantomData<S>);

impl<'de, S: DeserializeOwned + Default> serde::de::DeserializeSeed<'de> for Section<'_, S> {
    type Value = S;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<S, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, S: DeserializeOwned + Default> serde::de::Visitor<'de> for Section<'_, S> {
    type Value = S;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a configuration with an optional [{}] section", self.0)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<S, A::Error> {
        let mut section = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.0 {
                section = Some(map.next_value::<S>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(section.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Own {
        shards: u32,
    }

    impl Validate for Own {
        fn validate(&self, p: &mut Problems) {
            p.check(self.shards <= 64, "own.shards", "must be <= 64");
        }
    }

    type TestConfig = ServiceConfig<Own>;

    const DEFAULTS: &[(&str, &str)] = &[("database.url", "postgres://svc:pw@127.0.0.1:5432/db")];

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.toml");
        std::fs::write(
            &file,
            "[nats]\nurl = \"nats://file:4222\"\nrequest_timeout_ms = 900\n",
        )
        .unwrap();
        let cfg: TestConfig = load_from(
            "own",
            DEFAULTS,
            Some(&file),
            env(&[("SYNTROPISM__NATS__URL", "nats://env:4222"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(cfg.platform.nats.url, "nats://env:4222");
        assert_eq!(cfg.platform.nats.request_timeout_ms, 900);
        assert_eq!(
            cfg.platform.database.url,
            "postgres://svc:pw@127.0.0.1:5432/db"
        );
        assert_eq!(cfg.platform.database.pool_size, 16);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = load_from::<Own>(
            "own",
            DEFAULTS,
            None,
            env(&[("SYNTROPISM__DATABASE__POOL_SIZE", "lots")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("database.pool_size"), "{err}");
        let err = load_from::<Own>(
            "own",
            DEFAULTS,
            None,
            env(&[("SYNTROPISM__OWN__SHARDS", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("own.shards"), "{err}");
        let err = load_from::<Own>(
            "own",
            DEFAULTS,
            None,
            env(&[("SYNTROPISM__OWN__SHARDS", "65")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("own.shards: must be <= 64"), "{err}");
    }

    #[test]
    fn rule_violations_name_every_key() {
        let err = load_from::<Own>(
            "own",
            DEFAULTS,
            None,
            env(&[
                ("SYNTROPISM__NATS__URL", "http://nope"),
                ("SYNTROPISM__DATABASE__POOL_SIZE", "0"),
                ("SYNTROPISM__TELEMETRY__OTLP_ENDPOINT", "localhost:4317"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for key in ["nats.url", "database.pool_size", "telemetry.otlp_endpoint"] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = load_from::<Own>(
            "own",
            DEFAULTS,
            Some(Path::new("/nonexistent.toml")),
            env(&[]),
        );
        assert!(err.is_err());
    }
}
