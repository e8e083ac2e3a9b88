//! `tally audit verify`: every tenant's stored rows against its signed checkpoints.
//!
//! Guarantee: a tenant is reported OK only if every checkpoint row stored for it opens
//! with the verifier key for the tenant's origin (and matches its `tree_size` / `root`
//! columns), every row is a valid leaf, and `audit::verify::TreeVerifier` finds the
//! rows in `0..end` intact against all those checkpoints and the trusted checkpoint
//! files of the tenant; `end` covers every signed leaf. Otherwise it names the first
//! bad leaf index and the tamper kind, and each rejected checkpoint with its reason.
//! Rows are streamed (one page at a time) and hashed once; only O(log n) hashes stay.

use super::{connect, verifier_key, Fail, EXIT_OK, EXIT_TAMPERED};
use crate::audit::checkpoint::{open_checkpoint, origin_for, Checkpoint, CheckpointError};
use crate::audit::merkle::Hash;
use crate::audit::note::{Note, NoteError, NoteVerifier};
use crate::audit::verify::{Tamper, TreeVerifier, Verdict};
use crate::config::Config;
use crate::streams::audit::store::{self, InvalidRow, LeafStream, StoredCheckpoint, TenantRows};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Rows converted before they are hashed as one timed chunk.
const HASH_CHUNK: usize = 4096;

pub(super) struct VerifyArgs {
    pub tenant: Option<String>,
    pub trusted: Vec<PathBuf>,
    pub public_key: Option<String>,
    pub json: bool,
}

/// The name of a tamper kind in reports (stable: scripts match on it).
pub(super) fn tamper_kind(t: &Tamper) -> &'static str {
    match t {
        Tamper::Missing { .. } => "missing",
        Tamper::Duplicate => "duplicate",
        Tamper::ForeignTenant { .. } => "foreign_tenant",
        Tamper::LeafMismatch => "leaf_mismatch",
        Tamper::RootMismatch { .. } => "root_mismatch",
        Tamper::Truncated { .. } => "truncated",
        Tamper::ForkedCheckpoints { .. } => "forked_checkpoints",
    }
}

/// A checkpoint row that could not be used as is.
struct CheckpointProblem {
    checkpoint_id: i64,
    tree_size: i64,
    reason: &'static str,
    detail: String,
}

/// What is wrong with a tenant's rows.
enum Finding {
    Tree { first_bad: u64, tamper: Tamper },
    InvalidRow { leaf_index: u64, error: InvalidRow },
}

struct TenantReport {
    tenant: String,
    rows: u64,
    /// Rows hashed until the verdict (all of `0..end` when intact).
    hashed: u64,
    /// Rows at or past `end` (batches not merged into the committed tree yet).
    unverified_rows: u64,
    stored_checkpoints: usize,
    trusted_checkpoints: usize,
    latest: Option<(i64, i64)>,
    /// The largest size signed by a usable (stored or trusted) checkpoint.
    signed_size: u64,
    root: Option<Hash>,
    finding: Option<Finding>,
    /// Which checkpoint(s) sign each size, for messages.
    labels: BTreeMap<u64, Vec<String>>,
    problems: Vec<CheckpointProblem>,
}

impl TenantReport {
    fn tampered(&self) -> bool {
        self.finding.is_some() || !self.problems.is_empty()
    }

    fn label(&self, size: u64) -> String {
        self.labels
            .get(&size)
            .map(|l| l.join(" and "))
            .unwrap_or_else(|| format!("the checkpoint of size {size}"))
    }

    /// (first bad index, kind, description) of the finding, if any.
    fn finding_text(&self) -> Option<(Option<u64>, &'static str, String)> {
        match &self.finding {
            Some(Finding::Tree { first_bad, tamper }) => {
                let b = *first_bad;
                let detail = match tamper {
                    Tamper::Missing { found } => {
                        format!("leaf {b} is missing (the next stored row is leaf {found})")
                    }
                    Tamper::Duplicate => {
                        format!("a second row with leaf index {b} (a forged, copied or moved row)")
                    }
                    Tamper::ForeignTenant { tenant } => {
                        format!("leaf {b} is a row of tenant {tenant:?}")
                    }
                    Tamper::LeafMismatch => format!("leaf {b} differs from its reference hash"),
                    Tamper::RootMismatch { checkpoint_size: s } => format!(
                        "the first {s} leaves do not hash to the root signed by {}: a row in \
                         {b}..{s} was changed, replaced or reordered",
                        self.label(*s)
                    ),
                    Tamper::Truncated { signed_size: s } => format!(
                        "the rows from leaf {b} on are missing: {} signs {s} leaves",
                        self.label(*s)
                    ),
                    Tamper::ForkedCheckpoints { size } => format!(
                        "{} sign different roots for {size} leaves (a forked log)",
                        self.label(*size)
                    ),
                };
                Some((Some(b), tamper_kind(tamper), detail))
            }
            Some(Finding::InvalidRow { leaf_index, error }) => Some((
                Some(*leaf_index),
                "invalid_row",
                format!("the row of leaf {leaf_index} is not a valid leaf: {error}"),
            )),
            None if !self.problems.is_empty() => Some((
                None,
                "bad_checkpoint",
                format!("{} stored checkpoint(s) rejected", self.problems.len()),
            )),
            None => None,
        }
    }
}

