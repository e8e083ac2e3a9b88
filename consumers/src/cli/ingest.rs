//! `tally ingest`: arguments (the server is [`crate::ingest`]).
//!
//! Guarantee: the command changes only where it listens; everything else comes
//! from the `[ingest]`, `[kafka]`, `[policy]` and `[opa]` configuration.

use crate::config::Config;
use crate::errors::StageError;
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct IngestArgs {
    /// Listen here instead of `ingest.listen` (host:port).
    #[arg(long)]
    pub listen: Option<String>,
}

/// Serves OPA's decision-log uploads until `shutdown`.
pub async fn run(
    args: &IngestArgs,
    mut cfg: Config,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StageError> {
    if let Some(l) = &args.listen {
        if l.parse::<std::net::SocketAddr>().is_err() {
            return Err(StageError::Fatal(format!(
                "--listen {l}: expected host:port"
            )));
        }
        cfg.ingest.listen.clone_from(l);
    }
    crate::ingest::run(cfg, shutdown).await
}
