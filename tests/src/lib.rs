//! Shared support for tally's integration tests: every test talks to the real
//! broker, ClickHouse and Postgres started by `deploy/local/up.sh`, and gets its
//! own Postgres database, ClickHouse database and topics, so tests can run in
//! parallel and re-run without cleaning up.

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};
use tally::config::Config;
use tally_producers::{GenKind, GenMessage, World};
use tally_schemas::UsageEvent;

mod checks;
pub mod opa;
pub mod streams;
pub use checks::*;
pub mod prom;
pub mod registry;
pub mod servers;
pub mod tls;

/// The checkout under test, decided at run time so that a test binary never drives
/// another checkout's scripts (see [`find_repo_root`]); resolved once per process.
pub fn repo_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        find_repo_root(
            std::env::var_os("TALLY_REPO_ROOT").map(PathBuf::from),
            std::env::current_dir().ok(),
            std::env::current_exe().ok(),
        )
    })
    .clone()
}

/// The directory this test binary was compiled from (baked in by cargo).
fn compiled_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Whether `dir` is a tally checkout: a workspace `Cargo.toml` beside `deploy/local`.
pub fn is_repo_root(dir: &Path) -> bool {
    dir.join("deploy/local/up.sh").is_file()
        && std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
}

/// Resolves the checkout under test, in this order: `TALLY_REPO_ROOT` (the Makefile
/// exports it), the nearest checkout above the current directory (cargo runs tests in the
/// package directory), the nearest one above the test executable (its target dir is inside
/// the checkout by default), and only last the path baked in at compile time, which names
/// whichever clone built the binary.
pub fn find_repo_root(env: Option<PathBuf>, cwd: Option<PathBuf>, exe: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = env.filter(|d| !d.as_os_str().is_empty()) {
        assert!(
            is_repo_root(&dir),
            "TALLY_REPO_ROOT={} is not a tally checkout",
            dir.display()
        );
        return dir;
    }
    [cwd, exe]
        .into_iter()
        .flatten()
        .find_map(|start| {
            start
                .ancestors()
                .find(|d| is_repo_root(d))
                .map(PathBuf::from)
        })
        .unwrap_or_else(compiled_root)
}

static UP: Once = Once::new();

/// Starts the local services (idempotent, seconds when already running).
pub fn services_up() {
    UP.call_once(|| {
        let status = Command::new("bash")
            .arg(repo_root().join("deploy/local/up.sh"))
            .stdout(Stdio::null())
            .status()
            .expect("run deploy/local/up.sh");
        assert!(status.success(), "deploy/local/up.sh failed");
    });
}

/// One test's isolated namespace on the shared servers.
pub struct TestEnv {
    pub name: String,
    pub cfg: Config,
    pub env: Vec<(String, String)>,
    pub pool: PgPool,
}

fn admin_pg_url() -> String {
    std::env::var("TALLY__POSTGRES__URL")
        .unwrap_or_else(|_| "postgres://tally@127.0.0.1:5432/tally".into())
}

