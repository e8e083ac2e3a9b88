//! Traces (docs/operations.md, "Traces"), against an OTLP/HTTP receiver the test
//! runs itself: usage messages of which some carry a W3C `traceparent` (some
//! with a `tracestate`, some with a malformed one), some malformed (dead
//! letters) and, with small budgets, some crossing thresholds (violations).
//!
//! First `tally run` with `tracing.otlp_endpoint` empty, the standard
//! `OTEL_EXPORTER_OTLP_*` variables pointing at the receiver: nothing may be
//! exported. Then with the endpoint set: every batch committed in that run has
//! a batch span (exported at the latest by the flush at SIGTERM) with its stage
//! spans as children, and a link to every valid producer trace of its offset
//! range. In both runs: a dead letter carries its message's `traceparent` and
//! `tracestate`, a violation those of the event it names as evidence (also as a
//! CloudEvent, in the second run), a bad `traceparent` none; and the totals are
//! exact (tracing changes no count).

use bytes::Bytes;
use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig, GenKind, GenMessage};
use tally_tests::*;

/// What the receiver got: (service name, span) per span, and the request count.
#[derive(Default)]
struct Received {
    requests: usize,
    spans: Vec<(String, Span)>,
    bad: Vec<String>,
}

/// A minimal OTLP/HTTP receiver (protobuf) on a free port; returns its base URL.
async fn otlp_receiver(got: Arc<Mutex<Received>>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut g = got.lock().expect("receiver lock");
                            g.requests += 1;
                            match ExportTraceServiceRequest::decode(body) {
                                Ok(r) if path == "/v1/traces" => {
                                    for rs in r.resource_spans {
                                        let service = rs
                                            .resource
                                            .as_ref()
                                            .and_then(|r| {
                                                string_attr(&r.attributes, "service.name")
                                            })
                                            .unwrap_or_default();
                                        for ss in rs.scope_spans {
                                            for s in ss.spans {
                                                g.spans.push((service.clone(), s));
                                            }
                                        }
                                    }
                                }
                                Ok(_) => g.bad.push(format!("request to {path}")),
                                Err(e) => g.bad.push(format!("undecodable request to {path}: {e}")),
                            }
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(sock);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The trace context message `i` is sent with: none, valid, valid with a
/// tracestate, or malformed (which tally must ignore).
fn headers_for(i: usize) -> Vec<(&'static str, String)> {
    let trace_id = format!("7a11{i:028x}");
    let span_id = format!("{:016x}", i + 1);
    match i % 4 {
        0 => vec![],
        1 => vec![("traceparent", format!("00-{trace_id}-{span_id}-01"))],
        2 => vec![
            ("traceparent", format!("00-{trace_id}-{span_id}-01")),
            ("tracestate", format!("tally=t{i}")),
        ],
        _ => vec![("traceparent", format!("00-{trace_id}-nothex{i}-01"))],
    }
}

/// The (traceparent, tracestate) tally must carry on for message `i`.
fn carried(i: usize) -> (Option<String>, Option<String>) {
    let h: HashMap<_, _> = headers_for(i).into_iter().collect();
    match i % 4 {
        1 | 2 => (h.get("traceparent").cloned(), h.get("tracestate").cloned()),
        _ => (None, None),
    }
}

/// Produces `msgs[range]` to the usage topic with their trace headers, in order.
async fn produce_traced(
    env: &TestEnv,
    msgs: &[GenMessage],
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::new();
    for i in range {
        let m = &msgs[i];
        let mut headers = OwnedHeaders::new();
        for (k, v) in headers_for(i) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&env.cfg.kafka.usage_topic)
            .payload(&m.payload)
            .headers(headers);
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
        );
    }
    for p in pending {
        p.await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_traced_and_trace_context_is_carried() -> anyhow::Result<()> {
    let env = test_env(
        "tracing",
        1,
        &[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "100")],
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let mut world = demo_world(6, change);
    // Budgets small enough that this run crosses thresholds (violations).
    for b in &mut world.budgets {
        b.amount = (b.amount / rust_decimal::Decimal::from(200)).round_dp(6);
    }
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 800, 29);
    gen.encoding = Encoding::Mixed;
    gen.duplicates = 0.03;
    gen.malformed = 0.04;
    gen.late = 0.0;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    let half = msgs.len() / 2;

    let got = Arc::new(Mutex::new(Received::default()));
    let endpoint = otlp_receiver(got.clone()).await?;

    // 1. Traces off (the default), whatever the OTEL_* variables say.
    produce_traced(&env, &msgs, 0..half).await?;
    let traces_url = format!("{endpoint}/v1/traces");
    let mut off = TallyProcess(env.spawn_tally_with(
        "off",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces_url.as_str()),
        ],
    )?);
    env.wait_handled(half as i64, Duration::from_secs(120))
        .await?;
    terminate(&mut off.0, Duration::from_secs(30))?;
    assert_eq!(
        got.lock().expect("lock").requests,
        0,
        "tally exported with tracing.otlp_endpoint empty"
    );
    let last_batch_off: i64 =
        sqlx::query_scalar("SELECT coalesce(max(batch_id), 0) FROM tally.batches")
            .fetch_one(&env.pool)
            .await?;

    // 2. Traces on; the flush at SIGTERM exports what is still queued.
    produce_traced(&env, &msgs, half..msgs.len()).await?;
    let mut on = TallyProcess(env.spawn_tally_with(
        "on",
        &[
            ("TALLY__TRACING__OTLP_ENDPOINT", endpoint.as_str()),
            ("TALLY__TRACING__SERVICE_NAME", "tally-under-test"),
            // Violations as CloudEvents (binary mode): the trace headers come too.
            ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS", "true"),
        ],
    )?);
    env.wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await?;
    terminate(&mut on.0, Duration::from_secs(30))?;

    // Counting is unaffected.
    let mut problems = check_totals(&env, &exp).await?;
    problems.extend(check_violation_topic(&env).await?);
    problems.extend(check_budgets(&env, &exp, &world).await?);
    assert!(problems.is_empty(), "{problems:#?}");

    check_spans(&env, &got, last_batch_off, half).await?;
    check_dead_letters(&env, &msgs)?;
    check_violations(&env, &msgs).await?;
    Ok(())
}

