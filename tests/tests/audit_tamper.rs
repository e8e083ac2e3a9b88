//! `tally audit` against the real ClickHouse and Postgres: three tenants' logs (rows
//! written with `audit::store`, checkpoints signed with the docs' test key) verify;
//! each tampering of the stored rows or checkpoints is detected by the `tally audit
//! verify` binary and named with its tenant, first bad leaf index and kind, and the
//! log verifies again once the tampering is undone. A proof made by `tally audit prove`
//! verifies offline with `tally audit verify-proof` and one flipped bit breaks it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tally::audit::checkpoint::{origin_for, Checkpoint};
use tally::audit::leaf::{AuditLeaf, FieldLimits};
use tally::audit::merkle::{root, Hash};
use tally::audit::note::NoteSigner;
use tally::audit::pseudonym::PseudonymKey;
use tally::streams::audit::store;
use tally_schemas::{sample_audit_event, ActorType, AuditEvent, Outcome};
use tally_tests::*;
use uuid::Uuid;

/// The test keys of docs/audit-log.md (never use them for anything else).
const SIGNING_KEY: &str =
    "PRIVATE+KEY+tally.example/audit+50f02fb7+AQcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
const PUBLIC_KEY: &str =
    "tally.example/audit+50f02fb7+AepKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs";
const TENANTS: [&str; 3] = ["t-alpha", "t-beta", "t gamma/é"];
const LEAVES: u64 = 200;
const CHECKPOINT_SIZES: [u64; 3] = [50, 120, 200];

/// Event `i` of tenant `t`: the sample event with every field varied.
fn event(t: usize, i: u64) -> AuditEvent {
    let base = sample_audit_event();
    let actor_type = [
        ActorType::User,
        ActorType::Service,
        ActorType::ApiKey,
        ActorType::System,
    ][(i % 4) as usize];
    let outcome = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Denied,
        Outcome::Partial,
        Outcome::Pending,
    ][(i % 5) as usize];
    AuditEvent {
        event_id: Uuid::from_u128(((t as u128 + 1) << 96) | u128::from(i)),
        occurred_at: base.occurred_at
            + chrono::Duration::microseconds(i64::try_from(i).unwrap() * 1_000_123),
        tenant_id: TENANTS[t].into(),
        team_id: (!i.is_multiple_of(3)).then(|| format!("team-{}", i % 7)),
        project_id: (i.is_multiple_of(2)).then(|| format!("proj-{}", i % 5)),
        user_id: (i % 4 != 1).then(|| format!("user-{}", i % 11)),
        actor_type,
        actor_id: format!("actor-{}", i % 13),
        action: format!("resource.action{}", i % 9),
        resource_id: format!("res-{i}"),
        outcome,
        ip: (!i.is_multiple_of(5)).then(|| format!("192.0.2.{}", i % 250)),
        user_agent: (!i.is_multiple_of(6)).then(|| format!("agent/{i} (é)")),
        details: format!(r#"{{"i":{i},"note":"ü"}}"#),
        personal_data: i.is_multiple_of(3),
        ..base
    }
}

struct Log {
    env: TestEnv,
    signer: NoteSigner,
    leaves: Vec<Vec<AuditLeaf>>,
    dir: PathBuf,
}

fn leaf_hashes(leaves: &[AuditLeaf]) -> Vec<Hash> {
    leaves.iter().map(AuditLeaf::leaf_hash).collect()
}

/// A signed checkpoint of the first `size` leaves.
fn signed(
    signer: &NoteSigner,
    tenant: &str,
    leaves: &[AuditLeaf],
    size: u64,
) -> (Checkpoint, String) {
    let cp = Checkpoint::new(
        &origin_for(signer.name(), tenant),
        size,
        root(&leaf_hashes(&leaves[..size as usize])),
    )
    .unwrap();
    let note = cp.sign(signer).unwrap();
    (cp, note)
}

