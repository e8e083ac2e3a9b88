//! The Go example emitter of docs/emitters.md (`examples/emitters/go`, Kafka through
//! Debian's sarama) speaks tally's input contracts: it builds offline in GOPATH mode
//! from Debian's packages, `gofmt` and `go vet` are clean, its Avro single-object
//! fingerprints and Parsing Canonical Forms equal tally's, each payload it writes
//! decodes, and, sent by sarama to the real broker while `tally run` consumes all
//! three streams, every event is counted once (rows in `usage_events`,
//! `policy_decisions` and `audit_events` with the ids it printed) and nothing is
//! dead-lettered.
//!
//! The test installs Go and sarama with `apt-get` when they are missing (Debian's
//! `golang-go`, `golang-github-shopify-sarama-dev`; about a minute once per machine)
//! and skips, saying why, only when that is impossible.

use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tally_schemas::{
    apache_avro::Schema, current_schema_text, parsing_canonical_form, rabin_fingerprint,
    AuditEvent, Decoder, PolicyDecision, UsageEvent,
};
use tally_tests::streams::wait_idle;
use tally_tests::*;

/// Debian packages the emitter builds from.
const GO_PACKAGES: [&str; 2] = ["golang-go", "golang-github-shopify-sarama-dev"];
/// Where Debian puts Go library sources (the GOPATH the emitter builds with).
const GOPATH: &str = "/usr/share/gocode";

fn have_go() -> bool {
    let go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    go && Path::new(GOPATH)
        .join("src/github.com/Shopify/sarama")
        .is_dir()
}

