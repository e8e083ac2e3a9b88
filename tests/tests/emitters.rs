//! The example emitter of docs/emitters.md (`examples/emitters/python/emit.py`, Python
//! standard library only) speaks tally's input contracts: its Avro single-object
//! fingerprints and Parsing Canonical Forms equal tally's, each payload it writes
//! decodes (the OPA one through the OPA mapping), and, sent to the real broker while
//! `tally run` consumes all three streams, every event is counted once (rows in
//! `usage_events`, `policy_decisions` and `audit_events` with the ids it printed) and
//! nothing is dead-lettered.
//!
//! Needs `python3`; the tests skip, saying so, without it. Messages go through
//! `kcat` as the emitter does by default; where kcat is missing or the broker is
//! Tansu (kcat cannot talk to it), the emitter writes its payloads to files
//! (`--out`) and the test produces those bytes itself.

use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tally::streams::policy::opa::{self, OpaMapping};
use tally_schemas::{
    apache_avro::Schema, current_schema_text, parsing_canonical_form, rabin_fingerprint,
    AuditEvent, ComplianceViolation, Decoder, PolicyDecision, UsageEvent,
};
use tally_tests::streams::{produce_to, wait_idle, Kind, Msg};
use tally_tests::*;

fn emitter() -> PathBuf {
    repo_root().join("examples/emitters/python/emit.py")
}

/// Whether `python3` runs; prints why a test is skipped when it does not.
fn have_python(test: &str) -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: python3 is not installed (the example emitter needs it)");
    }
    ok
}

