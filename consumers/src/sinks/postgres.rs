//! The Postgres connection: options from the config (search path pinned) and
//! the pool every stage shares.
//!
//! Guarantee: every connection tally opens uses the same options, so the
//! `tally` schema and sqlx's bookkeeping table resolve the same way everywhere.

use crate::config::Config;
use crate::config::PostgresConfig;
use crate::errors::StageError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use std::str::FromStr;
use std::time::Duration;

/// Connect options from the configured URL. The search path is pinned to
/// `public` so sqlx's `_sqlx_migrations` table never lands in a `tally` schema
/// that `"$user"` (a role named tally) would put first.
pub fn pg_options(cfg: &Config) -> Result<PgConnectOptions, StageError> {
    pg_options_of(&cfg.postgres)
}

/// [`pg_options`] from the `[postgres]` section alone: the URL, then the
/// password and TLS keys, which win over the URL's own parameters.
pub fn pg_options_of(pg: &PostgresConfig) -> Result<PgConnectOptions, StageError> {
    let mut opts = PgConnectOptions::from_str(&pg.url).map_err(|e| {
        StageError::Fatal(format!(
            "config key `postgres.url` ({}): {e}",
            crate::config::redact_url(&pg.url)
        ))
    })?;
    if !pg.password.is_empty() {
        opts = opts.password(&pg.password);
    }
    if !pg.sslmode.is_empty() {
        let mode = PgSslMode::from_str(&pg.sslmode)
            .map_err(|e| StageError::Fatal(format!("config key `postgres.sslmode`: {e}")))?;
        opts = opts.ssl_mode(mode);
    }
    if !pg.ssl_root_cert.is_empty() {
        opts = opts.ssl_root_cert(&pg.ssl_root_cert);
    }
    if !pg.ssl_client_cert.is_empty() {
        opts = opts
            .ssl_client_cert(&pg.ssl_client_cert)
            .ssl_client_key(&pg.ssl_client_key);
    }
    Ok(opts.options([("search_path", "public")]))
}

pub async fn connect_pg(cfg: &Config) -> Result<PgPool, StageError> {
    PgPoolOptions::new()
        .max_connections(cfg.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(pg_options(cfg)?)
        .await
        .map_err(|e| crate::errors::classify_pg("connect to postgres", e))
}