/// A SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Log {
    async fn build() -> anyhow::Result<Self> {
        let env = test_env(
            "audit_tamper",
            1,
            &[("TALLY__AUDIT__SIGNING_KEY", SIGNING_KEY)],
        )
        .await?;
        let client = store::clickhouse_client(&env.cfg.clickhouse);
        let signer = NoteSigner::from_key_string(SIGNING_KEY)?;
        let key = PseudonymKey::new(1, &[b'k'; 32])?;
        let mut leaves = Vec::new();
        for (t, tenant) in TENANTS.iter().enumerate() {
            let tl: Vec<AuditLeaf> = (0..LEAVES)
                .map(|i| AuditLeaf::from_event(&event(t, i), i, &key, FieldLimits::default()))
                .collect();
            // Three batches, as a stream would write them.
            for (b, part) in [&tl[..70], &tl[70..150], &tl[150..]].iter().enumerate() {
                store::insert_rows(&client, &store::rows(part, 10 * t as u64 + b as u64)).await?;
            }
            for size in CHECKPOINT_SIZES {
                let (cp, note) = signed(&signer, tenant, &tl, size);
                store::insert_checkpoint(&env.pool, tenant, &cp, &note).await?;
            }
            leaves.push(tl);
        }
        let dir = repo_root()
            .join(".local/audit_tamper")
            .join(std::process::id().to_string());
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            env,
            signer,
            leaves,
            dir,
        })
    }

    fn table(&self) -> String {
        format!("{}.audit_events", self.env.cfg.clickhouse.database)
    }

    /// Runs `tally <args>` in the test's namespace: (exit code, stdout, stderr).
    fn tally(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        self.tally_env(args, &[])
    }

    fn tally_env(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<(i32, String, String)> {
        let mut cmd = Command::new(tally_binary()?);
        cmd.args(args);
        for (k, v) in &self.env.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `tally audit verify --json [args]`: (exit code, report).
    fn verify_json(&self, args: &[&str]) -> anyhow::Result<(i32, Value)> {
        let mut all = vec!["audit", "verify", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.tally(&all)?;
        let doc: Value = serde_json::from_str(&out)
            .map_err(|e| anyhow::anyhow!("verify --json printed no JSON ({e}): {out}\n{err}"))?;
        Ok((code, doc))
    }

    /// Verify passes for every tenant (and prints the text report once).
    fn expect_intact(&self, args: &[&str]) -> anyhow::Result<Value> {
        let (code, doc) = self.verify_json(args)?;
        assert_eq!(code, 0, "verify should pass: {doc:#}");
        assert_eq!(doc["intact"], true);
        for t in doc["tenants"].as_array().unwrap() {
            assert_eq!(t["status"], "ok", "{t:#}");
        }
        Ok(doc)
    }

    /// Verify exits 3 naming `tenant` (only) with `kind` at `first_bad`; returns its
    /// JSON entry. The text report says the same.
    fn expect_tampered(
        &self,
        tenant: &str,
        first_bad: Option<u64>,
        kind: &str,
        args: &[&str],
    ) -> anyhow::Result<Value> {
        let (code, doc) = self.verify_json(args)?;
        assert_eq!(code, 3, "verify should find tampering: {doc:#}");
        assert_eq!(doc["intact"], false);
        assert_eq!(doc["tampered_tenants"], 1, "{doc:#}");
        let mut found = None;
        for t in doc["tenants"].as_array().unwrap() {
            if t["tenant"] == tenant {
                assert_eq!(t["status"], "tampered", "{t:#}");
                assert_eq!(t["tamper"], kind, "{t:#}");
                assert_eq!(
                    t["first_bad"],
                    first_bad.map_or(Value::Null, Value::from),
                    "{t:#}"
                );
                found = Some(t.clone());
            } else {
                assert_eq!(t["status"], "ok", "{t:#}");
            }
        }
        let mut text_args = vec!["audit", "verify"];
        text_args.extend_from_slice(args);
        let (code, text, err) = self.tally(&text_args)?;
        println!("$ tally {}\n{text}", text_args.join(" "));
        assert_eq!(code, 3, "{text}{err}");
        let at = first_bad
            .map(|b| format!(" at leaf {b}"))
            .unwrap_or_default();
        let line = format!("tenant {tenant:?}: TAMPERED{at}: {kind}: ");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
        assert!(text.contains("1 of 3 tenant(s) TAMPERED"), "{text}");
        Ok(found.expect("the tampered tenant is reported"))
    }

    /// Runs an ALTER ... UPDATE/DELETE mutation and waits until it is done.
    async fn mutate(&self, sql: &str) -> anyhow::Result<()> {
        let url = &self.env.cfg.clickhouse.url;
        ch_query(url, sql).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pending = ch_query(
                url,
                &format!(
                    "SELECT count() FROM system.mutations WHERE database = {} AND table = 'audit_events' AND is_done = 0",
                    lit(&self.env.cfg.clickhouse.database)
                ),
            )
            .await?;
            if pending.trim() == "0" {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "mutation not done after 60 s: {sql}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn delete_rows(&self, t: usize, cond: &str) -> anyhow::Result<()> {
        self.mutate(&format!(
            "ALTER TABLE {} DELETE WHERE tenant_id = {} AND {cond}",
            self.table(),
            lit(TENANTS[t])
        ))
        .await
    }

    async fn insert(&self, leaves: &[AuditLeaf]) -> anyhow::Result<()> {
        let client = store::clickhouse_client(&self.env.cfg.clickhouse);
        Ok(store::insert_rows(&client, &store::rows(leaves, 99)).await?)
    }

    /// The latest checkpoint row of tenant `t`: (checkpoint_id, signed_note).
    async fn latest_checkpoint(&self, t: usize) -> anyhow::Result<(i64, String)> {
        let c = store::latest_checkpoint(&self.env.pool, TENANTS[t])
            .await?
            .expect("a checkpoint");
        Ok((c.checkpoint_id, c.signed_note))
    }

    async fn set_note(&self, checkpoint_id: i64, note: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE tally.audit_checkpoints SET signed_note = $1 WHERE checkpoint_id = $2")
            .bind(note)
            .bind(checkpoint_id)
            .execute(&self.env.pool)
            .await?;
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The report entry of `tenant` in a `verify --json` document.
fn entry<'a>(doc: &'a Value, tenant: &str) -> &'a Value {
    doc["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == tenant)
        .unwrap_or_else(|| panic!("no tenant {tenant:?} in {doc:#}"))
}

/// Flip the lowest of the 6 bits of one base64 character: exactly one bit of the
/// decoded bytes changes (for a character that is not the last before padding).
fn flip_bit(c: char) -> char {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let i = ALPHABET
        .iter()
        .position(|&a| a as char == c)
        .expect("base64");
    ALPHABET[i ^ 1] as char
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected_and_named_then_verify_passes_again() -> anyhow::Result<()> {
    let log = Log::build().await?;
    let (code, text, err) = log.tally(&["audit", "verify"])?;
    println!("{text}{err}");
    assert_eq!(code, 0, "{text}{err}");
    for t in TENANTS {
        assert!(
            text.contains(&format!("tenant {t:?}: OK: 200 leaves verified")),
            "{text}"
        );
    }
    assert!(text.contains("3 tenant(s) intact"), "{text}");
    let doc = log.expect_intact(&[])?;
    assert_eq!(doc["leaves_hashed"], 600);
    for (t, tenant) in TENANTS.iter().enumerate() {
        let e = entry(&doc, tenant);
        assert_eq!(e["signed_size"], 200);
        assert_eq!(e["stored_checkpoints"], 3);
        assert_eq!(e["rows"], 200);
        // The root verify recomputed is the one the latest checkpoint signs.
        let (_, note) = log.latest_checkpoint(t).await?;
        assert_eq!(e["root"], note.lines().nth(2).unwrap(), "{e:#}");
    }
    log.expect_intact(&["--tenant", TENANTS[2]])?;
    paging(&log).await?;

    // One byte of one column of one row (leaf 130 of t-beta): the first checkpoint
    // covering it (size 200) has another root; the bad leaf is in 120..200.
    let action = &log.leaves[1][130].action;
    let changed = format!("{}{}", &action[..action.len() - 1], "X");
    let update = |value: &str| {
        format!(
            "ALTER TABLE {} UPDATE action = {} WHERE tenant_id = {} AND leaf_index = 130",
            log.table(),
            lit(value),
            lit(TENANTS[1])
        )
    };
    log.mutate(&update(&changed)).await?;
    let t = log.expect_tampered(TENANTS[1], Some(120), "root_mismatch", &[])?;
    assert!(t["detail"].as_str().unwrap().contains("120..200"), "{t:#}");
    log.mutate(&update(action)).await?;
    log.expect_intact(&[])?;

    // A deleted row (leaf 77 of t-alpha).
    log.delete_rows(0, "leaf_index = 77").await?;
    let t = log.expect_tampered(TENANTS[0], Some(77), "missing", &[])?;
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("next stored row is leaf 78"),
        "{t:#}"
    );
    log.insert(&log.leaves[0][77..78]).await?;
    log.expect_intact(&[])?;

    // A forged row at an existing index (150 of "t gamma/é").
    let forged = AuditLeaf {
        event_id: Uuid::from_u128(0xf0f0),
        action: "role.grant".into(),
        ..log.leaves[2][150].clone()
    };
    log.insert(std::slice::from_ref(&forged)).await?;
    log.expect_tampered(TENANTS[2], Some(150), "duplicate", &[])?;
    let delete_forged = format!("event_id = toUUID('{}')", forged.event_id);
    log.delete_rows(2, &delete_forged).await?;
    log.expect_intact(&[])?;
    // A forged row past the last checkpoint is not signed yet: reported, not tampering.
    let appended = AuditLeaf {
        leaf_index: LEAVES,
        ..forged.clone()
    };
    log.insert(std::slice::from_ref(&appended)).await?;
    let (code, text, _) = log.tally(&["audit", "verify", "--tenant", TENANTS[2]])?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("leaves 200..201 are not signed yet"),
        "{text}"
    );
    // ... and `prove` says it is not covered yet (exit 4).
    let (code, out, err) = log.tally(&["audit", "prove", &forged.event_id.to_string()])?;
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("not covered yet"), "{err}");
    log.delete_rows(2, &delete_forged).await?;

    // Two rows swapped (their leaf_index values exchanged, 60 and 61 of t-alpha).
    let swap = format!(
        "ALTER TABLE {} UPDATE leaf_index = if(leaf_index = 60, toUInt64(61), toUInt64(60)) \
         WHERE tenant_id = {} AND leaf_index IN (60, 61)",
        log.table(),
        lit(TENANTS[0])
    );
    log.mutate(&swap).await?;
    let t = log.expect_tampered(TENANTS[0], Some(50), "root_mismatch", &[])?;
    assert!(t["detail"].as_str().unwrap().contains("50..120"), "{t:#}");
    log.mutate(&swap).await?;
    log.expect_intact(&[])?;

    // The tail truncated (leaves 180.. of t-beta deleted).
    log.delete_rows(1, "leaf_index >= 180").await?;
    let t = log.expect_tampered(TENANTS[1], Some(180), "truncated", &[])?;
    assert_eq!(t["rows"], 180);
    log.insert(&log.leaves[1][180..]).await?;
    log.expect_intact(&[])?;

    // The latest checkpoint replaced by one signed by another key of the same name
    // (made by `tally audit keygen`).
    let (code, keys, err) = log.tally(&["audit", "keygen", "tally.example/audit"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = keys.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 2, "{keys}");
    let other = NoteSigner::from_key_string(lines[0])?;
    assert_eq!(other.verifier().to_string(), lines[1]);
    assert_ne!(other.key_id(), log.signer.key_id());
    let (id, original) = log.latest_checkpoint(2).await?;
    let (_, impostor) = signed(&other, TENANTS[2], &log.leaves[2], LEAVES);
    log.set_note(id, &impostor).await?;
    let t = log.expect_tampered(TENANTS[2], None, "bad_checkpoint", &[])?;
    let problem = &t["checkpoint_problems"][0];
    assert_eq!(problem["checkpoint_id"], id);
    assert_eq!(problem["reason"], "signed_by_another_key");
    let other_id = format!("tally.example/audit+{:08x}", other.key_id());
    assert!(
        problem["detail"].as_str().unwrap().contains(&other_id),
        "{t:#}"
    );
    let (_, text, _) = log.tally(&["audit", "verify"])?;
    assert!(
        text.contains(&format!(
            "checkpoint {id} (size 200) rejected: signed_by_another_key"
        )),
        "{text}"
    );
    // `prove` refuses to embed it.
    let ev = log.leaves[2][10].event_id.to_string();
    let (code, out, err) = log.tally(&["audit", "prove", &ev])?;
    assert_eq!(code, 3, "{out}{err}");
    // The same log checked with the other key as --public-key: every other checkpoint
    // is refused instead.
    let (code, doc) = log.verify_json(&["--tenant", TENANTS[2], "--public-key", lines[1]])?;
    assert_eq!(code, 3);
    let problems = entry(&doc, TENANTS[2])["checkpoint_problems"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(problems, 2, "{doc:#}");
    log.set_note(id, &original).await?;
    log.expect_intact(&[])?;

    // A trusted checkpoint kept outside the databases: the newest rows of t-alpha are
    // removed together with the checkpoint that signs them. The stored checkpoints
    // alone cannot tell; the trusted copy does.
    let (latest_id, latest_note) = log.latest_checkpoint(0).await?;
    let trusted = log.path("t-alpha-200.checkpoint");
    std::fs::write(&trusted, &latest_note)?;
    log.expect_intact(&["--trusted-checkpoint", s(&trusted)])?;
    log.delete_rows(0, "leaf_index >= 150").await?;
    sqlx::query("DELETE FROM tally.audit_checkpoints WHERE checkpoint_id = $1")
        .bind(latest_id)
        .execute(&log.env.pool)
        .await?;
    let doc = log.expect_intact(&[])?;
    assert_eq!(entry(&doc, TENANTS[0])["signed_size"], 120);
    let t = log.expect_tampered(
        TENANTS[0],
        Some(150),
        "truncated",
        &["--trusted-checkpoint", s(&trusted)],
    )?;
    assert!(
        t["detail"].as_str().unwrap().contains("trusted checkpoint"),
        "{t:#}"
    );
    // A rewrite re-signed with the (stolen) key: the trusted copy's root differs from
    // the re-signed checkpoint of the same size.
    let mut rewritten = log.leaves[0].clone();
    rewritten[10].details = r#"{"i":10,"note":"rewritten"}"#.into();
    log.delete_rows(0, "leaf_index = 10").await?;
    log.insert(&rewritten[10..11]).await?;
    log.insert(&rewritten[150..]).await?;
    sqlx::query("DELETE FROM tally.audit_checkpoints WHERE tenant_id = $1")
        .bind(TENANTS[0])
        .execute(&log.env.pool)
        .await?;
    for size in CHECKPOINT_SIZES {
        let (cp, note) = signed(&log.signer, TENANTS[0], &rewritten, size);
        store::insert_checkpoint(&log.env.pool, TENANTS[0], &cp, &note).await?;
    }
    log.expect_intact(&[])?;
    log.expect_tampered(
        TENANTS[0],
        Some(200),
        "forked_checkpoints",
        &["--trusted-checkpoint", s(&trusted)],
    )?;
    // Undo: the original row and checkpoints.
    log.delete_rows(0, "leaf_index = 10").await?;
    log.insert(&log.leaves[0][10..11]).await?;
    sqlx::query("DELETE FROM tally.audit_checkpoints WHERE tenant_id = $1")
        .bind(TENANTS[0])
        .execute(&log.env.pool)
        .await?;
    for size in CHECKPOINT_SIZES {
        let (cp, note) = signed(&log.signer, TENANTS[0], &log.leaves[0], size);
        store::insert_checkpoint(&log.env.pool, TENANTS[0], &cp, &note).await?;
    }
    log.expect_intact(&["--trusted-checkpoint", s(&trusted)])?;
    // A trusted checkpoint of one tenant with --tenant of another is a usage error.
    let (code, _, err) = log.tally(&[
        "audit",
        "verify",
        "--tenant",
        TENANTS[1],
        "--trusted-checkpoint",
        s(&trusted),
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is for tenant \"t-alpha\""), "{err}");

    // Rows past the committed tree of `tally.audit_trees` belong to batches in flight:
    // counted, not checked.
    sqlx::query(
        "INSERT INTO tally.audit_trees (tenant_id, next_index, tree_size) VALUES ($1, 206, 200)",
    )
    .bind(TENANTS[1])
    .execute(&log.env.pool)
    .await?;
    let in_flight = AuditLeaf {
        leaf_index: 205,
        event_id: Uuid::from_u128(0xf1f1),
        ..log.leaves[1][199].clone()
    };
    log.insert(std::slice::from_ref(&in_flight)).await?;
    let doc = log.expect_intact(&[])?;
    assert_eq!(entry(&doc, TENANTS[1])["unverified_rows"], 1, "{doc:#}");
    let (_, text, _) = log.tally(&["audit", "verify", "--tenant", TENANTS[1]])?;
    assert!(
        text.contains("1 rows past the committed tree not checked"),
        "{text}"
    );
    log.delete_rows(1, "leaf_index = 205").await?;

    prove_round_trip(&log)?;
    errors_have_their_own_exit_codes(&log)?;
    Ok(())
}

/// `prove` writes a proof that `verify-proof` accepts offline; one flipped bit of it
/// is refused.
fn prove_round_trip(log: &Log) -> anyhow::Result<()> {
    let leaf = &log.leaves[2][137];
    let ev = leaf.event_id.to_string();
    let file = log.path("event.tlog-proof");
    let (code, out, err) = log.tally(&["audit", "prove", &ev, "--out", s(&file)])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("leaf 137"), "{out}");
    let text = std::fs::read_to_string(&file)?;
    assert!(text.starts_with("c2sp.org/tlog-proof@v1\nextra "), "{text}");
    assert!(text.contains("\nindex 137\n"), "{text}");
    // The same proof on stdout, and with --tenant.
    let (code, stdout, _) = log.tally(&["audit", "prove", &ev, "--tenant", TENANTS[2]])?;
    assert_eq!(code, 0);
    assert_eq!(stdout, text);

    // Offline: no configuration, no database, no network in the environment.
    let verify_proof = |path: &Path, json: bool| -> anyhow::Result<(i32, String, String)> {
        let mut cmd = Command::new(tally_binary()?);
        cmd.env_clear()
            .args(["audit", "verify-proof", s(path), "--public-key", PUBLIC_KEY]);
        if json {
            cmd.arg("--json");
        }
        let o = cmd.output()?;
        Ok((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    let (code, out, err) = verify_proof(&file, false)?;
    assert_eq!(code, 0, "{out}{err}");
    println!("{out}");
    assert!(
        out.starts_with(&format!(
            "VALID: event {ev} is leaf 137 of tenant \"t gamma/é\""
        )),
        "{out}"
    );
    assert!(out.contains(&leaf.details), "{out}");
    let (code, out, _) = verify_proof(&file, true)?;
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&out)?;
    assert_eq!(doc["event"]["resource_id"], leaf.resource_id.as_str());
    assert_eq!(doc["event"]["user_id"], leaf.user_id.as_str());
    assert_eq!(doc["checkpoint"]["size"], 200);

    // One flipped bit in the first inclusion hash.
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let at = lines.iter().position(|l| l.starts_with("index ")).unwrap() + 1;
    let first = lines[at].chars().next().unwrap();
    lines[at].replace_range(..1, &flip_bit(first).to_string());
    let flipped = log.path("flipped.tlog-proof");
    std::fs::write(&flipped, lines.join("\n"))?;
    let (code, out, err) = verify_proof(&flipped, false)?;
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.starts_with("INVALID: "), "{out}");
    assert!(out.contains("inclusion proof"), "{out}");
    // One flipped bit in the event itself (inside the extra line's base64).
    let flipped_leaf = text.replacen("extra AQ", &format!("extra A{}", flip_bit('Q')), 1);
    std::fs::write(&flipped, flipped_leaf)?;
    let (code, out, _) = verify_proof(&flipped, true)?;
    assert_eq!(code, 3, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out)?["valid"], false);
    // The wrong public key.
    let (code, out, _) = log.tally(&[
        "audit",
        "verify-proof",
        s(&file),
        "--public-key",
        &NoteSigner::new("tally.example/audit", &[9; 32])?
            .verifier()
            .to_string(),
    ])?;
    assert_eq!(code, 3, "{out}");
    Ok(())
}

/// `LeafStream` with tiny pages: every row in index order, duplicates kept across page
/// boundaries, a far gap skipped in one query.
async fn paging(log: &Log) -> anyhow::Result<()> {
    let client = store::clickhouse_client(&log.env.cfg.clickhouse);
    let read = |start: u64, end: u64| {
        let client = client.clone();
        async move {
            let mut stream = store::LeafStream::with_page(&client, TENANTS[0], start, end, 7);
            let mut out = Vec::new();
            while let Some(row) = stream.next().await? {
                out.push(row.to_leaf()?);
            }
            anyhow::Ok(out)
        }
    };
    assert_eq!(read(0, LEAVES).await?, log.leaves[0]);
    assert_eq!(read(13, 29).await?, log.leaves[0][13..29]);
    let far = AuditLeaf {
        leaf_index: 1 << 60,
        event_id: Uuid::from_u128(0xfa4),
        ..log.leaves[0][3].clone()
    };
    let copy = AuditLeaf {
        event_id: Uuid::from_u128(0xc0b1),
        ..log.leaves[0][13].clone()
    };
    log.insert(&[far.clone(), copy.clone()]).await?;
    let all = read(0, u64::MAX).await?;
    assert_eq!(all.len(), 202);
    assert_eq!(all.last(), Some(&far));
    assert!(all.windows(2).all(|w| w[0].leaf_index <= w[1].leaf_index));
    assert_eq!(all.iter().filter(|l| l.leaf_index == 13).count(), 2);
    log.delete_rows(0, "event_id IN (toUUID('00000000-0000-0000-0000-000000000fa4'), toUUID('00000000-0000-0000-0000-00000000c0b1'))")
        .await?;
    assert_eq!(read(0, u64::MAX).await?, log.leaves[0]);
    Ok(())
}

fn errors_have_their_own_exit_codes(log: &Log) -> anyhow::Result<()> {
    // ClickHouse down: an error (1), not a verdict.
    let (code, out, err) = log.tally_env(
        &["audit", "verify"],
        &[("TALLY__CLICKHOUSE__URL", "http://127.0.0.1:1")],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("clickhouse"), "{err}");
    // A bad signing key in the configuration: a configuration error (2).
    let (code, _, err) = log.tally_env(
        &["audit", "verify"],
        &[("TALLY__AUDIT__SIGNING_KEY", "nonsense")],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("audit.signing_key"), "{err}");
    // A tenant with neither rows nor checkpoints (a typo?): an error (1).
    let (code, _, err) = log.tally(&["audit", "verify", "--tenant", "t-nobody"])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no rows in audit_events"), "{err}");
    // An event that is not stored: an error (1).
    let (code, _, err) = log.tally(&["audit", "prove", &Uuid::from_u128(7).to_string()])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not in audit_events"), "{err}");
    Ok(())
}

/// Verify throughput on a bigger log: `AUDIT_TAMPER_LEAVES` leaves (default 300,000)
/// of one tenant. Run with `cargo test -p tally-tests --test audit_tamper -- --ignored
/// --nocapture`; prints what `tally audit verify` reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures throughput; slow"]
async fn verify_throughput() -> anyhow::Result<()> {
    let n: u64 = std::env::var("AUDIT_TAMPER_LEAVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let env = test_env(
        "audit_speed",
        1,
        &[("TALLY__AUDIT__SIGNING_KEY", SIGNING_KEY)],
    )
    .await?;
    let client = store::clickhouse_client(&env.cfg.clickhouse);
    let signer = NoteSigner::from_key_string(SIGNING_KEY)?;
    let key = PseudonymKey::new(1, &[b'k'; 32])?;
    let mut range = tally::audit::merkle::CompactRange::new();
    let mut chunk = Vec::new();
    for i in 0..n {
        let leaf = AuditLeaf::from_event(&event(0, i), i, &key, FieldLimits::default());
        range.push_leaf_hash(leaf.leaf_hash());
        chunk.push(leaf);
        if chunk.len() == 100_000 || i + 1 == n {
            store::insert_rows(&client, &store::rows(&chunk, i)).await?;
            chunk.clear();
        }
    }
    let cp = Checkpoint::new(&origin_for(signer.name(), TENANTS[0]), n, range.root())?;
    store::insert_checkpoint(&env.pool, TENANTS[0], &cp, &cp.sign(&signer)?).await?;
    let mut cmd = Command::new(tally_binary()?);
    cmd.args(["audit", "verify"]);
    for (k, v) in &env.env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    Ok(())
}
