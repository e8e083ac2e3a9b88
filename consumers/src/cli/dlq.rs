//! `tally dlq redrive`: arguments and output (the work is in [`crate::redrive`]).
//!
//! Guarantee: the arguments are checked (stream, every class known to it and
//! not refused, `--since` RFC 3339) before anything is read or written;
//! `--dry-run` reads the DLQ and Postgres and changes nothing.

use crate::config::Config;
use crate::errors::StageError;
use crate::redrive::{self, Options};
use chrono::{DateTime, Utc};
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// Re-produce dead letters of the chosen classes to their stream's input
    /// topic (after fixing the cause), each once: progress is recorded in
    /// Postgres, so running it again re-produces nothing (unless --again).
    Redrive(RedriveArgs),
}

#[derive(clap::Args)]
pub struct RedriveArgs {
    /// usage, policy or audit: which dead-letter topic to read and input topic to feed.
    #[arg(long)]
    pub stream: String,
    /// Dead-letter classes to redrive, comma-separated (e.g. unknown_schema_id,opa_missing_tenant).
    #[arg(long, value_delimiter = ',', required = true)]
    pub class: Vec<String>,
    /// Start every DLQ partition at this offset (default: its beginning).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Only letters dead-lettered at or after this time (RFC 3339; the DLQ message's timestamp).
    #[arg(long)]
    pub since: Option<String>,
    /// Print what would be redriven; produce and record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Re-produce letters that were redriven before too.
    #[arg(long)]
    pub again: bool,
    /// Letters recorded and produced per round.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// How long the broker may take to acknowledge a letter (ms).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Checks the arguments into [`Options`].
pub fn options(args: &RedriveArgs) -> Result<Options, String> {
    if !["usage", "policy", "audit"].contains(&args.stream.as_str()) {
        return Err(format!(
            "--stream {}: expected usage, policy or audit",
            args.stream
        ));
    }
    let classes = redrive::check_classes(&args.stream, &args.class)?;
    let since = match &args.since {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("--since {s}: not RFC 3339: {e}"))?
                .with_timezone(&Utc),
        ),
    };
    if args.from_offset.is_some_and(|o| o < 0) {
        return Err("--from-offset must be >= 0".into());
    }
    if args.batch == 0 || args.timeout_ms == 0 {
        return Err("--batch and --timeout-ms must be > 0".into());
    }
    Ok(Options {
        stream: args.stream.clone(),
        classes,
        from_offset: args.from_offset,
        since,
        dry_run: args.dry_run,
        again: args.again,
        batch: args.batch,
    })
}

/// Runs the command; returns what to print.
pub async fn run(cfg: &Config, command: &DlqCommand) -> Result<String, StageError> {
    match command {
        DlqCommand::Redrive(args) => {
            let opts = options(args).map_err(StageError::Fatal)?;
            let report =
                redrive::run::run(cfg, &opts, Duration::from_millis(args.timeout_ms)).await?;
            Ok(report.to_string())
        }
    }
}
