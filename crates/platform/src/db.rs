//! Postgres for a service: its own role and schema, its migrations (from `migrations/<service>/`)
//! applied at start-up under an advisory lock so replicas starting together take turns, and a
//! pool whose connections see only the service's schema.

use std::time::Duration;

use anyhow::{Context as _, bail};
use diesel::sql_types::{Bool, Text};
use diesel_async::pooled_connection::deadpool::Pool as DeadPool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};

use crate::config::DatabaseConfig;

pub type Pool = DeadPool<AsyncPgConnection>;
pub type PooledConnection = diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>;

/// Makes the service's schema ready and returns a pool on it.
///
/// With `admin_url`, the role named in `url` and the schema `schema` (owned by that role) are
/// created first if missing. The role owns its schema and is granted nothing else, so it can
/// touch no other service's tables.
pub async fn prepare(
    config: &DatabaseConfig,
    schema: &str,
    migrations: EmbeddedMigrations,
) -> anyhow::Result<Pool> {
    check_identifier(schema)?;
    let target = url::Url::parse(&config.url).context("database.url: not a URL")?;
    if let Some(admin_url) = &config.admin_url {
        ensure_role_and_schema(admin_url, &target, schema).await?;
    }
    let url = with_search_path(&config.url, schema)?;
    migrate(&url, schema, migrations).await?;
    // Fast recycling: no `SELECT 1` round trip on every checkout. A connection that died is
    // reported by the statement that uses it (UNAVAILABLE, retryable) and then discarded.
    let mut manager_config = ManagerConfig::default();
    manager_config.recycling_method = RecyclingMethod::Fast;
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .wait_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("database: cannot build the connection pool")?;
    Ok(pool)
}

/// Role and schema names are interpolated into DDL, so only plain identifiers are accepted.
fn check_identifier(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("{name:?} is not a plain lower-case identifier");
    }
    Ok(())
}

/// Every connection of the service resolves unqualified names in its own schema only.
fn with_search_path(url: &str, schema: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(url).context("database.url: not a URL")?;
    let others: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "options")
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(others)
        .append_pair("options", &format!("-csearch_path={schema}"));
    Ok(url.into())
}

async fn ensure_role_and_schema(
    admin_url: &str,
    target: &url::Url,
    schema: &str,
) -> anyhow::Result<()> {
    let role = target.username().to_owned();
    check_identifier(&role).context("database.url: the role name")?;
    let password = target
        .password()
        .map(percent_decode)
        .transpose()?
        .context("database.url: the service role needs a password")?;
    let database = target.path().trim_start_matches('/').to_owned();
    let mut admin_target = url::Url::parse(admin_url).context("database.admin_url: not a URL")?;
    admin_target.set_path(&database);
    let mut admin = AsyncPgConnection::establish(admin_target.as_str())
        .await
        .context("database.admin_url: cannot connect")?;
    let lock = format!("syntropism.bootstrap.{schema}");
    diesel::sql_query("SELECT pg_advisory_lock(hashtext($1))")
        .bind::<Text, _>(&lock)
        .execute(&mut admin)
        .await?;
    // Roles are cluster-wide while advisory locks are per database: another database's
    // bootstrap may create the same role concurrently, so creation tolerates "already exists".
    let literal = password.replace('\'', "''");
    let mut last_error = None;
    for _ in 0..5 {
        let created = diesel::sql_query(format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN \
                 CREATE ROLE {role} LOGIN PASSWORD '{literal}'; \
               END IF; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
             END $$"
        ))
        .execute(&mut admin)
        .await;
        match created {
            Ok(_) => {
                last_error = None;
                break;
            }
            Err(error) => {
                last_error = Some(error);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Some(error) = last_error {
        return Err(error).context(format!("cannot create role {role}"));
    }
    diesel::sql_query(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}"
    ))
    .execute(&mut admin)
    .await
    .with_context(|| format!("cannot create schema {schema}"))?;
    diesel::sql_query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind::<Text, _>(&lock)
        .execute(&mut admin)
        .await?;
    Ok(())
}

