//! The Postgres connection: options from the config (search path pinned) and
//! the pool every stage shares.
//!
//! Guarantee: every connection tally opens uses the same options, so the
//! `tally` schema and sqlx's bookkeeping table resolve the same way everywhere.

use crate::config::Config;
use crate::errors::StageError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// Connect options from the configured URL. The search path is pinned to
/// `public` so sqlx's `_sqlx_migrations` table never lands in a `tally` schema
/// that `"$user"` (a role named tally) would put first.
pub fn pg_options(cfg: &Config) -> Result<PgConnectOptions, StageError> {
    let opts = PgConnectOptions::from_str(&cfg.postgres.url)
        .map_err(|e| StageError::Fatal(format!("config key `postgres.url`: {e}")))?;
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