/// Hashing work and wall time across tenants.
#[derive(Default)]
struct Meter {
    leaves: u64,
    hashing: Duration,
}

/// `n` per second of `d`, in integers.
fn per_second(n: u64, d: Duration) -> u64 {
    let nanos = d.as_nanos().max(1);
    u64::try_from(u128::from(n) * 1_000_000_000 / nanos).unwrap_or(u64::MAX)
}

/// The tenant whose log has `origin` under key `name` (the inverse of `origin_for`).
fn tenant_of_origin(name: &str, origin: &str) -> Option<String> {
    let enc = origin.strip_prefix(name)?.strip_prefix('/')?;
    let mut bytes = Vec::with_capacity(enc.len());
    let mut it = enc.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    let tenant = String::from_utf8(bytes).ok()?;
    (origin_for(name, &tenant) == origin).then_some(tenant)
}

/// A trusted checkpoint file: signed by `key`, for a tenant log of `key`.
fn load_trusted(path: &PathBuf, key: &NoteVerifier) -> Result<(String, Checkpoint), Fail> {
    let bytes = std::fs::read(path)
        .map_err(|e| Fail::Usage(format!("trusted checkpoint {}: {e}", path.display())))?;
    let (cp, _) = open_checkpoint(&bytes, std::slice::from_ref(key), None)
        .map_err(|e| Fail::Usage(format!("trusted checkpoint {}: {e}", path.display())))?;
    let tenant = tenant_of_origin(key.name(), &cp.origin).ok_or_else(|| {
        Fail::Usage(format!(
            "trusted checkpoint {}: origin {:?} is not a tenant log of key {}",
            path.display(),
            cp.origin,
            key.name()
        ))
    })?;
    Ok((tenant, cp))
}