/// Runs the emitter with `args`; returns the JSON lines it printed.
fn run_emitter(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("python3")
        .arg(emitter())
        .args(args)
        .output()
        .context("run emit.py")?;
    if !out.status.success() {
        bail!(
            "emit.py {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("emit.py printed {l:?}")))
        .collect()
}

/// One payload the emitter wrote with `--out`.
struct Written {
    topic: String,
    key: String,
    encoding: String,
    id: String,
    payload: Vec<u8>,
}

fn read_out(dir: &Path) -> anyhow::Result<Vec<Written>> {
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let mut out = Vec::new();
    for m in manifest.as_array().context("manifest is a list")? {
        let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        out.push(Written {
            topic: s("topic"),
            key: s("key"),
            encoding: s("encoding"),
            id: s("id"),
            payload: std::fs::read(dir.join(s("file")))?,
        });
    }
    Ok(out)
}

fn temp_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tally-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn emitter_fingerprints_and_payloads_match_tally() -> anyhow::Result<()> {
    if !have_python("emitter_fingerprints_and_payloads_match_tally") {
        return Ok(());
    }
    for line in run_emitter(&["--print-fingerprints"])? {
        let subject = line["subject"].as_str().context("subject")?;
        let schema = Schema::parse_str(current_schema_text(subject).context("bundled")?)?;
        assert_eq!(
            line["canonical_form"].as_str(),
            Some(parsing_canonical_form(&schema).as_str()),
            "{subject}: Parsing Canonical Form"
        );
        assert_eq!(
            line["fingerprint"].as_str(),
            Some(format!("{:016x}", rabin_fingerprint(&schema)).as_str()),
            "{subject}: fingerprint"
        );
    }
    let dir = temp_dir("emit-decode")?;
    run_emitter(&["--out", &dir.display().to_string(), "--tenant", "t-emit"])?;
    let written = read_out(&dir)?;
    let decoder = Decoder::new();
    let mut encodings = BTreeSet::new();
    for w in &written {
        assert_eq!(w.key, "t-emit", "{}: key", w.encoding);
        encodings.insert((w.topic.clone(), w.encoding.clone()));
        let (id, tenant) = match (w.topic.as_str(), w.encoding.as_str()) {
            (_, "opa-decision-log") => {
                let v = opa::recognise(&w.payload).context("OPA shape")?;
                let d = opa::map_event(&v, &OpaMapping::default())?;
                (d.decision_id, d.tenant_id)
            }
            ("llm.usage.v1", _) => {
                let e: UsageEvent = decoder.decode(&w.payload)?;
                (e.event_id.to_string(), e.tenant_id)
            }
            ("policy.decision.v1", _) => {
                let d: PolicyDecision = decoder.decode(&w.payload)?;
                (d.decision_id, d.tenant_id)
            }
            ("audit.event.v1", _) => {
                let e: AuditEvent = decoder.decode(&w.payload)?;
                (e.event_id.to_string(), e.tenant_id)
            }
            (t, e) => bail!("unexpected message {t} {e}"),
        };
        assert_eq!((id.as_str(), tenant.as_str()), (w.id.as_str(), "t-emit"));
    }
    assert_eq!(encodings.len(), 7, "{encodings:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The contract pages name every dead-letter class tally can write and every field of
/// every schema, so a new class or field cannot go undocumented.
#[test]
fn contract_docs_name_every_class_and_field() -> anyhow::Result<()> {
    let emitters = std::fs::read_to_string(repo_root().join("docs/emitters.md"))?;
    let violations = std::fs::read_to_string(repo_root().join("docs/violations.md"))?;
    let pipeline = ["beyond_dedup_horizon", "future_timestamp", "dedup_conflict"];
    let classes = tally_schemas::DecodeError::CLASSES
        .iter()
        .chain(opa::OpaError::CLASSES.iter())
        .chain(pipeline.iter());
    for class in classes {
        let cell = format!("| `{class}` |");
        assert!(emitters.contains(&cell), "docs/emitters.md lacks {class}");
        assert!(
            violations.contains(&cell) || violations.contains(&format!("(`{class}`")),
            "docs/violations.md lacks {class}"
        );
    }
    for subject in tally_schemas::SUBJECTS {
        let (doc, name) = if subject == "compliance.violation.v1" {
            (&violations, "docs/violations.md")
        } else {
            (&emitters, "docs/emitters.md")
        };
        let avsc: Value = serde_json::from_str(current_schema_text(subject).context("schema")?)?;
        for f in avsc["fields"].as_array().context("fields")? {
            let field = f["name"].as_str().context("name")?;
            assert!(
                doc.contains(&format!("`{field}`")),
                "{name} does not mention {subject} field {field}"
            );
        }
    }
    Ok(())
}

/// Whether the emitter can send by itself: kcat installed and a broker kcat talks to
/// (`TALLY_TEST_NO_KCAT=1` takes the other path on purpose).
fn kcat_usable() -> bool {
    let off = |var: &str, value: &str| std::env::var(var).is_ok_and(|v| v == value);
    let tansu = off("TALLY_BROKER", "tansu") || off("TALLY_TEST_NO_KCAT", "1");
    let kcat = Command::new("kcat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    kcat && !tansu
}

#[tokio::test(flavor = "multi_thread")]
async fn emitted_events_of_every_stream_are_counted_once() -> anyhow::Result<()> {
    if !have_python("emitted_events_of_every_stream_are_counted_once") {
        return Ok(());
    }
    let started = Instant::now();
    let env = test_env(
        "emitters",
        2,
        &[
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__AUDIT", "true"),
        ],
    )
    .await?;
    let c = &env.cfg;
    let topics = [
        "--brokers",
        &c.kafka.brokers,
        "--usage-topic",
        &c.kafka.usage_topic,
        "--policy-topic",
        &c.policy.topic,
        "--audit-topic",
        &c.audit.topic,
        "--tenant",
        "t-emit",
    ];
    let printed = if kcat_usable() {
        eprintln!("emitters: sending with kcat, as emit.py does by default");
        run_emitter(&topics)?
    } else {
        eprintln!("emitters: kcat unusable here; emit.py --out, produced by the test");
        let dir = temp_dir("emit-send")?;
        let mut args = topics.to_vec();
        let out = dir.display().to_string();
        args.extend(["--out", out.as_str()]);
        let printed = run_emitter(&args)?;
        for w in read_out(&dir)? {
            let msg = Msg {
                key: w.key,
                payload: w.payload,
                kind: Kind::Poison, // unused by produce_to
            };
            produce_to(&env, &w.topic, &[msg]).await?;
        }
        printed
    };
    let ids = |topic: &str| -> BTreeSet<String> {
        printed
            .iter()
            .filter(|l| l["topic"] == topic)
            .filter_map(|l| l["id"].as_str().map(str::to_string))
            .collect()
    };
    let (usage, policy, audit) = (
        ids(&c.kafka.usage_topic),
        ids(&c.policy.topic),
        ids(&c.audit.topic),
    );
    assert_eq!(
        (usage.len(), policy.len(), audit.len()),
        (2, 3, 2),
        "{printed:?}"
    );

    let mut tally = env.spawn_tally("run")?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut tally, Duration::from_secs(30))?;
    idle?;

    let db = &c.clickhouse.database;
    let stored = |sql: String| async move {
        let text = ch_query(&c.clickhouse.url, &format!("{sql} FORMAT TabSeparated")).await?;
        Ok::<BTreeSet<String>, anyhow::Error>(text.lines().map(str::to_string).collect())
    };
    let got_usage = stored(format!("SELECT toString(event_id) FROM {db}.usage_events")).await?;
    let got_policy = stored(format!("SELECT decision_id FROM {db}.policy_decisions")).await?;
    let got_audit = stored(format!("SELECT toString(event_id) FROM {db}.audit_events")).await?;
    let rows = |table: &'static str| {
        let sql = format!("SELECT count() FROM {db}.{table} FORMAT TabSeparated");
        async move {
            let text = ch_query(&c.clickhouse.url, &sql).await?;
            Ok::<u64, anyhow::Error>(text.trim().parse()?)
        }
    };
    let dead: Vec<(String, String, String)> =
        sqlx::query_as("SELECT topic, error_class, error_message FROM tally.dead_letters")
            .fetch_all(&env.pool)
            .await?;
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    assert_eq!(got_usage, usage, "usage_events");
    assert_eq!(got_policy, policy, "policy_decisions");
    assert_eq!(got_audit, audit, "audit_events");
    assert_eq!(
        (
            rows("usage_events").await?,
            rows("policy_decisions").await?,
            rows("audit_events").await?
        ),
        (2, 3, 2),
        "each event once"
    );
    check_outputs(&env)?;
    eprintln!("emitters: done in {:?}", started.elapsed());
    Ok(())
}

/// What tally published about the emitted events, in the formats docs/violations.md
/// states: violations keyed by tenant with their id and rule in headers, decodable as
/// `compliance.violation.v1`; signed checkpoints of tenant `t-emit`'s two-leaf log.
fn check_outputs(env: &TestEnv) -> anyhow::Result<()> {
    let c = &env.cfg;
    let published = read_topic(
        &c.kafka.brokers,
        &c.kafka.violation_topic,
        2,
        Duration::from_secs(30),
    )?;
    let mut rules = BTreeSet::new();
    for m in &published {
        let v: ComplianceViolation = Decoder::new().decode(&m.payload)?;
        assert_eq!(
            m.key.as_deref(),
            Some(b"t-emit".as_slice()),
            "violation key"
        );
        assert_eq!(
            m.headers.get("tally.violation_id"),
            Some(&v.violation_id.to_string())
        );
        assert_eq!(m.headers.get("tally.rule"), Some(&v.rule));
        eprintln!("violation: {}", String::from_utf8_lossy(&m.payload));
        rules.insert(v.rule);
    }
    // The test tenant is not in the reference data and no model is priced.
    let want: BTreeSet<String> = ["unknown_tenant", "unpriced_model"]
        .map(String::from)
        .into();
    assert_eq!(rules, want, "violations of the emitted events");
    let notes = read_topic(
        &c.kafka.brokers,
        &c.audit.checkpoint_topic,
        1,
        Duration::from_secs(30),
    )?;
    let mut largest = 0u64;
    for m in &notes {
        let text = String::from_utf8(m.payload.clone())?;
        assert_eq!(
            m.key.as_deref(),
            Some(b"t-emit".as_slice()),
            "checkpoint key"
        );
        assert!(text.ends_with('\n'), "{text:?}");
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "tally.example/audit/t-emit", "{text}");
        largest = largest.max(lines[1].parse()?);
        assert!(lines[3].starts_with("timestamp "), "{text}");
        assert_eq!(lines[4], "", "{text}");
        assert!(
            lines[5].starts_with("\u{2014} tally.example/audit "),
            "{text}"
        );
        eprintln!("checkpoint:\n{text}");
    }
    assert_eq!(largest, 2, "the log holds both audit events");
    Ok(())
}