/// Every batch of the second run: one batch span with its stage spans as
/// children (and `dlq` spans under `screen`), linked to the valid producer
/// traces of its offsets and to nothing else.
async fn check_spans(
    env: &TestEnv,
    got: &Mutex<Received>,
    last_batch_off: i64,
    half: usize,
) -> anyhow::Result<()> {
    let batches: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT batch_id, first_offset, last_offset FROM tally.batches \
         WHERE batch_id > $1 AND state = 'done' ORDER BY batch_id",
    )
    .bind(last_batch_off)
    .fetch_all(&env.pool)
    .await?;
    let got = got.lock().expect("lock");
    assert!(got.bad.is_empty(), "{:?}", got.bad);
    let spans: Vec<&Span> = got
        .spans
        .iter()
        .filter(|(service, _)| service == "tally-under-test")
        .map(|(_, s)| s)
        .collect();
    assert_eq!(spans.len(), got.spans.len(), "resource service.name");
    assert!(!batches.is_empty(), "the second run committed no batch");
    let by_id: BTreeMap<i64, &Span> = spans
        .iter()
        .filter(|s| s.name == "batch")
        .filter_map(|s| int_attr(&s.attributes, "tally.batch_id").map(|id| (id, *s)))
        .collect();
    let span_ids: BTreeSet<i64> = by_id.keys().copied().collect();
    let db_ids: BTreeSet<i64> = batches.iter().map(|b| b.0).collect();
    assert_eq!(span_ids, db_ids, "one batch span per committed batch");
    let mut linked = 0;
    for (id, first, last) in &batches {
        let b = by_id[id];
        assert!(
            b.parent_span_id.is_empty(),
            "batch {id}: a batch span is a root"
        );
        assert_eq!(b.kind, 5, "batch {id}: SPAN_KIND_CONSUMER");
        assert_eq!(int_attr(&b.attributes, "tally.first_offset"), Some(*first));
        assert_eq!(int_attr(&b.attributes, "tally.last_offset"), Some(*last));
        assert_eq!(
            int_attr(&b.attributes, "messaging.batch.message_count"),
            Some(last - first + 1)
        );
        assert_eq!(
            string_attr(&b.attributes, "tally.outcome").as_deref(),
            Some("committed")
        );
        assert!(int_attr(&b.attributes, "tally.events").is_some_and(|n| n > 0));
        assert_eq!(
            string_attr(&b.attributes, "messaging.destination.name").as_deref(),
            Some(env.cfg.kafka.usage_topic.as_str())
        );
        assert!(
            attr(&b.attributes, "target").is_none(),
            "no tracing metadata"
        );
        assert_eq!(
            string_attr(&b.attributes, "tally.stream").as_deref(),
            Some("usage")
        );
        let children: Vec<&&Span> = spans
            .iter()
            .filter(|s| s.trace_id == b.trace_id && s.parent_span_id == b.span_id)
            .collect();
        let names: BTreeSet<&str> = children.iter().map(|s| s.name.as_str()).collect();
        let stages: BTreeSet<&str> = [
            "decode",
            "screen",
            "claim",
            "prepare",
            "clickhouse",
            "commit",
        ]
        .into_iter()
        .collect();
        assert_eq!(names, stages, "batch {id}: stage spans");
        for s in &children {
            assert!(
                s.start_time_unix_nano >= b.start_time_unix_nano
                    && s.end_time_unix_nano <= b.end_time_unix_nano,
                "batch {id}: stage {} outside its batch",
                s.name
            );
        }
        // Dead letters are sent from `screen` (poison) or `claim` (conflicts).
        for d in spans
            .iter()
            .filter(|s| s.trace_id == b.trace_id && s.name == "dlq")
        {
            let parent = children
                .iter()
                .find(|c| c.span_id == d.parent_span_id)
                .map(|c| c.name.as_str());
            assert!(
                matches!(parent, Some("screen" | "claim")),
                "batch {id}: dlq span under {parent:?}"
            );
        }
        // Links: exactly the valid trace contexts of the batch's messages.
        let want: BTreeSet<(String, String)> = (*first..=*last)
            .map(|o| usize::try_from(o).expect("offset"))
            .filter(|i| matches!(i % 4, 1 | 2))
            .map(|i| (format!("7a11{i:028x}"), format!("{:016x}", i + 1)))
            .collect();
        let have: BTreeSet<(String, String)> = b
            .links
            .iter()
            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
            .collect();
        assert_eq!(have, want, "batch {id}: links");
        linked += have.len();
    }
    assert!(linked > 0, "no batch span was linked to a producer trace");
    assert!(
        spans.iter().any(|s| s.name == "dlq"),
        "no dlq span (the second run dead-lettered messages)"
    );
    // A known trace id of the second half is among the links.
    let known = (half..).find(|i| i % 4 == 1).expect("a traced message");
    let known = format!("7a11{known:028x}");
    assert!(
        by_id
            .values()
            .any(|b| b.links.iter().any(|l| hex(&l.trace_id) == known)),
        "no batch span links to trace {known}"
    );
    Ok(())
}