/// Why a stored checkpoint row was refused: (reason, detail).
fn rejection(note: &str, e: &CheckpointError, key: &NoteVerifier) -> (&'static str, String) {
    match e {
        CheckpointError::Note(NoteError::NoKnownSignature) => {
            let signers = Note::parse(note.as_bytes())
                .map(|n| {
                    n.signatures
                        .iter()
                        .map(|s| format!("{}+{:08x}", s.name, s.key_id))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            (
                "signed_by_another_key",
                format!(
                    "signed by another key ({signers}), not by {}+{:08x}",
                    key.name(),
                    key.key_id()
                ),
            )
        }
        CheckpointError::Note(NoteError::BadSignature(k)) => (
            "bad_signature",
            format!("the signature of {k} does not verify: the signed text was changed"),
        ),
        CheckpointError::OriginMismatch { want, got } => (
            "wrong_origin",
            format!("origin {got:?} is not this tenant's {want:?}"),
        ),
        other => ("malformed_checkpoint", other.to_string()),
    }
}

/// Open the stored checkpoints of a tenant: the usable ones and the problems.
fn open_stored(
    stored: &[StoredCheckpoint],
    key: &NoteVerifier,
    origin: &str,
    report: &mut TenantReport,
) -> Vec<Checkpoint> {
    let mut usable = Vec::new();
    for sc in stored {
        let mut problem = |reason, detail| {
            report.problems.push(CheckpointProblem {
                checkpoint_id: sc.checkpoint_id,
                tree_size: sc.tree_size,
                reason,
                detail,
            })
        };
        match open_checkpoint(
            sc.signed_note.as_bytes(),
            std::slice::from_ref(key),
            Some(origin),
        ) {
            Ok((cp, _)) => {
                if i64::try_from(cp.size) != Ok(sc.tree_size) || sc.root != cp.root {
                    problem(
                        "columns_mismatch",
                        format!(
                            "the tree_size/root columns ({}, {}) are not the signed ({}, {})",
                            sc.tree_size,
                            B64.encode(&sc.root),
                            cp.size,
                            B64.encode(cp.root)
                        ),
                    );
                }
                report
                    .labels
                    .entry(cp.size)
                    .or_default()
                    .push(format!("checkpoint {}", sc.checkpoint_id));
                usable.push(cp);
            }
            Err(e) => {
                let (reason, detail) = rejection(&sc.signed_note, &e, key);
                problem(reason, detail);
            }
        }
    }
    usable
}

async fn verify_tenant(
    client: &clickhouse::Client,
    pool: &sqlx::PgPool,
    key: &NoteVerifier,
    stats: &TenantRows,
    trusted: &[(PathBuf, String, Checkpoint)],
    meter: &mut Meter,
) -> Result<TenantReport, Fail> {
    let tenant = stats.tenant_id.as_str();
    let stored = store::checkpoints(pool, tenant).await?;
    let mut report = TenantReport {
        tenant: tenant.to_string(),
        rows: stats.rows,
        hashed: 0,
        unverified_rows: 0,
        stored_checkpoints: stored.len(),
        trusted_checkpoints: 0,
        latest: stored.last().map(|c| (c.checkpoint_id, c.tree_size)),
        signed_size: 0,
        root: None,
        finding: None,
        labels: BTreeMap::new(),
        problems: Vec::new(),
    };
    let mut usable = open_stored(&stored, key, &origin_for(key.name(), tenant), &mut report);
    for (path, _, cp) in trusted.iter().filter(|(_, t, _)| t == tenant) {
        report
            .labels
            .entry(cp.size)
            .or_default()
            .push(format!("trusted checkpoint {}", path.display()));
        report.trusted_checkpoints += 1;
        usable.push(cp.clone());
    }
    let signed = usable.iter().map(|c| c.size).max().unwrap_or(0);
    report.signed_size = signed;
    // Rows at or past the committed tree may be batches in flight: not checked.
    let end = match store::committed_size(pool, tenant).await? {
        Some(committed) => committed,
        None if stats.rows == 0 => 0,
        None => stats.max_leaf_index.saturating_add(1),
    }
    .max(signed);

    let mut verifier = TreeVerifier::new(tenant, &usable);
    let mut stream = LeafStream::new(client, tenant, 0, end);
    let mut chunk = Vec::with_capacity(HASH_CHUNK);
    loop {
        let row = stream.next().await?;
        let done = row.is_none();
        if let Some(r) = row {
            let leaf_index = r.leaf_index;
            match r.into_leaf() {
                Ok(l) => chunk.push(l),
                Err(error) => report.finding = Some(Finding::InvalidRow { leaf_index, error }),
            }
        }
        if done || chunk.len() == HASH_CHUNK || report.finding.is_some() {
            let started = Instant::now();
            for l in &chunk {
                verifier.push(l, None);
                report.hashed += 1;
                if verifier.is_tampered() {
                    break;
                }
            }
            meter.hashing += started.elapsed();
            chunk.clear();
            if done || verifier.is_tampered() || report.finding.is_some() {
                break;
            }
        }
    }
    meter.leaves += report.hashed;
    // An invalid row stopped the reading: it is the finding unless the tree already
    // went wrong before it (the verifier would otherwise call the unread rest missing).
    if report.finding.is_some() && !verifier.is_tampered() {
        return Ok(report);
    }
    match verifier.finish() {
        Verdict::Tampered { first_bad, tamper } => {
            report.finding = Some(Finding::Tree { first_bad, tamper });
        }
        Verdict::Intact { size, root, .. } => {
            report.root = Some(root);
            report.unverified_rows = stats.rows.saturating_sub(size);
        }
    }
    Ok(report)
}

pub(super) async fn verify(cfg: &Config, args: &VerifyArgs) -> Result<i32, Fail> {
    let key = verifier_key(cfg, args.public_key.as_deref())?;
    let mut trusted = Vec::new();
    for path in &args.trusted {
        let (tenant, cp) = load_trusted(path, &key)?;
        if args.tenant.as_ref().is_some_and(|t| *t != tenant) {
            return Err(Fail::Usage(format!(
                "trusted checkpoint {} is for tenant {tenant:?}, not --tenant {:?}",
                path.display(),
                args.tenant.as_deref().unwrap_or_default()
            )));
        }
        trusted.push((path.clone(), tenant, cp));
    }
    let started = Instant::now();
    let (client, pool) = connect(cfg).await?;
    let mut tenants: BTreeMap<String, TenantRows> = BTreeMap::new();
    let absent = |t: &str| TenantRows {
        tenant_id: t.to_string(),
        rows: 0,
        max_leaf_index: 0,
    };
    match &args.tenant {
        Some(t) => {
            let stats = store::tenant_rows(&client, t).await?;
            let nothing = stats.rows == 0
                && trusted.is_empty()
                && store::latest_checkpoint(&pool, t).await?.is_none();
            if nothing {
                // Most likely a mistyped tenant: an OK would mislead.
                return Err(Fail::Error(format!(
                    "tenant {t:?} has no rows in audit_events (database {}) and no checkpoints",
                    cfg.clickhouse.database
                )));
            }
            tenants.insert(t.clone(), stats);
        }
        None => {
            for s in store::tenants(&client).await? {
                tenants.insert(s.tenant_id.clone(), s);
            }
            let others = store::checkpoint_tenants(&pool).await?;
            for t in others.iter().chain(trusted.iter().map(|(_, t, _)| t)) {
                tenants.entry(t.clone()).or_insert_with(|| absent(t));
            }
        }
    }
    let mut meter = Meter::default();
    let mut reports = Vec::new();
    for stats in tenants.values() {
        let r = verify_tenant(&client, &pool, &key, stats, &trusted, &mut meter).await?;
        if !args.json {
            print!("{}", tenant_text(&r));
        }
        reports.push(r);
    }
    let elapsed = started.elapsed();
    let tampered = reports.iter().filter(|r| r.tampered()).count();
    if args.json {
        println!(
            "{}",
            summary_json(&key, &reports, &meter, elapsed, &cfg.clickhouse.database)
        );
    } else {
        print!("{}", summary_text(&reports, &meter, elapsed));
    }
    Ok(if tampered > 0 { EXIT_TAMPERED } else { EXIT_OK })
}

fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn tenant_text(r: &TenantReport) -> String {
    let latest = r
        .latest
        .map(|(id, size)| format!("latest checkpoint {id} of size {size}"))
        .unwrap_or_else(|| "no checkpoint".into());
    let counts = format!(
        "{} rows, {latest}; {} stored and {} trusted checkpoint(s)",
        r.rows, r.stored_checkpoints, r.trusted_checkpoints
    );
    let mut out = match r.finding_text() {
        None => {
            let mut notes = String::new();
            let root = r.root.map(|h| B64.encode(h)).unwrap_or_default();
            let size = r.rows.saturating_sub(r.unverified_rows);
            if r.stored_checkpoints + r.trusted_checkpoints == 0 {
                notes.push_str("; nothing signed yet: only the leaf sequence was checked");
            } else if size > r.signed_size {
                notes.push_str(&format!(
                    "; leaves {}..{size} are not signed yet",
                    r.signed_size
                ));
            }
            if r.unverified_rows > 0 {
                notes.push_str(&format!(
                    "; {} rows past the committed tree not checked",
                    r.unverified_rows
                ));
            }
            format!(
                "tenant {:?}: OK: {size} leaves verified, root {root}; {counts}{notes}\n",
                r.tenant
            )
        }
        Some((first_bad, kind, detail)) => {
            let at = first_bad
                .map(|b| format!(" at leaf {b}"))
                .unwrap_or_default();
            format!(
                "tenant {:?}: TAMPERED{at}: {kind}: {detail}; {counts}\n",
                r.tenant
            )
        }
    };
    for p in &r.problems {
        out.push_str(&format!(
            "  checkpoint {} (size {}) rejected: {}: {}\n",
            p.checkpoint_id, p.tree_size, p.reason, p.detail
        ));
    }
    out
}

fn summary_text(reports: &[TenantReport], meter: &Meter, elapsed: Duration) -> String {
    let tampered = reports.iter().filter(|r| r.tampered()).count();
    let verdict = if reports.is_empty() {
        "no audit rows and no checkpoints".to_string()
    } else if tampered == 0 {
        format!("{} tenant(s) intact", reports.len())
    } else {
        format!("{tampered} of {} tenant(s) TAMPERED", reports.len())
    };
    format!(
        "{verdict}\nhashed {} leaves in {:.3} s: {} leaves/s (encode + leaf hash + tree); \
         {:.3} s in all with reading: {} leaves/s ({} build)\n",
        meter.leaves,
        meter.hashing.as_secs_f64(),
        per_second(meter.leaves, meter.hashing),
        elapsed.as_secs_f64(),
        per_second(meter.leaves, elapsed),
        build()
    )
}

fn tenant_json(r: &TenantReport) -> serde_json::Value {
    let (first_bad, tamper, detail) = match r.finding_text() {
        Some((b, k, d)) => (b, Some(k), Some(d)),
        None => (None, None, None),
    };
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "checkpoint_id": p.checkpoint_id,
                "tree_size": p.tree_size,
                "reason": p.reason,
                "detail": p.detail,
            })
        })
        .collect();
    serde_json::json!({
        "tenant": r.tenant,
        "status": if r.tampered() { "tampered" } else { "ok" },
        "rows": r.rows,
        "hashed": r.hashed,
        "unverified_rows": r.unverified_rows,
        "stored_checkpoints": r.stored_checkpoints,
        "trusted_checkpoints": r.trusted_checkpoints,
        "latest_checkpoint": r.latest.map(|(id, size)| serde_json::json!({
            "checkpoint_id": id,
            "tree_size": size,
        })),
        "signed_size": r.signed_size,
        "root": r.root.map(|h| B64.encode(h)),
        "first_bad": first_bad,
        "tamper": tamper,
        "detail": detail,
        "checkpoint_problems": problems,
    })
}