/// A URL's userinfo is percent-encoded; `+` and `&` are literal there (unlike in a form).
fn percent_decode(value: &str) -> anyhow::Result<String> {
    Ok(percent_encoding::percent_decode_str(value)
        .decode_utf8()?
        .into_owned())
}

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

/// Applies pending migrations; concurrent replicas serialise on an advisory lock, and the later
/// ones find nothing left to do.
async fn migrate(url: &str, schema: &str, migrations: EmbeddedMigrations) -> anyhow::Result<()> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .context("database.url: cannot connect as the service role")?;
    let owns: Flag = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1 \
           AND pg_get_userbyid(nspowner) = current_user) AS flag",
    )
    .bind::<Text, _>(schema)
    .get_result(&mut conn)
    .await?;
    if !owns.flag {
        bail!(
            "schema {schema} does not exist or is not owned by the service role; \
             set database.admin_url so the service can create it, or create it by hand"
        );
    }
    let lock = format!("syntropism.migrate.{schema}");
    diesel::sql_query("SELECT pg_advisory_lock(hashtext($1))")
        .bind::<Text, _>(&lock)
        .execute(&mut conn)
        .await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(migrations)
        .map_err(|e| anyhow::anyhow!("migrations for {schema} failed: {e}"))?;
    for version in &applied {
        tracing::info!(%schema, %version, "applied migration");
    }
    let mut conn = harness.into_inner();
    diesel::sql_query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind::<Text, _>(&lock)
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// A blocking-free check that the pool can reach Postgres (for `/readyz`).
pub async fn ping(pool: &Pool) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A pooled connection for a request handler: an exhausted or unreachable pool is
/// `UNAVAILABLE` (retryable).
pub async fn checkout(pool: &Pool) -> Result<PooledConnection, syntropism_contracts::RpcError> {
    pool.get().await.map_err(|e| {
        syntropism_contracts::RpcError::unavailable(format!("database unavailable: {e}"))
    })
}

/// A database failure as a request handler reports it: a write the database refused though
/// the service believed it valid is a bug (`INTERNAL`, not worth retrying); a value out of
/// range is `INVALID_ARGUMENT`; anything else (connection lost, contention) is `UNAVAILABLE`.
pub fn rpc_error(error: diesel::result::Error) -> syntropism_contracts::RpcError {
    use diesel::result::{DatabaseErrorKind, Error};
    use syntropism_contracts::RpcError;
    match &error {
        Error::DatabaseError(
            DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::UniqueViolation,
            info,
        ) => {
            tracing::error!(message = info.message(), "the database refused a write");
            RpcError::internal(format!("the database refused a write: {}", info.message()))
        }
        Error::DatabaseError(_, info) if info.message().contains("out of range") => {
            RpcError::invalid_argument(format!("a value is out of range: {}", info.message()))
                .with_reason("out_of_range")
        }
        _ => {
            tracing::warn!(%error, "database error");
            RpcError::unavailable(format!("database error: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_is_added_to_the_url() {
        let url = with_search_path("postgres://e:p@h:1/db?sslmode=disable", "economy").unwrap();
        assert_eq!(
            url,
            "postgres://e:p@h:1/db?sslmode=disable&options=-csearch_path%3Deconomy"
        );
    }

    #[test]
    fn passwords_survive_the_url() {
        let mut url = url::Url::parse("postgres://economy@127.0.0.1/syntropism").unwrap();
        let password = "a+b&c d%e/f:g@h";
        url.set_password(Some(password)).unwrap();
        assert_eq!(percent_decode(url.password().unwrap()).unwrap(), password);
    }

    #[test]
    fn identifiers_are_plain() {
        assert!(check_identifier("economy").is_ok());
        assert!(check_identifier("economy; drop").is_err());
        assert!(check_identifier("Economy").is_err());
        assert!(check_identifier("").is_err());
    }
}