/// Creates fresh databases and topics named after `name` and a unique suffix.
pub async fn test_env(
    name: &str,
    partitions: i32,
    extra: &[(&str, &str)],
) -> anyhow::Result<TestEnv> {
    let ch_url =
        std::env::var("TALLY__CLICKHOUSE__URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    test_env_on(name, partitions, extra, &admin_pg_url(), &ch_url).await
}

/// Like [`test_env`], with the Postgres and ClickHouse servers given (e.g. the
/// private ones of `servers`): `pg_admin` is a URL of any database there.
pub async fn test_env_on(
    name: &str,
    partitions: i32,
    extra: &[(&str, &str)],
    pg_admin: &str,
    ch_url: &str,
) -> anyhow::Result<TestEnv> {
    services_up();
    let suffix = format!(
        "{}_{}",
        std::process::id(),
        Utc::now().timestamp_millis() % 100_000_000
    );
    let db = format!("tally_t_{name}_{suffix}");
    let admin = PgPool::connect(pg_admin)
        .await
        .context("connect admin postgres")?;
    // Drop what earlier runs of this test left behind (Postgres and ClickHouse).
    let old: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("tally_t_{name}_%").replace('_', "\\_"))
            .fetch_all(&admin)
            .await?;
    for stale in old {
        // Only what a test process that no longer runs left behind: another
        // run of the same test (a second checkout) may be using its own.
        // Exactly `tally_t_<name>_<pid>_<millis>`: another test's name may
        // start with this one's (`relay` and `relay_stalled`), and tests of
        // one binary run in parallel threads of one process.
        let owner: Option<u32> = stale
            .strip_prefix(&format!("tally_t_{name}_"))
            .and_then(|rest| rest.split_once('_'))
            .filter(|(_, ms)| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|(pid, _)| pid.parse().ok());
        match owner {
            None => continue,
            Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => continue,
            Some(_) => {}
        }
        sqlx::query(&format!("DROP DATABASE IF EXISTS {stale} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        ch_query(ch_url, &format!("DROP DATABASE IF EXISTS {stale}")).await?;
    }
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .context("create test database")?;
    admin.close().await;
    let base = pg_admin.to_string();
    let pg_url = match base.rsplit_once('/') {
        Some((head, _)) => format!("{head}/{db}"),
        None => bail!("bad postgres url {base}"),
    };
    let topic = format!("t.{name}.{suffix}.usage");
    let mut env: Vec<(String, String)> = vec![
        ("TALLY__POSTGRES__URL".into(), pg_url),
        ("TALLY__CLICKHOUSE__DATABASE".into(), db.clone()),
        ("TALLY__KAFKA__USAGE_TOPIC".into(), topic.clone()),
        ("TALLY__KAFKA__DLQ_TOPIC".into(), format!("{topic}.dlq")),
        (
            "TALLY__KAFKA__VIOLATION_TOPIC".into(),
            format!("t.{name}.{suffix}.violations"),
        ),
        (
            "TALLY__KAFKA__GROUP_ID".into(),
            format!("g-{name}-{suffix}"),
        ),
        (
            "TALLY__KAFKA__USAGE_PARTITIONS".into(),
            partitions.to_string(),
        ),
        ("TALLY__SERVER__LISTEN".into(), String::new()),
        ("TALLY__PIPELINE__BATCH_LINGER_MS".into(), "200".into()),
        ("TALLY__KAFKA__MAX_POLL_INTERVAL_MS".into(), "10000".into()),
        // Replays after a takeover wait this long; tests keep it short.
        ("TALLY__PIPELINE__TAKEOVER_GRACE_MS".into(), "1000".into()),
        // The policy and audit streams: their own topics, off unless a test
        // turns them on (TALLY__STREAMS__POLICY / __AUDIT = true).
        ("TALLY__STREAMS__POLICY".into(), "false".into()),
        ("TALLY__STREAMS__AUDIT".into(), "false".into()),
        (
            "TALLY__POLICY__TOPIC".into(),
            format!("t.{name}.{suffix}.policy"),
        ),
        (
            "TALLY__POLICY__DLQ_TOPIC".into(),
            format!("t.{name}.{suffix}.policy.dlq"),
        ),
        ("TALLY__POLICY__PARTITIONS".into(), partitions.to_string()),
        (
            "TALLY__AUDIT__TOPIC".into(),
            format!("t.{name}.{suffix}.audit"),
        ),
        (
            "TALLY__AUDIT__DLQ_TOPIC".into(),
            format!("t.{name}.{suffix}.audit.dlq"),
        ),
        (
            "TALLY__AUDIT__CHECKPOINT_TOPIC".into(),
            format!("t.{name}.{suffix}.checkpoints"),
        ),
        ("TALLY__AUDIT__PARTITIONS".into(), partitions.to_string()),
        ("TALLY__AUDIT__SIGNING_KEY".into(), TEST_SIGNING_KEY.into()),
        (
            "TALLY__AUDIT__PSEUDONYM_KEY".into(),
            TEST_PSEUDONYM_KEY.into(),
        ),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    if let Ok(v) = std::env::var("TALLY__KAFKA__BROKERS") {
        env.push(("TALLY__KAFKA__BROKERS".into(), v));
    }
    env.push(("TALLY__CLICKHOUSE__URL".into(), ch_url.to_string()));
    let cfg = Config::load_from(None, &env).context("test config")?;
    let pool = tally::sinks::postgres::connect_pg(&cfg).await?;
    tally::cli::migrate::postgres(&pool).await?;
    tally::cli::migrate::clickhouse(&cfg).await?;
    tally::cli::migrate::topics(&cfg).await?;
    Ok(TestEnv {
        name: name.into(),
        cfg,
        env,
        pool,
    })
}

/// The test signing key of docs/audit-log.md (never use it for anything else).
pub const TEST_SIGNING_KEY: &str =
    "PRIVATE+KEY+tally.example/audit+50f02fb7+AQcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
/// Its verifier key (`tally audit verify-proof --public-key`).
pub const TEST_VERIFIER_KEY: &str =
    "tally.example/audit+50f02fb7+AepKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs";
/// 32 bytes of `k`, base64: the pseudonym key of the tests and the docs' example.
pub const TEST_PSEUDONYM_KEY: &str = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=";

impl TestEnv {
    pub async fn seed(&self, world: &World) -> anyhow::Result<()> {
        tally::cli::seed::seed(&self.pool, world).await?;
        Ok(())
    }

    /// Sum of the offsets of record over all partitions (= messages handled on a fresh topic).
    pub async fn handled(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2",
        )
        .bind(&self.cfg.kafka.group_id)
        .bind(&self.cfg.kafka.usage_topic)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Waits until `n` messages are handled, no batch is pending and the outbox is empty.
    pub async fn wait_handled(&self, n: i64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let handled = self.handled().await?;
            let busy: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM tally.batches WHERE state = 'pending') + \
                 (SELECT count(*) FROM tally.violations WHERE published_at IS NULL)",
            )
            .fetch_one(&self.pool)
            .await?;
            if handled >= n && busy == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out: handled {handled} of {n}, {busy} pending batches/unpublished violations");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts `tally run` as a child process in this test's namespace.
    pub fn spawn_tally(&self, log_name: &str) -> anyhow::Result<Child> {
        self.spawn_tally_with(log_name, &[])
    }

    /// Like `spawn_tally`, with extra environment (e.g. `TALLY_FAILPOINTS`)
    /// that overrides the test's.
    pub fn spawn_tally_with(
        &self,
        log_name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Child> {
        let bin = tally_binary()?;
        let log_dir = repo_root().join(".local/logs");
        std::fs::create_dir_all(&log_dir)?;
        let log = std::fs::File::create(log_dir.join(format!("{}-{log_name}.log", self.name)))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .env("TALLY_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Ok(cmd.spawn()?)
    }

    pub fn ch(&self) -> tally::sinks::clickhouse::ClickHouseSink {
        tally::sinks::clickhouse::ClickHouseSink::new(&self.cfg.clickhouse)
    }
}

/// The `tally` binary to test: `TALLY_BIN` if set, else the one next to the test
/// executable (the same build, so the same sources, as the test itself).
pub fn tally_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TALLY_BIN").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let (built, tested) = (compiled_root(), repo_root());
    if built.canonicalize().ok() != tested.canonicalize().ok() {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            eprintln!(
                "warning: this test binary was built from {} but tests the checkout {}; \
                 give each checkout its own CARGO_TARGET_DIR (the Makefile's default)",
                built.display(),
                tested.display()
            )
        });
    }
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("tally");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build -p tally` first (make test does)",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn kill9(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

pub fn terminate(child: &mut Child, within: Duration) -> anyhow::Result<()> {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("tally run exited with {status} after SIGTERM");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            kill9(child);
            bail!("tally run did not stop within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Totals per (tenant, team, provider, model, day), computed without tally's code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: i64,
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub output: i64,
    pub reasoning: i64,
    pub cost: Decimal,
}

pub type Key = (String, String, String, String, NaiveDate);

pub struct Expected {
    pub totals: BTreeMap<Key, Sums>,
    pub events: Vec<UsageEvent>,
    pub malformed: BTreeMap<&'static str, usize>,
    pub messages: usize,
}

/// What tally must end up with, from the generator's own record of what it sent.
pub fn expected(msgs: &[GenMessage], world: &World) -> Expected {
    let mut totals: BTreeMap<Key, Sums> = BTreeMap::new();
    let mut events = Vec::new();
    let mut malformed: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for m in msgs {
        match (&m.kind, &m.event) {
            (GenKind::Malformed { class }, _) => *malformed.entry(*class).or_default() += 1,
            (_, Some(e)) => {
                if !seen.insert(e.event_id) {
                    continue;
                }
                let key = (
                    e.tenant_id.clone(),
                    e.team_id.clone().unwrap_or_default(),
                    e.provider.clone(),
                    e.model.clone(),
                    e.occurred_at.date_naive(),
                );
                let s = totals.entry(key).or_default();
                s.requests += 1;
                s.input += e.input_tokens;
                s.cached_input += e.cached_input_tokens;
                s.cache_write += e.cache_write_tokens;
                s.output += e.output_tokens;
                s.reasoning += e.reasoning_tokens;
                if let Some(p) = world.price_at(&e.provider, &e.model, e.occurred_at) {
                    s.cost += p.cost(
                        e.input_tokens,
                        e.cached_input_tokens,
                        e.cache_write_tokens,
                        e.output_tokens,
                        e.reasoning_tokens,
                    );
                }
                events.push(e.clone());
            }
            _ => {}
        }
    }
    Expected {
        totals,
        events,
        malformed,
        messages: msgs.len(),
    }
}

/// Totals from Postgres `spend_daily`.
pub async fn pg_totals(pool: &PgPool) -> anyhow::Result<BTreeMap<Key, Sums>> {
    let rows = sqlx::query(
        "SELECT tenant_id, team_id, provider, model, day, requests, input_tokens, cached_input_tokens, \
         cache_write_tokens, output_tokens, reasoning_tokens, cost FROM tally.spend_daily",
    )
    .fetch_all(pool)
    .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert(
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)),
            Sums {
                requests: r.get(5),
                input: r.get(6),
                cached_input: r.get(7),
                cache_write: r.get(8),
                output: r.get(9),
                reasoning: r.get(10),
                cost: r.get::<Decimal, _>(11).normalize(),
            },
        );
    }
    Ok(out)
}

/// Totals from a ClickHouse table by (tenant, team, provider, model, day).
/// `usage_events` counts rows; rollups sum `requests`.
pub async fn ch_totals(env: &TestEnv, table: &str) -> anyhow::Result<BTreeMap<Key, Sums>> {
    let (time_col, requests) = if table == "usage_events" {
        ("occurred_at", "count()")
    } else {
        ("bucket", "sum(requests)")
    };
    let sql = format!(
        "SELECT tenant_id, team_id, provider, model, toString(toDate({time_col})) AS day, toInt64({requests}) AS requests, \
         toInt64(sum(input_tokens)) AS i, toInt64(sum(cached_input_tokens)) AS ci, toInt64(sum(cache_write_tokens)) AS cw, \
         toInt64(sum(output_tokens)) AS o, toInt64(sum(reasoning_tokens)) AS r, toString(sum(cost)) AS cost \
         FROM {}.{table} GROUP BY tenant_id, team_id, provider, model, day FORMAT TabSeparated",
        env.cfg.clickhouse.database
    );
    let text = ch_query(&env.cfg.clickhouse.url, &sql).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 12 {
            bail!("unexpected row {line:?}");
        }
        let n = |i: usize| f[i].parse::<i64>().unwrap_or(-1);
        out.insert(
            (
                f[0].into(),
                f[1].into(),
                f[2].into(),
                f[3].into(),
                NaiveDate::parse_from_str(f[4], "%Y-%m-%d")?,
            ),
            Sums {
                requests: n(5),
                input: n(6),
                cached_input: n(7),
                cache_write: n(8),
                output: n(9),
                reasoning: n(10),
                cost: f[11].parse::<Decimal>()?.normalize(),
            },
        );
    }
    Ok(out)
}

/// Runs one query over ClickHouse's HTTP interface and returns the body.
pub async fn ch_query(url: &str, sql: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(url).body(Full::new(bytes::Bytes::from(sql.to_string())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).to_string();
    if !status.is_success() {
        bail!("clickhouse: {status}: {text}");
    }
    Ok(text)
}

/// Compares two total maps and describes every difference (empty: equal).
pub fn diff(
    what: &str,
    expected: &BTreeMap<Key, Sums>,
    actual: &BTreeMap<Key, Sums>,
) -> Vec<String> {
    let mut out = Vec::new();
    let norm = |m: &BTreeMap<Key, Sums>| -> BTreeMap<Key, Sums> {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Sums {
                        cost: v.cost.normalize(),
                        ..v.clone()
                    },
                )
            })
            .collect()
    };
    let (e, a) = (norm(expected), norm(actual));
    for (k, v) in &e {
        match a.get(k) {
            Some(x) if x == v => {}
            Some(x) => out.push(format!("{what} {k:?}: expected {v:?}, got {x:?}")),
            None => out.push(format!("{what} {k:?}: missing (expected {v:?})")),
        }
    }
    for k in a.keys().filter(|k| !e.contains_key(*k)) {
        out.push(format!("{what} {k:?}: unexpected {:?}", a[k]));
    }
    out
}

/// Reads a whole topic (from the beginning until quiet) and returns
/// (key, payload, headers) per message.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expect_at_least: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<TopicMessage>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!(
                "reader-{}-{}",
                std::process::id(),
                Utc::now().timestamp_micros()
            ),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("receive.message.max.bytes", "2147483647")
        .create()?;
    c.subscribe(&[topic])?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                let headers = headers_of(&m);
                out.push(TopicMessage {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                });
            }
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {
                if out.len() >= expect_at_least && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    Ok(out)
}

pub struct TopicMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Budget crossings implied by the expected events: (budget_id, period_start, pct).
pub fn expected_budget_crossings(
    exp: &Expected,
    world: &World,
) -> BTreeSet<(String, NaiveDate, Decimal)> {
    use chrono::Datelike;
    let mut spent: BTreeMap<(String, NaiveDate), Decimal> = BTreeMap::new();
    for e in &exp.events {
        let Some(p) = world.price_at(&e.provider, &e.model, e.occurred_at) else {
            continue;
        };
        let cost = p.cost(
            e.input_tokens,
            e.cached_input_tokens,
            e.cache_write_tokens,
            e.output_tokens,
            e.reasoning_tokens,
        );
        let day = e.occurred_at.date_naive();
        for b in &world.budgets {
            if b.tenant_id != e.tenant_id || (b.team_id.is_some() && b.team_id != e.team_id) {
                continue;
            }
            let start = match b.period {
                tally_producers::BudgetPeriod::Day => day,
                tally_producers::BudgetPeriod::Month => {
                    NaiveDate::from_ymd_opt(day.year(), day.month(), 1).expect("first of month")
                }
            };
            *spent.entry((b.budget_id.clone(), start)).or_default() += cost;
        }
    }
    let mut out = BTreeSet::new();
    for ((id, start), total) in spent {
        let b = world
            .budgets
            .iter()
            .find(|b| b.budget_id == id)
            .expect("budget");
        for pct in &b.thresholds_pct {
            if b.amount * *pct / Decimal::ONE_HUNDRED <= total {
                out.insert((id.clone(), start, pct.normalize()));
            }
        }
    }
    out
}

/// Budget crossings recorded by tally, parsed back from the violations table.
pub async fn actual_budget_crossings(
    pool: &PgPool,
) -> anyhow::Result<Vec<(String, NaiveDate, Decimal)>> {
    let rows = sqlx::query(
        "SELECT message, window_start FROM tally.violations WHERE rule = 'budget_threshold'",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        // "budget <id> reached <pct>% of <amount> for the period starting <date>"
        let msg: String = r.get(0);
        let start: DateTime<Utc> = r.get(1);
        let mut words = msg.split_whitespace();
        let id = words.nth(1).unwrap_or_default().to_string();
        let pct = words
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('%')
            .parse::<Decimal>()?
            .normalize();
        out.push((id, start.date_naive(), pct));
    }
    Ok(out)
}

/// A stand-in for a Confluent Schema Registry: answers `GET /schemas/ids/{id}`
/// for the ids it was given and 404 for any other. Returns its base URL.
pub async fn registry_stub(schemas: Vec<(u32, String)>) -> anyhow::Result<String> {
    registry_stub_with_auth(schemas, None).await
}

/// [`registry_stub`] that answers 401 unless the request carries HTTP basic
/// auth with exactly `credentials` (user, password).
pub async fn registry_stub_with_auth(
    schemas: Vec<(u32, String)>,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let expected: Option<String> = credentials.map(|(u, p)| {
        format!(
            "authorization: basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
        .to_ascii_lowercase()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let schemas: std::sync::Arc<HashMap<u32, String>> =
        std::sync::Arc::new(schemas.into_iter().collect());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let schemas = schemas.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                // read until the end of the request head
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let id = path
                    .strip_prefix("/schemas/ids/")
                    .and_then(|s| s.parse::<u32>().ok());
                let authorized = expected.as_ref().is_none_or(|want| {
                    head.lines().any(|l| l.trim().to_ascii_lowercase() == *want)
                });
                let (status, body) = match id.and_then(|i| schemas.get(&i)) {
                    _ if !authorized => (
                        "401 Unauthorized",
                        r#"{"error_code":401,"message":"Unauthorized"}"#.to_string(),
                    ),
                    Some(s) => ("200 OK", serde_json::json!({ "schema": s }).to_string()),
                    None => (
                        "404 Not Found",
                        r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
                    ),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/vnd.schemaregistry.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// Generates a stream, keeping every message (for producing and for expectations).
pub fn generate(cfg: tally_producers::GenConfig) -> Vec<GenMessage> {
    tally_producers::Generator::new(cfg).collect()
}

/// Produces messages (clones) to the test's usage topic, optionally paced.
pub async fn produce(env: &TestEnv, msgs: &[GenMessage], rate: Option<u64>) -> anyhow::Result<()> {
    let report = tally_producers::produce(
        &tally_producers::connection(&env.cfg.kafka.brokers),
        &env.cfg.kafka.usage_topic,
        msgs.iter().cloned(),
        rate,
        false,
    )
    .await?;
    if report.sent as usize != msgs.len() {
        bail!("sent {} of {}", report.sent, msgs.len());
    }
    Ok(())
}

/// Checks every store against the expectation and returns the differences.
pub async fn check_totals(env: &TestEnv, exp: &Expected) -> anyhow::Result<Vec<String>> {
    let mut problems = diff(
        "postgres spend_daily",
        &exp.totals,
        &pg_totals(&env.pool).await?,
    );
    for table in ["usage_events", "usage_1m", "usage_1h", "usage_1d"] {
        problems.extend(diff(
            &format!("clickhouse {table}"),
            &exp.totals,
            &ch_totals(env, table).await?,
        ));
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.dead_letters WHERE topic = $1")
        .bind(&env.cfg.kafka.usage_topic)
        .fetch_one(&env.pool)
        .await?;
    let malformed: usize = exp.malformed.values().sum();
    if dead as usize != malformed {
        problems.push(format!("dead letters: expected {malformed}, got {dead}"));
    }
    Ok(problems)
}

/// Produces `msgs` to the test's usage topic in the background at `rate` msgs/s.
pub fn spawn_producer(
    env: &TestEnv,
    msgs: &[GenMessage],
    rate: u64,
) -> tokio::task::JoinHandle<anyhow::Result<tally_producers::ProduceReport>> {
    let (brokers, topic, msgs) = (
        env.cfg.kafka.brokers.clone(),
        env.cfg.kafka.usage_topic.clone(),
        msgs.to_vec(),
    );
    tokio::spawn(async move {
        tally_producers::produce(
            &tally_producers::connection(&brokers),
            &topic,
            msgs.into_iter(),
            Some(rate),
            false,
        )
        .await
    })
}

/// A minimal HTTP GET against the health server: (status, body), retried a
/// few times (a fresh connection each time).
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut last = None;
    for _ in 0..5 {
        match http_get_once(addr, path) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
}

/// Inserts a violation into the outbox, as a commit would.
pub async fn insert_violation(
    pool: &PgPool,
    v: &tally_schemas::ComplianceViolation,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tally.violations (violation_id, rule, severity, tenant_id, subject_type, subject_id, \
         window_start, window_end, observed, threshold, evidence_event_ids, detected_at, message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(v.violation_id)
    .bind(&v.rule)
    .bind(v.severity.as_str())
    .bind(&v.tenant_id)
    .bind(&v.subject_type)
    .bind(&v.subject_id)
    .bind(v.window_start)
    .bind(v.window_end)
    .bind(v.observed)
    .bind(v.threshold)
    .bind(&v.evidence_event_ids)
    .bind(v.detected_at)
    .bind(&v.message)
    .execute(pool)
    .await?;
    Ok(())
}

/// A `tally run` child process that is killed if the test ends without
/// stopping it (a failed assertion must not leave it running).
pub struct TallyProcess(pub Child);

impl TallyProcess {
    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for TallyProcess {
    fn drop(&mut self) {
        if self.alive() {
            kill9(&mut self.0);
        }
    }
}

/// One value from tally's `/metrics` at `addr`: `series` is the name with its
/// labels as rendered, e.g. `tally_sink_circuit_open{sink="clickhouse"}`.
pub fn metric(addr: &str, series: &str) -> anyhow::Result<f64> {
    let (status, body) = http_get_once(addr, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    for line in body.lines() {
        if let Some(v) = line.strip_prefix(series).and_then(|r| r.strip_prefix(' ')) {
            return Ok(v.trim().parse()?);
        }
    }
    bail!("{series} not in /metrics")
}

/// One HTTP GET: (status, body).
pub fn http_get_once(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let to = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no address for {addr}"))?;
    let mut sock = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut text = String::new();
    sock.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A Kafka message's headers as strings (lossy UTF-8).
pub fn headers_of<M: rdkafka::Message>(m: &M) -> HashMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = HashMap::new();
    if let Some(h) = m.headers() {
        for x in h.iter() {
            out.insert(
                x.key.to_string(),
                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    out
}
