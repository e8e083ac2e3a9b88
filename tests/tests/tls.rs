//! Every connection of tally over TLS, with every secret read from a file, on
//! real servers: a private PostgreSQL with `ssl = on` that refuses plain-text
//! TCP and checks SCRAM passwords (tally uses `sslmode=verify-full`); a private
//! ClickHouse 18.16 on its own HTTPS port with a password user; a private Tansu
//! broker reached only through a TLS terminator that demands a client
//! certificate (mutual TLS); a schema registry behind TLS with basic auth. The
//! CA and certificates are made here with `openssl`.
//!
//! Totals are compared with the generator's oracle, read back over the plain
//! channels the test keeps for itself. Then tally's whole output and its
//! `/metrics` are searched for each password. Wrong CAs and a plain-text
//! Postgres connection must be refused with errors naming what failed.
//!
//! SASL: no local broker checks SASL credentials (noida-db accepts any PLAIN
//! login, Tansu's SASL is not usable from its CLI), so SASL is covered by the
//! unit tests of the client settings and by `sasl_plain_handshake_against_noida`.

use anyhow::{bail, Context};
use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tally::config::Config;
use tally::sinks::kafka_client::KafkaClient;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::servers::{free_port, ClickHouseTls, PrivateClickHouse, PrivatePostgres};
use tally_tests::tls::{tls_front, Pki, TlsKafka};
use tally_tests::*;

const PG_PASSWORD: &str = "pg-Secret-7f3aQ";
const CH_PASSWORD: &str = "ch-Secret-91bdK";
const REGISTRY_PASSWORD: &str = "reg-Secret-22c1Z";

fn secret_file(dir: &Path, name: &str, value: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n"))?;
    Ok(path.display().to_string())
}