fn summary_json(
    key: &NoteVerifier,
    reports: &[TenantReport],
    meter: &Meter,
    elapsed: Duration,
    database: &str,
) -> serde_json::Value {
    let tampered = reports.iter().filter(|r| r.tampered()).count();
    serde_json::json!({
        "key": key.to_string(),
        "clickhouse_database": database,
        "intact": tampered == 0,
        "tampered_tenants": tampered,
        "tenants": reports.iter().map(tenant_json).collect::<Vec<_>>(),
        "leaves_hashed": meter.leaves,
        "hash_seconds": meter.hashing.as_secs_f64(),
        "hash_leaves_per_second": per_second(meter.leaves, meter.hashing),
        "elapsed_seconds": elapsed.as_secs_f64(),
        "leaves_per_second": per_second(meter.leaves, elapsed),
        "build": build(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::note::NoteSigner;

    #[test]
    fn origins_give_back_their_tenant() {
        for t in ["acme", "a b/c+é", "x%y", "-._~"] {
            assert_eq!(
                tenant_of_origin("tally.example/audit", &origin_for("tally.example/audit", t)),
                Some(t.to_string())
            );
        }
        assert_eq!(tenant_of_origin("k", "other/acme"), None);
        assert_eq!(tenant_of_origin("k", "k/a%2fb"), None); // not canonical (lowercase)
        assert_eq!(tenant_of_origin("k", "k/a b"), None);
        assert_eq!(tenant_of_origin("k", "k/%C3"), None); // not UTF-8
        assert_eq!(tenant_of_origin("k", "k/%4"), None);
    }

    #[test]
    fn rejections_name_the_other_key() {
        let ours = NoteSigner::new("tally.example/audit", &[7; 32]).unwrap();
        let theirs = NoteSigner::new("tally.example/audit", &[8; 32]).unwrap();
        let cp = Checkpoint::new("tally.example/audit/acme", 3, [1; 32]).unwrap();
        let note = cp.sign(&theirs).unwrap();
        let err = open_checkpoint(note.as_bytes(), &[ours.verifier()], None).unwrap_err();
        let (reason, detail) = rejection(&note, &err, &ours.verifier());
        assert_eq!(reason, "signed_by_another_key");
        assert!(
            detail.contains(&format!("tally.example/audit+{:08x}", theirs.key_id())),
            "{detail}"
        );
        let altered = cp.sign(&ours).unwrap().replacen("\n3\n", "\n4\n", 1);
        let err = open_checkpoint(altered.as_bytes(), &[ours.verifier()], None).unwrap_err();
        assert_eq!(
            rejection(&altered, &err, &ours.verifier()).0,
            "bad_signature"
        );
    }

    #[test]
    fn rates_are_integers() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000);
        assert_eq!(per_second(0, Duration::ZERO), 0);
        assert_eq!(per_second(3, Duration::ZERO), 3_000_000_000);
    }
}
