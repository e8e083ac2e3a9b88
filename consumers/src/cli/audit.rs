//! `tally audit keygen | verify | prove | verify-proof` (docs/audit-log.md, "The
//! `tally audit` commands").
//!
//! Guarantee: every command ends with one of the documented exit codes: 0 intact /
//! valid / done, 1 an error (a database down, an unreadable file, an event not
//! found), 2 a usage or configuration error, 3 tampering found or a proof refused,
//! 4 (`prove`) the event is not covered by a checkpoint yet. `verify-proof` and
//! `keygen` use no configuration, database or network; `prove` writes a proof only
//! after checking that the stored rows recompute to the signed checkpoint it embeds
//! and that the proof verifies with the public key alone.

mod verify;

use crate::audit::checkpoint::{open_checkpoint, origin_for};
use crate::audit::leaf::AuditLeaf;
use crate::audit::note::{self, NoteSigner, NoteVerifier};
use crate::audit::stream_proof::InclusionBuilder;
use crate::audit::tlog_proof::{event_proof, verify_event_proof, VerifiedEvent};
use crate::audit::verify::{TreeVerifier, Verdict};
use crate::config::Config;
use crate::streams::audit::store::{self, AuditRow, LeafStream, StoreError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Intact, valid, done.
pub const EXIT_OK: i32 = 0;
/// An error: a database or file could not be read, an event was not found.
pub const EXIT_ERROR: i32 = 1;
/// A usage or configuration error.
pub const EXIT_USAGE: i32 = 2;
/// Tampering found (`verify`, `prove`) or a proof refused (`verify-proof`).
pub const EXIT_TAMPERED: i32 = 3;
/// `prove`: the event is not covered by a checkpoint yet (retry after the next one).
pub const EXIT_NOT_COVERED: i32 = 4;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print a fresh checkpoint signing key (for audit.signing_key) and its public
    /// verifier key (for --public-key), from OS randomness.
    Keygen {
        /// Key name: prefixes every checkpoint origin (<name>/<tenant>), e.g. tally.example/audit.
        name: String,
    },
    /// Recompute every tenant's Merkle tree from ClickHouse and check it against the
    /// signed checkpoints in Postgres and any trusted checkpoint files.
    /// Exit 0 intact, 3 tampered, 1 error, 2 usage/config error.
    Verify {
        /// Only this tenant (default: every tenant with rows or checkpoints).
        #[arg(long)]
        tenant: Option<String>,
        /// A signed checkpoint kept outside the databases (the tenant is taken from
        /// its origin); may be repeated.
        #[arg(long = "trusted-checkpoint", value_name = "FILE")]
        trusted_checkpoints: Vec<PathBuf>,
        /// Verifier key (<name>+<id>+<base64>); default: that of audit.signing_key.
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
        /// One JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the offline inclusion proof (C2SP tlog-proof) of one stored event in its
    /// tenant's latest checkpoint. Exit 0 written, 4 not covered by a checkpoint yet,
    /// 3 the stored rows do not match the checkpoint, 1 error, 2 usage/config error.
    Prove {
        event_id: Uuid,
        /// The event's tenant (needed only if the event id is stored for several).
        #[arg(long)]
        tenant: Option<String>,
        /// Output file (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Verifier key (<name>+<id>+<base64>); default: that of audit.signing_key.
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
    },
    /// Check a proof file offline with the log's public key only, and show the event.
    /// Exit 0 valid, 3 invalid, 1 unreadable file, 2 bad key.
    VerifyProof {
        /// The .tlog-proof file (`-`: stdin).
        file: PathBuf,
        /// The log's verifier key: <name>+<id>+<base64>.
        #[arg(long, value_name = "KEY")]
        public_key: String,
        /// One JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How a command failed, and so its exit code.
#[derive(Debug)]
enum Fail {
    Error(String),
    Usage(String),
    Tampered(String),
    NotCovered(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Error(e.to_string())
    }
}

/// Run one `tally audit` command; returns the process exit code. `config` is the
/// `--config` file (read only by the commands that need the configuration).
pub async fn run(command: AuditCommand, config: Option<&Path>) -> i32 {
    let result = match command {
        AuditCommand::Keygen { name } => keygen(&name),
        AuditCommand::VerifyProof {
            file,
            public_key,
            json,
        } => verify_proof(&file, &public_key, json),
        AuditCommand::Verify {
            tenant,
            trusted_checkpoints,
            public_key,
            json,
        } => match load_config(config) {
            Ok(cfg) => {
                let args = verify::VerifyArgs {
                    tenant,
                    trusted: trusted_checkpoints,
                    public_key,
                    json,
                };
                verify::verify(&cfg, &args).await
            }
            Err(f) => Err(f),
        },
        AuditCommand::Prove {
            event_id,
            tenant,
            out,
            public_key,
        } => match load_config(config) {
            Ok(cfg) => {
                prove(
                    &cfg,
                    event_id,
                    tenant.as_deref(),
                    out.as_deref(),
                    public_key,
                )
                .await
            }
            Err(f) => Err(f),
        },
    };
    match result {
        Ok(code) => code,
        Err(fail) => {
            let (code, msg) = match fail {
                Fail::Error(m) => (EXIT_ERROR, m),
                Fail::Usage(m) => (EXIT_USAGE, m),
                Fail::Tampered(m) => (EXIT_TAMPERED, format!("TAMPERED: {m}")),
                Fail::NotCovered(m) => (EXIT_NOT_COVERED, m),
            };
            eprintln!("tally audit: {msg}");
            code
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, Fail> {
    Config::load(path).map_err(|e| Fail::Usage(format!("configuration error: {e}")))
}

/// The key that checkpoints must be signed with: `--public-key`, else the public half
/// of `audit.signing_key`.
fn verifier_key(cfg: &Config, public_key: Option<&str>) -> Result<NoteVerifier, Fail> {
    if let Some(k) = public_key {
        return NoteVerifier::parse(k).map_err(|e| Fail::Usage(format!("--public-key {k:?}: {e}")));
    }
    if cfg.audit.signing_key.trim().is_empty() {
        return Err(Fail::Usage(
            "audit.signing_key is not set (TALLY__AUDIT__SIGNING_KEY); or pass --public-key".into(),
        ));
    }
    Ok(cfg
        .audit
        .signer()
        .map_err(|e| Fail::Usage(e.to_string()))?
        .verifier())
}

/// ClickHouse client and a small Postgres pool for the configured databases.
async fn connect(cfg: &Config) -> Result<(clickhouse::Client, sqlx::PgPool), Fail> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(
            crate::sinks::postgres::pg_options(cfg).map_err(|e| Fail::Error(e.to_string()))?,
        )
        .await
        .map_err(|e| Fail::Error(format!("postgres: connect: {e}")))?;
    Ok((store::clickhouse_client(&cfg.clickhouse), pool))
}

fn keygen(name: &str) -> Result<i32, Fail> {
    use rand::TryRngCore as _;
    if !note::valid_key_name(name) {
        return Err(Fail::Usage(format!(
            "key name {name:?} must be non-empty, without spaces or '+'"
        )));
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| Fail::Error(format!("OS randomness: {e}")))?;
    let signer = NoteSigner::new(name, &seed).map_err(|e| Fail::Usage(e.to_string()))?;
    println!("# signing key {name} (key id {:08x})", signer.key_id());
    println!("# private: audit.signing_key (TALLY__AUDIT__SIGNING_KEY); keep it secret");
    println!("{}", signer.to_key_string());
    println!("# public: give it to verifiers (tally audit verify-proof --public-key)");
    println!("{}", signer.verifier());
    Ok(EXIT_OK)
}

/// The one stored row of `event_id` (within `tenant` when given).
async fn find_row(
    client: &clickhouse::Client,
    event_id: Uuid,
    tenant: Option<&str>,
) -> Result<AuditRow, Fail> {
    let mut rows = store::find_event(client, event_id, tenant).await?;
    let within = tenant
        .map(|t| format!(" of tenant {t:?}"))
        .unwrap_or_default();
    match rows.len() {
        0 => Err(Fail::Error(format!(
            "event {event_id} is not in audit_events{within}"
        ))),
        1 => Ok(rows.remove(0)),
        _ if rows.iter().any(|r| r.tenant_id != rows[0].tenant_id) => {
            let tenants: Vec<&str> = rows.iter().map(|r| r.tenant_id.as_str()).collect();
            Err(Fail::Usage(format!(
                "event {event_id} is stored for tenants {tenants:?}: pass --tenant"
            )))
        }
        n => {
            let indexes: Vec<u64> = rows.iter().map(|r| r.leaf_index).collect();
            Err(Fail::Tampered(format!(
                "event {event_id} is stored {n} times in tenant {:?} (leaf indexes {indexes:?}); \
                 run tally audit verify --tenant {}",
                rows[0].tenant_id, rows[0].tenant_id
            )))
        }
    }
}

async fn prove(
    cfg: &Config,
    event_id: Uuid,
    tenant: Option<&str>,
    out: Option<&Path>,
    public_key: Option<String>,
) -> Result<i32, Fail> {
    let key = verifier_key(cfg, public_key.as_deref())?;
    let (client, pool) = connect(cfg).await?;
    let row = find_row(&client, event_id, tenant).await?;
    let tenant = row.tenant_id.clone();
    let leaf = row
        .into_leaf()
        .map_err(|e| Fail::Tampered(format!("the row of event {event_id} is invalid: {e}")))?;
    let latest = store::latest_checkpoint(&pool, &tenant)
        .await?
        .ok_or_else(|| {
            Fail::NotCovered(format!(
                "event {event_id} is leaf {} of tenant {tenant:?}, which has no checkpoint yet: \
                 not covered; retry after the next checkpoint",
                leaf.leaf_index
            ))
        })?;
    let origin = origin_for(key.name(), &tenant);
    let (cp, _) = open_checkpoint(
        latest.signed_note.as_bytes(),
        std::slice::from_ref(&key),
        Some(&origin),
    )
    .map_err(|e| {
        Fail::Tampered(format!(
            "the latest checkpoint of tenant {tenant:?} (checkpoint {}) is rejected: {e}; \
                 run tally audit verify --tenant {tenant}",
            latest.checkpoint_id
        ))
    })?;
    if leaf.leaf_index >= cp.size {
        return Err(Fail::NotCovered(format!(
            "event {event_id} is leaf {} of tenant {tenant:?}; its latest checkpoint ({}) covers \
             leaves 0..{} only: not covered yet; retry after the next checkpoint",
            leaf.leaf_index, latest.checkpoint_id, cp.size
        )));
    }
    // One pass over leaves 0..size: check them against the checkpoint while
    // accumulating the proof's subtree roots.
    let mut verifier = TreeVerifier::new(&tenant, std::slice::from_ref(&cp));
    let mut builder =
        InclusionBuilder::new(leaf.leaf_index, cp.size).map_err(|e| Fail::Error(e.to_string()))?;
    let mut stream = LeafStream::new(&client, &tenant, 0, cp.size);
    while let Some(r) = stream.next().await? {
        let at = r.leaf_index;
        let l = r.into_leaf().map_err(|e| {
            Fail::Tampered(format!(
                "leaf {at} of tenant {tenant:?} is an invalid row: {e}"
            ))
        })?;
        let hash = l.leaf_hash();
        verifier.push_hashed(&l, hash, None);
        if verifier.is_tampered() {
            break;
        }
        builder.push(hash);
    }
    if let Verdict::Tampered { first_bad, tamper } = verifier.finish() {
        return Err(Fail::Tampered(format!(
            "the stored rows of tenant {tenant:?} do not match its latest checkpoint (size {}): \
             first bad leaf {first_bad} ({}); run tally audit verify --tenant {tenant}",
            cp.size,
            verify::tamper_kind(&tamper)
        )));
    }
    let hashes = builder.finish().map_err(|e| Fail::Error(e.to_string()))?;
    let text = event_proof(&leaf, hashes, latest.signed_note.clone()).to_text();
    verify_event_proof(text.as_bytes(), &key)
        .map_err(|e| Fail::Error(format!("the proof just made does not verify: {e}")))?;
    let what = format!(
        "proof of event {event_id} (leaf {} of tenant {tenant:?} in checkpoint {}, size {})",
        leaf.leaf_index, latest.checkpoint_id, cp.size
    );
    match out {
        Some(path) => {
            std::fs::write(path, &text)
                .map_err(|e| Fail::Error(format!("write {}: {e}", path.display())))?;
            println!("wrote the {what} to {}", path.display());
        }
        None => {
            print!("{text}");
            eprintln!("tally audit: wrote the {what}");
        }
    }
    Ok(EXIT_OK)
}

fn read_input(file: &Path) -> Result<Vec<u8>, Fail> {
    if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| Fail::Error(format!("read stdin: {e}")))?;
        return Ok(buf);
    }
    std::fs::read(file).map_err(|e| Fail::Error(format!("read {}: {e}", file.display())))
}

fn verify_proof(file: &Path, public_key: &str, json: bool) -> Result<i32, Fail> {
    let key = NoteVerifier::parse(public_key)
        .map_err(|e| Fail::Usage(format!("--public-key {public_key:?}: {e}")))?;
    let bytes = read_input(file)?;
    match verify_event_proof(&bytes, &key) {
        Ok(v) => {
            if json {
                println!("{}", verified_json(&v, &key));
            } else {
                print!("{}", verified_text(&v, &key));
            }
            Ok(EXIT_OK)
        }
        Err(e) => {
            if json {
                let doc = serde_json::json!({ "valid": false, "reason": e.to_string() });
                println!("{doc}");
            } else {
                println!("INVALID: {}: {e}", file.display());
            }
            Ok(EXIT_TAMPERED)
        }
    }
}

/// RFC 3339 with microseconds, or the raw number if out of range.
fn micros_text(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{us} us"))
}

/// The stored columns of a leaf, in leaf order, as (name, text).
fn leaf_fields(l: &AuditLeaf) -> Vec<(&'static str, String)> {
    vec![
        ("tenant_id", l.tenant_id.clone()),
        ("leaf_index", l.leaf_index.to_string()),
        ("event_id", l.event_id.to_string()),
        ("occurred_at", micros_text(l.occurred_at_us)),
        ("team_id", l.team_id.clone()),
        ("project_id", l.project_id.clone()),
        ("user_id", l.user_id.clone()),
        ("source", l.source.clone()),
        ("actor_type", l.actor_type.clone()),
        ("actor_id", l.actor_id.clone()),
        ("action", l.action.clone()),
        ("resource_type", l.resource_type.clone()),
        ("resource_id", l.resource_id.clone()),
        ("outcome", l.outcome.clone()),
        ("ip", l.ip.clone()),
        ("user_agent", l.user_agent.clone()),
        ("details", l.details.clone()),
        ("personal_data", l.personal_data.to_string()),
        ("pseudonym_key_version", l.pseudonym_key_version.to_string()),
    ]
}

fn verified_text(v: &VerifiedEvent, key: &NoteVerifier) -> String {
    let mut out = format!(
        "VALID: event {} is leaf {} of tenant {:?}, included in the checkpoint {} of size {} \
         (root {}) signed by {key}\n",
        v.leaf.event_id,
        v.leaf.leaf_index,
        v.leaf.tenant_id,
        v.checkpoint.origin,
        v.checkpoint.size,
        B64.encode(v.checkpoint.root)
    );
    for (name, value) in leaf_fields(&v.leaf) {
        out.push_str(&format!("  {name:<22} {value}\n"));
    }
    out
}

fn verified_json(v: &VerifiedEvent, key: &NoteVerifier) -> serde_json::Value {
    let mut event = serde_json::Map::new();
    for (name, value) in leaf_fields(&v.leaf) {
        event.insert(name.into(), value.into());
    }
    event.insert("leaf_index".into(), v.leaf.leaf_index.into());
    event.insert("occurred_at_us".into(), v.leaf.occurred_at_us.into());
    event.insert("personal_data".into(), v.leaf.personal_data.into());
    event.insert(
        "pseudonym_key_version".into(),
        v.leaf.pseudonym_key_version.into(),
    );
    serde_json::json!({
        "valid": true,
        "key": key.to_string(),
        "checkpoint": {
            "origin": v.checkpoint.origin,
            "size": v.checkpoint.size,
            "root": B64.encode(v.checkpoint.root),
        },
        "event": event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: AuditCommand,
    }

    #[test]
    fn arguments_parse() {
        let c = Cli::try_parse_from([
            "audit",
            "verify",
            "--tenant",
            "acme",
            "--trusted-checkpoint",
            "a.cp",
            "--trusted-checkpoint",
            "b.cp",
            "--json",
        ])
        .unwrap();
        let AuditCommand::Verify {
            tenant,
            trusted_checkpoints,
            json,
            ..
        } = c.command
        else {
            panic!("{c:?}")
        };
        assert_eq!(tenant.as_deref(), Some("acme"));
        assert_eq!(trusted_checkpoints.len(), 2);
        assert!(json);
        assert!(Cli::try_parse_from(["audit", "prove", "not-a-uuid"]).is_err());
        assert!(Cli::try_parse_from(["audit", "verify-proof", "f"]).is_err());
    }

    #[test]
    fn verify_proof_exit_codes() {
        let dir = std::env::temp_dir().join(format!("tally-audit-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (signer, _, text) = crate::audit::tlog_proof::tests::fixture();
        let key = signer.verifier().to_string();
        let good = dir.join("good.tlog-proof");
        std::fs::write(&good, &text).unwrap();
        assert_eq!(verify_proof(&good, &key, false).unwrap(), EXIT_OK);
        let bad = dir.join("bad.tlog-proof");
        std::fs::write(&bad, text.replacen("index 5", "index 4", 1)).unwrap();
        assert_eq!(verify_proof(&bad, &key, true).unwrap(), EXIT_TAMPERED);
        assert!(matches!(
            verify_proof(&good, "nonsense", false),
            Err(Fail::Usage(_))
        ));
        assert!(matches!(
            verify_proof(&dir.join("absent"), &key, false),
            Err(Fail::Error(_))
        ));
        let v = verify_event_proof(text.as_bytes(), &signer.verifier()).unwrap();
        let t = verified_text(&v, &signer.verifier());
        assert!(t.starts_with("VALID: event 0190a6f2-7c3e-7b1a-9d2e-3f4a5b6c7d8e is leaf 5"));
        assert!(t.contains("2024-06-10T06:13:20.123456Z"), "{t}");
        assert_eq!(
            verified_json(&v, &signer.verifier())["event"]["leaf_index"],
            5
        );
    }

    #[test]
    fn keygen_refuses_bad_names() {
        assert!(matches!(keygen("has space"), Err(Fail::Usage(_))));
        assert!(matches!(keygen("a+b"), Err(Fail::Usage(_))));
    }
}