/// Every dead letter carries the trace context of its message (by offset).
fn check_dead_letters(env: &TestEnv, msgs: &[GenMessage]) -> anyhow::Result<()> {
    let malformed = msgs
        .iter()
        .filter(|m| matches!(m.kind, GenKind::Malformed { .. }))
        .count();
    assert!(malformed > 0, "the generator made no malformed message");
    let dlq = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.dlq_topic,
        malformed,
        Duration::from_secs(60),
    )?;
    assert!(dlq.len() >= malformed, "{} dead letters", dlq.len());
    let mut traced = 0;
    for d in &dlq {
        let offset: usize = d.headers["tally.source.offset"].parse()?;
        let (tp, ts) = carried(offset);
        assert_eq!(
            d.headers.get("traceparent"),
            tp.as_ref(),
            "dead letter of {offset}"
        );
        assert_eq!(
            d.headers.get("tracestate"),
            ts.as_ref(),
            "dead letter of {offset}"
        );
        traced += usize::from(tp.is_some());
    }
    assert!(traced > 0, "no dead letter had a traced message");
    Ok(())
}

/// Every violation carries the trace context of the first message of the
/// event it names as evidence.
async fn check_violations(env: &TestEnv, msgs: &[GenMessage]) -> anyhow::Result<()> {
    let mut first: HashMap<(String, String), usize> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        if let (GenKind::Good, Some(e)) = (&m.kind, &m.event) {
            first
                .entry((e.tenant_id.clone(), e.event_id.to_string()))
                .or_insert(i);
        }
    }
    let in_pg: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.violations")
        .fetch_one(&env.pool)
        .await?;
    assert!(in_pg > 0, "no violation was raised");
    let published = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.violation_topic,
        in_pg as usize,
        Duration::from_secs(60),
    )?;
    let (mut traced, mut cloudevents) = (0, 0);
    for v in &published {
        let p: serde_json::Value = serde_json::from_slice(&v.payload)?;
        let tenant = p["tenant_id"].as_str().unwrap_or_default().to_string();
        let evidence = p["evidence_event_ids"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let i = first[&(tenant, evidence)];
        let (tp, ts) = carried(i);
        let rule = &v.headers["tally.rule"];
        assert_eq!(
            v.headers.get("traceparent"),
            tp.as_ref(),
            "{rule} caused by {i}"
        );
        assert_eq!(
            v.headers.get("tracestate"),
            ts.as_ref(),
            "{rule} caused by {i}"
        );
        traced += usize::from(tp.is_some());
        cloudevents += usize::from(tp.is_some() && v.headers.contains_key("ce_id"));
    }
    assert!(traced > 0, "no violation was caused by a traced message");
    assert!(
        cloudevents > 0,
        "no traced violation was published as a CloudEvent"
    );
    Ok(())
}