/// Runs `tally <args>` with `env`; (success, stdout + stderr).
fn tally(args: &[&str], env: &[(String, String)]) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.args(args)
        .stdin(Stdio::null())
        .env("TALLY_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn with(env: &[(String, String)], overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .cloned()
        .collect();
    out.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
    out
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PG_PASSWORD, CH_PASSWORD, REGISTRY_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} contains the password {secret:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_over_tls_with_secrets_from_files_totals_exact() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tally-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = Pki::create(&dir)?;
    let pg = PrivatePostgres::start_tls(&pki.server_cert, &pki.server_key, PG_PASSWORD)?;
    let ch = PrivateClickHouse::start_tls(&ClickHouseTls {
        cert: &pki.server_cert,
        key: &pki.server_key,
        tally_password: CH_PASSWORD,
    })?;
    let kafka = TlsKafka::start(&pki)?;
    let usage_schema = tally_schemas::current_schema_text("llm.usage.v1")
        .context("usage schema")?
        .to_string();
    let registry =
        registry_stub_with_auth(vec![(1, usage_schema)], Some(("tally", REGISTRY_PASSWORD)))
            .await?;
    let registry_port: u16 = registry.rsplit(':').next().unwrap_or("").parse()?;
    let registry_tls = free_port()?;
    let _registry_front = tls_front(&pki, "registry", registry_tls, registry_port, false)?;

    // The test's own setup and checks: TLS without verification (sslmode
    // prefer) and the password in the URL for Postgres, plain HTTP as the
    // password-less `default` user for ClickHouse.
    let pg_admin = format!(
        "postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres",
        pg.port
    );
    let env = test_env_on("tls", 2, &[], &pg_admin, &ch.url()).await?;
    let https = ch.https_port.context("https port")?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let db = env.cfg.clickhouse.database.clone();
    let pg_url = format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port);
    let ca = pki.ca.display().to_string();
    let tls_env = with(
        &env.env,
        &[
            ("TALLY__POSTGRES__URL", pg_url),
            (
                "TALLY__POSTGRES__PASSWORD_FILE",
                secret_file(&dir, "pg.pw", PG_PASSWORD)?,
            ),
            ("TALLY__POSTGRES__SSLMODE", "verify-full".into()),
            ("TALLY__POSTGRES__SSL_ROOT_CERT", ca.clone()),
            (
                "TALLY__CLICKHOUSE__URL",
                format!("https://127.0.0.1:{https}"),
            ),
            ("TALLY__CLICKHOUSE__USER", "tally".into()),
            (
                "TALLY__CLICKHOUSE__PASSWORD_FILE",
                secret_file(&dir, "ch.pw", CH_PASSWORD)?,
            ),
            ("TALLY__CLICKHOUSE__CA_FILE", ca.clone()),
            (
                "TALLY__KAFKA__BROKERS",
                format!("localhost:{}", kafka.tls_port),
            ),
            ("TALLY__KAFKA__SECURITY_PROTOCOL", "ssl".into()),
            ("TALLY__KAFKA__SSL_CA_LOCATION", ca.clone()),
            (
                "TALLY__KAFKA__SSL_CERTIFICATE_LOCATION",
                pki.client_cert.display().to_string(),
            ),
            (
                "TALLY__KAFKA__SSL_KEY_LOCATION",
                pki.client_key.display().to_string(),
            ),
            (
                "TALLY__REGISTRY__URL",
                format!("https://127.0.0.1:{registry_tls}"),
            ),
            ("TALLY__REGISTRY__USERNAME", "tally".into()),
            (
                "TALLY__REGISTRY__PASSWORD_FILE",
                secret_file(&dir, "registry.pw", REGISTRY_PASSWORD)?,
            ),
            ("TALLY__REGISTRY__CA_FILE", ca.clone()),
            ("TALLY__SERVER__LISTEN", listen.clone()),
        ],
    );
    let tls_cfg = Config::load_from(None, &tls_env).context("TLS config")?;

    // migrate over TLS: Postgres verify-full, ClickHouse HTTPS, topics on the TLS broker.
    let (ok, out) = tally(&["migrate"], &tls_env)?;
    assert!(ok, "tally migrate over TLS failed:\n{out}");
    assert_no_secret("`tally migrate` output", &out);

    // Refusals, each naming what failed.
    let wrong_ca = pki.other_ca.display().to_string();
    let (ok, out) = tally(
        &["migrate"],
        &with(
            &tls_env,
            &[("TALLY__POSTGRES__SSL_ROOT_CERT", wrong_ca.clone())],
        ),
    )?;
    assert!(!ok, "verify-full against another CA must fail:\n{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    assert_no_secret("failed migrate (postgres CA)", &out);
    let (ok, out) = tally(
        &["migrate"],
        &with(&tls_env, &[("TALLY__POSTGRES__SSLMODE", "disable".into())]),
    )?;
    assert!(
        !ok,
        "a plain-text Postgres connection must be refused:\n{out}"
    );
    assert!(
        out.contains("no encryption") || out.contains("pg_hba"),
        "{out}"
    );
    let (ok, out) = tally(
        &["migrate"],
        &with(
            &tls_env,
            &[("TALLY__CLICKHOUSE__CA_FILE", wrong_ca.clone())],
        ),
    )?;
    assert!(
        !ok,
        "ClickHouse over HTTPS with another CA must fail:\n{out}"
    );
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    assert_no_secret("failed migrate (clickhouse CA)", &out);

    // Mutual TLS: a Kafka client without the client certificate gets no metadata.
    let mut no_cert = KafkaClient::new(&tls_cfg.kafka).config();
    no_cert
        .remove("ssl.certificate.location")
        .remove("ssl.key.location");
    let c: BaseConsumer = no_cert.set("group.id", "tls-no-cert").create()?;
    let refused = tokio::task::spawn_blocking(move || {
        c.fetch_metadata(None, Duration::from_secs(5)).is_err()
    })
    .await?;
    assert!(
        refused,
        "the broker's TLS front let a client without a certificate in"
    );

    // Traffic: JSON and Confluent-framed usage events (the registry is asked over TLS).
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(6, change);
    env.seed(&world).await?;
    let mut msgs = Vec::new();
    for (encoding, count, seed) in [
        (Encoding::Json, 1_500, 41),
        (Encoding::Confluent, 1_500, 42),
    ] {
        let mut gen = GenConfig::new(world.clone(), count, seed);
        gen.encoding = encoding;
        gen.duplicates = 0.03;
        gen.malformed = 0.01;
        gen.start = change - ChronoDuration::hours(1);
        gen.span = ChronoDuration::hours(2);
        msgs.extend(generate(gen));
    }
    let exp = expected(&msgs, &world);
    let report = tally_producers::produce(
        &KafkaClient::new(&tls_cfg.kafka).config(),
        &tls_cfg.kafka.usage_topic,
        msgs.iter().cloned(),
        None,
        false,
    )
    .await?;
    assert_eq!(report.sent as usize, msgs.len());

    let mut child = env.spawn_tally_with(
        "tls",
        &tls_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("TALLY_LOG", "debug")])
            .collect::<Vec<_>>(),
    )?;
    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await;
    let metrics = http_get(&listen, "/metrics").map(|(_, body)| body);
    let _ = terminate(&mut child, Duration::from_secs(30));
    let log =
        std::fs::read_to_string(repo_root().join(".local/logs/tls-tls.log")).unwrap_or_default();
    if let Err(e) = waited {
        bail!("{e}\n--- tally log (tail) ---\n{}", tail(&log, 40));
    }
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    let metrics = metrics?;
    assert!(metrics.contains("tally_"), "no metrics served");
    assert_no_secret("tally run's log", &log);
    assert_no_secret("/metrics", &metrics);
    eprintln!(
        "tls: {} messages (half Confluent-framed, resolved through the TLS registry) exact in Postgres and ClickHouse; log {} bytes, /metrics {} bytes; no password in either",
        msgs.len(),
        log.len(),
        metrics.len()
    );
    drop(kafka);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SASL_PLAINTEXT with PLAIN through tally's client settings: noida-db answers
/// the SASL handshake (it accepts any login), so this proves the handshake and
/// the settings, not that a wrong password is refused (no local broker checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_handshake_against_noida() -> anyhow::Result<()> {
    services_up();
    let brokers =
        std::env::var("TALLY__KAFKA__BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    if std::env::var("TALLY_BROKER").is_ok_and(|b| b == "tansu") {
        eprintln!("skipped: Tansu does not answer SASL handshakes");
        return Ok(());
    }
    let env: Vec<(String, String)> = [
        ("TALLY__KAFKA__BROKERS", brokers.as_str()),
        ("TALLY__KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("TALLY__KAFKA__SASL_MECHANISM", "PLAIN"),
        ("TALLY__KAFKA__SASL_USERNAME", "tally"),
        ("TALLY__KAFKA__SASL_PASSWORD", "sasl-Secret-1b7e"),
        ("TALLY__STREAMS__AUDIT", "false"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = Config::load_from(None, &env)?;
    let c: BaseConsumer = KafkaClient::new(&cfg.kafka)
        .config()
        .set("group.id", "sasl-probe")
        .create()?;
    let md = tokio::task::spawn_blocking(move || c.fetch_metadata(None, Duration::from_secs(10)))
        .await??;
    assert!(!md.brokers().is_empty(), "no broker in the metadata");
    Ok(())
}
