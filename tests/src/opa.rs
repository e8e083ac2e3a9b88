//! Support for the tests of `tally ingest` and `tally dlq redrive`: OPA
//! decision-log events with the row the pipeline must store for each, gzip,
//! raw HTTP requests, and running other `tally` subcommands.

use crate::{ch_query, repo_root, tally_binary, TestEnv};
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// One OPA decision-log event (as OPA writes it) and what tally must store.
#[derive(Debug, Clone)]
pub struct OpaEvent {
    /// The event's JSON, exactly as uploaded.
    pub json: String,
    /// The stored row, as the TSV line of [`decision_rows`] (None: dead-lettered).
    pub row: Option<String>,
    pub decision_id: String,
    /// The tenant the decision is about, wherever the event carries it.
    pub owner: String,
    /// The Kafka key `tally ingest` gives it with the default mapping.
    pub tenant: Option<String>,
}

fn t0() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(ChronoDuration::minutes(10))
        .unwrap_or_else(|_| Utc::now())
        - ChronoDuration::minutes(30)
}

/// Where an event carries its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantAt {
    /// `/input/tenant_id` (the default `[opa] tenant` pointer).
    TenantId,
    /// `/input/org_id` (found only with `TALLY__OPA__TENANT=/input/org_id`).
    OrgId,
    /// Nowhere.
    Missing,
}

/// `n` OPA events `prefix-0..n` spread over three tenants, two policies, allow
/// and deny, enforced and dry-run; `at` says where the tenant is.
pub fn opa_events(prefix: &str, n: usize, at: TenantAt) -> Vec<OpaEvent> {
    let base = t0();
    (0..n)
        .map(|i| {
            let tenant = ["t-acme", "t-globex", "t-initech"][i % 3];
            let policy = ["llm/guard", "llm/pii"][(i / 3) % 2];
            let allow = i % 5 < 2;
            let dry = i % 7 == 0;
            let severity = ["low", "medium", "high", "critical"][i % 4];
            let decision_id = format!("{prefix}-{i}");
            let at_time = base + ChronoDuration::seconds(i as i64 % 1200);
            let ts = at_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let mut input = serde_json::json!({"request_id": format!("req-{i}"), "prompt": "secret"});
            match at {
                TenantAt::TenantId => input["tenant_id"] = tenant.into(),
                TenantAt::OrgId => input["org_id"] = tenant.into(),
                TenantAt::Missing => {}
            }
            let json = serde_json::json!({
                "labels": {"id": "opa-7", "version": "1.4.0"},
                "decision_id": decision_id,
                "bundles": {"authz": {"revision": "rev-3"}},
                "path": format!("{policy}/allow"),
                "input": input,
                "result": {
                    "allow": allow,
                    "enforcement": if dry { "dryrun" } else { "enforce" },
                    "severity": severity,
                    "reason": format!("reason {}", i % 4),
                },
                "requested_by": "127.0.0.1:5000",
                "timestamp": ts,
                "metrics": {"timer_server_handler_ns": (i as u64 % 40) * 1_000_000 + 17},
            })
            .to_string();
            let row = (at != TenantAt::Missing).then(|| {
                format!(
                    "{decision_id}\t{tenant}\t{policy}\t{}\t{}\t{severity}\topa-7\treq-{i}\trev-3\treason {}\t{}\t{}",
                    if allow { "allow" } else { "deny" },
                    if dry { "monitor" } else { "enforce" },
                    i % 4,
                    i % 40,
                    at_time.format("%Y-%m-%d %H:%M:%S"),
                )
            });
            OpaEvent {
                json,
                row,
                decision_id,
                owner: tenant.to_string(),
                tenant: (at == TenantAt::TenantId).then(|| tenant.to_string()),
            }
        })
        .collect()
}

/// The JSON array OPA would upload for `events` (compact, as OPA writes it).
pub fn array(events: &[OpaEvent]) -> String {
    let parts: Vec<&str> = events.iter().map(|e| e.json.as_str()).collect();
    format!("[{}]", parts.join(","))
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip in memory");
    e.finish().expect("gzip in memory")
}

/// The stored policy decisions, one TSV line each, sorted (the format of [`OpaEvent::row`]).
pub async fn decision_rows(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    let text = ch_query(
        &env.cfg.clickhouse.url,
        &format!(
            "SELECT decision_id, tenant_id, policy_id, decision, enforcement, severity, source, request_id, \
             policy_version, reason, evaluation_ms, toString(occurred_at) FROM {}.policy_decisions \
             ORDER BY decision_id FORMAT TSV",
            env.cfg.clickhouse.database
        ),
    )
    .await?;
    Ok(text.lines().map(str::to_string).collect())
}

/// The rows `events` must leave, sorted like [`decision_rows`] (first copy of each id).
pub fn expected_rows<'a>(events: impl IntoIterator<Item = &'a OpaEvent>) -> Vec<String> {
    let mut rows: Vec<String> = events.into_iter().filter_map(|e| e.row.clone()).collect();
    rows.sort();
    rows.dedup();
    rows
}

/// An HTTP response: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Sends `head` (request line and headers, without the blank line) and `body`,
/// the body in `parts` writes `gap` apart, and reads the whole response.
pub fn http_raw(
    addr: &str,
    head: &str,
    body: &[u8],
    parts: usize,
    gap: Duration,
) -> anyhow::Result<HttpResponse> {
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.write_all(format!("{head}\r\n\r\n").as_bytes())?;
    let size = body.len().div_ceil(parts.max(1)).max(1);
    for (i, chunk) in body.chunks(size).enumerate() {
        if i > 0 {
            std::thread::sleep(gap);
        }
        // The server may answer (and close) before the whole body is sent.
        if sock.write_all(chunk).is_err() {
            break;
        }
    }
    let mut raw = Vec::new();
    let _ = sock.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP response: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow::anyhow!("no status line: {head:?}"))?
        .parse()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// POSTs `body` to `path` with `headers` (e.g. `content-encoding: gzip`).
pub fn post(addr: &str, path: &str, headers: &[&str], body: &[u8]) -> anyhow::Result<HttpResponse> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close",
        body.len()
    );
    for h in headers {
        head.push_str("\r\n");
        head.push_str(h);
    }
    http_raw(addr, &head, body, 1, Duration::ZERO)
}

/// A free local port (for `ingest.listen`).
pub fn free_addr() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

impl TestEnv {
    fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(tally_binary()?);
        cmd.args(args).env("TALLY_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Starts `tally <args>` in this test's namespace, stderr to `.local/logs`.
    pub fn spawn_command(
        &self,
        args: &[&str],
        log_name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Child> {
        let dir = repo_root().join(".local/logs");
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join(format!("{}-{log_name}.log", self.name)))?;
        let mut cmd = self.command(args, extra)?;
        cmd.stdout(Stdio::null()).stderr(log);
        Ok(cmd.spawn()?)
    }

    /// Runs `tally <args>` to completion in this test's namespace.
    pub fn run_command(&self, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<Output> {
        Ok(self.command(args, extra)?.output()?)
    }
}

/// Waits until `GET /livez` answers at `addr`.
pub fn wait_listening(addr: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if crate::http_get_once(addr, "/livez").is_ok_and(|(s, _)| s == 200) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "nothing answers on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