/// Installs the packages when missing; Err says why that is impossible.
fn install_go() -> Result<(), String> {
    if have_go() {
        return Ok(());
    }
    eprintln!("emitters_go: installing {GO_PACKAGES:?} with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(GO_PACKAGES);
    let mut last = apt(&install);
    if !last.as_ref().is_ok_and(|o| o.status.success()) {
        // A machine whose package lists are stale or absent.
        let _ = apt(&["update", "-qq"]);
        last = apt(&install);
    }
    if have_go() {
        return Ok(());
    }
    let why = match last {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("apt-get: {e}"),
    };
    Err(format!(
        "Go or sarama missing and `apt-get install {}` failed: {why}",
        GO_PACKAGES.join(" ")
    ))
}

/// Runs a Go tool in the emitter's directory, GOPATH mode (no module proxy).
fn go(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(repo_root().join("examples/emitters/go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOFLAGS", "")
        .env("GOCACHE", std::env::temp_dir().join("tally-go-build-cache"))
        .output()
        .with_context(|| format!("run {args:?}"))
}

/// The emitter, built once per test process: Ok(None) (the reason printed) when
/// Go cannot be installed; a build, gofmt or vet failure is an error.
fn emitter(test: &str) -> anyhow::Result<Option<PathBuf>> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static SKIP: OnceLock<String> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if let Err(why) = install_go() {
            let _ = SKIP.set(why.clone());
            return Err(why);
        }
        let started = Instant::now();
        let bin = std::env::temp_dir().join(format!("tally-go-emit-{}", std::process::id()));
        let bin_arg = bin.display().to_string();
        let steps: [(&str, &[&str]); 3] = [
            ("gofmt", &["gofmt", "-l", "."]),
            ("go vet", &["go", "vet", "."]),
            ("go build", &["go", "build", "-o", &bin_arg, "."]),
        ];
        for (name, args) in steps {
            let out = go(args).map_err(|e| e.to_string())?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || (name == "gofmt" && !stdout.trim().is_empty()) {
                return Err(format!(
                    "BUILD: {name} failed ({}): {stdout}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        eprintln!("emitters_go: built in {:?}", started.elapsed());
        Ok(bin)
    });
    match built {
        Ok(bin) => Ok(Some(bin.clone())),
        Err(why) if SKIP.get().is_some() => {
            eprintln!("SKIPPED {test}: {why}");
            Ok(None)
        }
        Err(why) => bail!("{why}"),
    }
}

/// Runs the emitter with `args`; returns the JSON lines it printed.
fn run_emitter(bin: &Path, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let schemas = repo_root().join("schemas/avro").display().to_string();
    let out = Command::new(bin)
        .args(["-schemas", &schemas])
        .args(args)
        .output()
        .context("run the Go emitter")?;
    if !out.status.success() {
        bail!(
            "emit {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("emit printed {l:?}")))
        .collect()
}

#[test]
fn go_emitter_fingerprints_and_payloads_match_tally() -> anyhow::Result<()> {
    let Some(bin) = emitter("go_emitter_fingerprints_and_payloads_match_tally")? else {
        return Ok(());
    };
    let mut subjects = BTreeSet::new();
    for line in run_emitter(&bin, &["-print-fingerprints"])? {
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
        subjects.insert(subject.to_string());
    }
    assert_eq!(
        subjects.len(),
        tally_schemas::SUBJECTS.len(),
        "{subjects:?}"
    );
    let dir = std::env::temp_dir().join(format!("tally-go-emit-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run_emitter(
        &bin,
        &["-out", &dir.display().to_string(), "-tenant", "t-go"],
    )?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let decoder = Decoder::new();
    let mut seen = BTreeSet::new();
    for m in manifest.as_array().context("manifest is a list")? {
        let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        let (topic, encoding, payload) = (
            s("topic"),
            s("encoding"),
            std::fs::read(dir.join(s("file")))?,
        );
        assert_eq!(s("key"), "t-go");
        let (id, tenant) = match topic.as_str() {
            "llm.usage.v1" => {
                let e: UsageEvent = decoder.decode(&payload)?;
                assert_eq!(e.reported_cost, Some("0.000495".parse()?), "{encoding}");
                (e.event_id.to_string(), e.tenant_id)
            }
            "policy.decision.v1" => {
                let d: PolicyDecision = decoder.decode(&payload)?;
                (d.decision_id, d.tenant_id)
            }
            "audit.event.v1" => {
                let e: AuditEvent = decoder.decode(&payload)?;
                (e.event_id.to_string(), e.tenant_id)
            }
            t => bail!("unexpected topic {t}"),
        };
        assert_eq!(
            (id, tenant.as_str()),
            (s("id"), "t-go"),
            "{topic} {encoding}"
        );
        seen.insert((topic, encoding));
    }
    assert_eq!(
        seen.len(),
        6,
        "3 streams x (json, avro-single-object): {seen:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn go_emitted_events_of_every_stream_are_counted_once() -> anyhow::Result<()> {
    let Some(bin) = emitter("go_emitted_events_of_every_stream_are_counted_once")? else {
        return Ok(());
    };
    let started = Instant::now();
    let env = test_env(
        "emitters_go",
        2,
        &[
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__AUDIT", "true"),
        ],
    )
    .await?;
    let c = &env.cfg;
    let printed = run_emitter(
        &bin,
        &[
            "-brokers",
            &c.kafka.brokers,
            "-usage-topic",
            &c.kafka.usage_topic,
            "-policy-topic",
            &c.policy.topic,
            "-audit-topic",
            &c.audit.topic,
            "-tenant",
            "t-go",
        ],
    )?;
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
        (2, 2, 2),
        "{printed:?}"
    );

    let mut tally = env.spawn_tally("run")?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut tally, Duration::from_secs(30))?;
    idle?;

    let db = &c.clickhouse.database;
    let stored = |sql: String| async move {
        let text = ch_query(&c.clickhouse.url, &format!("{sql} FORMAT TabSeparated")).await?;
        Ok::<Vec<String>, anyhow::Error>(text.lines().map(str::to_string).collect())
    };
    let dead: Vec<(String, String, String)> =
        sqlx::query_as("SELECT topic, error_class, error_message FROM tally.dead_letters")
            .fetch_all(&env.pool)
            .await?;
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    let rows = |v: Vec<String>| -> (usize, BTreeSet<String>) { (v.len(), v.into_iter().collect()) };
    assert_eq!(
        rows(stored(format!("SELECT toString(event_id) FROM {db}.usage_events")).await?),
        (2, usage),
        "usage_events: each event once"
    );
    assert_eq!(
        rows(stored(format!("SELECT decision_id FROM {db}.policy_decisions")).await?),
        (2, policy),
        "policy_decisions: each decision once"
    );
    assert_eq!(
        rows(stored(format!("SELECT toString(event_id) FROM {db}.audit_events")).await?),
        (2, audit),
        "audit_events: each event once"
    );
    // The usage events' cost as sent, exactly (a decimal string, never a float).
    let costs = stored(format!(
        "SELECT DISTINCT toString(reported_cost) FROM {db}.usage_events"
    ))
    .await?;
    let want: rust_decimal::Decimal = "0.000495".parse()?;
    assert!(
        costs.len() == 1 && costs[0].parse::<rust_decimal::Decimal>()? == want,
        "reported_cost {costs:?}"
    );
    eprintln!("emitters_go: done in {:?}", started.elapsed());
    Ok(())
}
