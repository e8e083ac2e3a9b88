//! The claim of dedup keys against a real Postgres, on each of its paths: the
//! binary COPY (no key claimed before), its rollback and fallback to
//! `INSERT ... ON CONFLICT` when a key was claimed before, and the replay of a
//! pending batch. Checked against key sets and rows built here, and by reading
//! `seen_events` back (the COPY's own encoding of every column).

use chrono::{DateTime, TimeZone, Utc};
use std::collections::BTreeSet;
use tally::engine::claim::{ClaimInput, ClaimPath, Claimed, KeyClaim};
use tally::engine::ledger::Ledger;
use tally::engine::ownership::take_epoch;
use tally_tests::test_env;
use uuid::Uuid;

fn keys(n: usize, salt: i64) -> Vec<KeyClaim> {
    // Microsecond timestamps on both sides of Postgres' 2000-01-01 epoch.
    let base = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
    (0..n)
        .map(|i| KeyClaim {
            key: Uuid::new_v4(),
            occurred_at: base + chrono::Duration::microseconds(i as i64 * 1_234_567 + 1),
            fingerprint: (i as i64 + salt).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64),
        })
        .collect()
}

async fn claim(
    ledger: &Ledger,
    partition: i32,
    replay_of: Option<i64>,
    keys: &[KeyClaim],
) -> anyhow::Result<Claimed> {
    let epoch = match replay_of {
        // A replay by the same owner: the epoch it holds.
        Some(_) => sqlx::query_scalar(
            "SELECT epoch FROM tally.partition_owners WHERE group_id = 'g' AND topic = 't' AND partition = $1",
        )
        .bind(partition)
        .fetch_one(ledger.pool())
        .await?,
        None => take_epoch(ledger.pool(), &ledger.partition_key(partition), "claims-test").await?,
    };
    let now = Utc::now();
    let input = ClaimInput {
        partition,
        first: 0,
        last: keys.len() as i64 - 1,
        expected_next: None,
        replay_of,
        epoch,
        reference_version: "test",
        clock_at: now,
        dedup_cutoff: now - chrono::Duration::days(3650 * 3),
        keys,
    };
    Ok(ledger.claim(&input).await?)
}

type SeenRow = (Uuid, DateTime<Utc>, i64, Option<i64>);

async fn seen(ledger: &Ledger) -> anyhow::Result<Vec<SeenRow>> {
    Ok(sqlx::query_as(
        "SELECT event_id, occurred_at, batch_id, fingerprint FROM tally.seen_events ORDER BY event_id",
    )
    .fetch_all(ledger.pool())
    .await?)
}

#[tokio::test]
async fn claims_copy_fall_back_and_replay() -> anyhow::Result<()> {
    let env = test_env("claims", 1, &[]).await?;
    let ledger = Ledger::new(env.pool.clone(), "g", "t");

    // 1. Nothing claimed before: one COPY claims every key, exactly as given.
    let first = keys(1000, 0);
    let c1 = claim(&ledger, 0, None, &first).await?;
    assert_eq!(c1.path, ClaimPath::Copy);
    assert_eq!(c1.owned.len(), 1000);
    assert!(c1.conflicts.is_empty());
    let mut want: Vec<SeenRow> = first
        .iter()
        .map(|k| (k.key, k.occurred_at, c1.batch.batch_id, Some(k.fingerprint)))
        .collect();
    want.sort();
    assert_eq!(
        seen(&ledger).await?,
        want,
        "COPY wrote other values than given"
    );

    // 2. Half of the keys again (another partition: a re-send), 20 of them with
    // other content, plus 500 new ones: the COPY fails on a claimed key, is
    // rolled back, and the fallback claims exactly the new ones.
    let mut again: Vec<KeyClaim> = first[500..].to_vec();
    for k in &mut again[..20] {
        k.fingerprint ^= 1;
    }
    let fresh = keys(500, 7);
    again.extend(fresh.iter().copied());
    let c2 = claim(&ledger, 1, None, &again).await?;
    assert_eq!(c2.path, ClaimPath::CopyThenInsert);
    let fresh_keys: BTreeSet<Uuid> = fresh.iter().map(|k| k.key).collect();
    assert_eq!(
        c2.owned.iter().copied().collect::<BTreeSet<_>>(),
        fresh_keys
    );
    let conflicts: BTreeSet<(Uuid, i64)> = c2.conflicts.iter().map(|(k, p)| (*k, *p)).collect();
    let want_conflicts: BTreeSet<(Uuid, i64)> = first[500..520]
        .iter()
        .map(|k| (k.key, k.fingerprint))
        .collect();
    assert_eq!(
        conflicts, want_conflicts,
        "conflicts carry the stored fingerprint"
    );
    // The rolled-back COPY left nothing behind; the first claims are untouched.
    for k in &fresh {
        want.push((k.key, k.occurred_at, c2.batch.batch_id, Some(k.fingerprint)));
    }
    want.sort();
    assert_eq!(seen(&ledger).await?, want);

    // 3. Right after a fallback, the next 8 claims go straight to INSERT; then COPY again.
    let mut paths = Vec::new();
    for p in 2..=10 {
        let ks = keys(10, i64::from(p) * 100);
        let c = claim(&ledger, p, None, &ks).await?;
        assert_eq!(c.owned.len(), 10);
        paths.push(c.path);
    }
    assert_eq!(paths[..8], [ClaimPath::Insert; 8]);
    assert_eq!(paths[8], ClaimPath::Copy);

    // 4. A replay of the first batch (after a crash) owns its own keys again.
    let c4 = claim(&ledger, 0, Some(c1.batch.batch_id), &first).await?;
    assert_eq!(c4.path, ClaimPath::Insert);
    assert_eq!(c4.batch.batch_id, c1.batch.batch_id);
    assert_eq!(c4.owned.len(), 1000);
    assert!(c4.conflicts.is_empty());
    Ok(())
}
