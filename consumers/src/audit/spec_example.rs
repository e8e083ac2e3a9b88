//! The worked example of `docs/audit-log.md`, checked both ways (test-only).
//!
//! Guarantee: the leaf bytes and leaf hash printed in the documentation are the ones
//! this code computes, and `scripts/audit_leaf.py` (written from the documentation,
//! Python standard library only) recomputes the same leaf hashes and tree root from
//! JSON rows shaped like `audit_events`.

use super::leaf::{tests::example, AuditLeaf};
use super::merkle::root;
use super::pseudonym::{to_hex, PseudonymKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn documentation_shows_the_computed_example() {
    let leaf = example();
    let key = PseudonymKey::new(1, &[b'k'; 32]).unwrap();
    assert_eq!(leaf.user_id, key.pseudonym("alice"));
    assert_eq!(leaf.actor_id, key.pseudonym("alice"));
    assert_eq!(leaf.ip, key.pseudonym("192.0.2.10"));
    let bytes = to_hex(&leaf.encode());
    let hash = to_hex(&leaf.leaf_hash());
    println!(
        "leaf bytes ({}): {bytes}\nleaf hash: {hash}",
        leaf.encoded_len()
    );
    let doc = std::fs::read_to_string(repo_root().join("docs/audit-log.md")).unwrap();
    let doc_hex: String = doc
        .split("<!-- example-bytes -->")
        .nth(1)
        .expect("docs/audit-log.md has an example-bytes block")
        .split("```")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(doc_hex, bytes, "docs/audit-log.md example bytes are stale");
    assert!(
        doc.contains(&hash),
        "docs/audit-log.md lacks the example leaf hash {hash}"
    );
}

/// The example proof file and verifier key of the documentation are the ones computed
/// (Ed25519 signatures are deterministic, so the bytes are stable).
#[test]
fn documentation_shows_the_computed_proof_file() {
    let (signer, _, proof) = super::tlog_proof::tests::fixture();
    let key = signer.verifier().to_string();
    println!("verifier key: {key}\n{proof}");
    let doc = std::fs::read_to_string(repo_root().join("docs/audit-log.md")).unwrap();
    assert!(
        doc.contains(&key),
        "docs/audit-log.md lacks the example verifier key {key}"
    );
    let private = signer.to_key_string();
    assert!(
        doc.contains(&private),
        "docs/audit-log.md lacks the example key {private}"
    );
    assert!(
        doc.contains(&proof),
        "docs/audit-log.md example proof file is stale:\n{proof}"
    );
}

fn json_row(l: &AuditLeaf) -> serde_json::Value {
    serde_json::json!({
        "tenant_id": l.tenant_id, "leaf_index": l.leaf_index.to_string(),
        "event_id": l.event_id.to_string(), "occurred_at_us": l.occurred_at_us,
        "team_id": l.team_id, "project_id": l.project_id, "user_id": l.user_id,
        "source": l.source, "actor_type": l.actor_type, "actor_id": l.actor_id,
        "action": l.action, "resource_type": l.resource_type, "resource_id": l.resource_id,
        "outcome": l.outcome, "ip": l.ip, "user_agent": l.user_agent, "details": l.details,
        "personal_data": u8::from(l.personal_data),
        "pseudonym_key_version": l.pseudonym_key_version,
        "batch_id": "17",
    })
}

/// Runs python3 (present on every CI image tally supports); fails if it is missing.
#[test]
fn python_script_recomputes_leaf_hashes_and_root() {
    let rows: Vec<AuditLeaf> = (0..11u64)
        .map(|i| AuditLeaf {
            leaf_index: i,
            occurred_at_us: -5 + i as i64,
            details: format!("{{\"n\":{i},\"ü\":\"\\u00fc\"}}"),
            personal_data: i % 2 == 0,
            ..example()
        })
        .rev() // the script sorts by leaf_index
        .collect();
    let input: String = rows.iter().map(|r| format!("{}\n", json_row(r))).collect();
    let mut child = Command::new("python3")
        .arg(repo_root().join("scripts/audit_leaf.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 must be installed to check scripts/audit_leaf.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "audit_leaf.py failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut sorted = rows;
    sorted.sort_by_key(|r| r.leaf_index);
    let hashes: Vec<_> = sorted.iter().map(AuditLeaf::leaf_hash).collect();
    let mut want: String = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| format!("{i} {}\n", to_hex(h)))
        .collect();
    want.push_str(&format!("root 11 {}\n", B64.encode(root(&hashes))));
    assert_eq!(text, want);
}
