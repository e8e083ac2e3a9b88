//! Logging and traces: the process's `tracing` subscriber, and, when
//! `tracing.otlp_endpoint` is set, an OpenTelemetry tracer whose spans go to an
//! OTLP/HTTP (protobuf) collector.
//!
//! Guarantee: traces never change what is counted and never hold up the
//! pipeline. Spans are queued to the SDK's batch span processor, which exports
//! them from its own thread (a full queue drops spans, it never waits); an
//! export that fails or times out loses those spans and nothing else. With the
//! endpoint empty (the default) no exporter, thread or connection exists.
//! Shutdown flushes what is queued, bounded by `tracing.export_timeout_ms`.

use crate::engine::trace::TARGET;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::str::FromStr;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// The `[tracing]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawTracingConfig")]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP collector (`http://host:4318`); spans are
    /// posted to `<endpoint>/v1/traces`. Empty: traces are off.
    pub otlp_endpoint: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Share of batches traced, within 0..=1 (parent-based: a stage span
    /// follows its batch's decision).
    pub sample_ratio: Decimal,
    /// Bound of one export request (retries included) and of the final flush.
    pub export_timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracingConfig {
    otlp_endpoint: String,
    service_name: String,
    sample_ratio: String,
    export_timeout_ms: u64,
}

impl TryFrom<RawTracingConfig> for TracingConfig {
    type Error = String;

    /// Each message names its key (the config loader reports it as `tracing.<key>`).
    fn try_from(raw: RawTracingConfig) -> Result<Self, String> {
        let endpoint = raw.otlp_endpoint.trim().trim_end_matches('/').to_string();
        if !endpoint.is_empty() {
            if !endpoint.starts_with("http://") {
                return Err(format!(
                    "otlp_endpoint must be empty or an http:// URL such as \"http://127.0.0.1:4318\" \
                     (https is not built in: send to a local collector), not {endpoint:?}"
                ));
            }
            if format!("{endpoint}/v1/traces")
                .parse::<hyper::Uri>()
                .is_err()
            {
                return Err(format!("otlp_endpoint {endpoint:?} is not a valid URL"));
            }
        }
        if raw.service_name.trim().is_empty() {
            return Err("service_name must not be empty".into());
        }
        let sample_ratio = match Decimal::from_str(raw.sample_ratio.trim()) {
            Ok(r) if r >= Decimal::ZERO && r <= Decimal::ONE => r,
            _ => {
                return Err(format!(
                "sample_ratio must be a decimal within 0..=1 such as \"1.0\" or \"0.05\", not {:?}",
                raw.sample_ratio
            ))
            }
        };
        if raw.export_timeout_ms < 100 {
            return Err("export_timeout_ms must be >= 100".into());
        }
        Ok(Self {
            otlp_endpoint: endpoint,
            service_name: raw.service_name.trim().to_string(),
            sample_ratio,
            export_timeout_ms: raw.export_timeout_ms,
        })
    }
}

impl TracingConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    /// Where spans are posted.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.otlp_endpoint)
    }

    fn export_timeout(&self) -> Duration {
        Duration::from_millis(self.export_timeout_ms)
    }

    /// The root sampler: a share of new traces, children follow their parent.
    fn sampler(&self) -> Sampler {
        let root = if self.sample_ratio >= Decimal::ONE {
            Sampler::AlwaysOn
        } else if self.sample_ratio <= Decimal::ZERO {
            Sampler::AlwaysOff
        } else {
            // A sampling probability, not money: the SDK takes an f64.
            Sampler::TraceIdRatioBased(self.sample_ratio.to_f64().unwrap_or(1.0))
        };
        Sampler::ParentBased(Box::new(root))
    }
}

/// What `init` set up; `shutdown` flushes the spans still queued.
#[must_use = "call shutdown() before exiting so queued spans are exported"]
pub struct Telemetry {
    provider: Option<(SdkTracerProvider, Duration)>,
}

/// Installs the global subscriber: the log (stderr; `TALLY_LOG` filters it,
/// `TALLY_LOG_FORMAT=json` for JSON lines) and, with `traces` given and
/// enabled, the OpenTelemetry layer. The spans meant for export (target
/// [`TARGET`]) never reach the log, so log lines look the same either way.
/// Must run inside the Tokio runtime (the exporter sends through it).
pub fn init(traces: Option<&TracingConfig>) -> Result<Telemetry, String> {
    let traces = traces.filter(|t| t.enabled());
    let provider = traces.map(provider).transpose()?;
    let json = std::env::var("TALLY_LOG_FORMAT").as_deref() == Ok("json");
    let tracer = provider.as_ref().map(|p| p.tracer("tally"));
    tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(tracer, json))
        .map_err(|e| format!("installing the log subscriber: {e}"))?;
    if let Some(t) = traces {
        tracing::info!(
            url = %t.traces_url(),
            service_name = %t.service_name,
            sample_ratio = %t.sample_ratio,
            "exporting traces (OTLP/HTTP protobuf)"
        );
    }
    Ok(Telemetry {
        provider: provider.zip(traces.map(TracingConfig::export_timeout)),
    })
}

/// The log layer and, when there is a tracer, the OpenTelemetry layer (only
/// [`TARGET`]'s spans). `TALLY_LOG` filters the whole subscriber, with
/// [`TARGET`] on only when exporting; the log layer leaves [`TARGET`] out.
///
/// The `EnvFilter` is global, not a per-layer filter of the log layer: a
/// per-layer filter that disables an event queried through the `log` crate
/// (librdkafka's logs, with `librdkafka=warn`) swallowed the next event on
/// that thread (tokio-rs/tracing#2519), e.g. the `tally run stopped` line.
fn subscriber(
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    json: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync> {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,librdkafka=warn"));
    let export = if tracer.is_some() { "info" } else { "off" };
    if let Ok(d) = format!("{TARGET}={export}").parse() {
        filter = filter.add_directive(d);
    }
    // Never disables anything but TARGET's spans, so no `log` query leaves a
    // disabled mark behind.
    let not_exported = tracing_subscriber::filter::filter_fn(|m| m.target() != TARGET);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = if json {
        fmt.json().with_filter(not_exported).boxed()
    } else {
        fmt.with_filter(not_exported).boxed()
    };
    let base = tracing_subscriber::registry().with(log).with(filter);
    // No layer at all without a tracer (an absent `Option` layer would still
    // enable the spans): they are then disabled at their call sites.
    match tracer {
        None => Box::new(base),
        Some(t) => Box::new(
            base.with(
                tracing_opentelemetry::layer()
                    .with_tracer(t)
                    .with_location(false)
                    .with_threads(false)
                    .with_tracked_inactivity(false)
                    .with_target(false)
                    .with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_target(TARGET, tracing::Level::INFO),
                    ),
            ),
        ),
    }
}

impl Telemetry {
    /// Exports the spans still queued (bounded by the export timeout) and
    /// stops the exporter. Without traces it does nothing.
    pub async fn shutdown(self) {
        let Some((provider, timeout)) = self.provider else {
            return;
        };
        // Blocks until the processor thread is done; that thread sends through
        // the runtime, so it must not wait on a runtime worker.
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(timeout + Duration::from_secs(1))
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "traces: final export failed; queued spans are lost")
            }
            Err(e) => tracing::warn!(error = %e, "traces: final export did not finish"),
        }
    }
}

/// The tracer provider: OTLP/HTTP protobuf over [`RuntimeHttp`], batched.
fn provider(t: &TracingConfig) -> Result<SdkTracerProvider, String> {
    let http = RuntimeHttp::new(t.export_timeout())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(t.traces_url())
        .with_timeout(t.export_timeout())
        .build()
        .map_err(|e| format!("config key `tracing.otlp_endpoint`: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(t.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(t.sampler())
        .with_resource(resource)
        .build())
}

/// The exporter's HTTP client: hyper (already tally's) on the Tokio runtime.
/// The batch span processor calls it from its own thread, outside the
/// runtime, so each request is spawned onto the runtime and awaited there.
#[derive(Debug)]
struct RuntimeHttp {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl RuntimeHttp {
    fn new(timeout: Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| format!("traces need the Tokio runtime: {e}"))?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self {
            client,
            runtime,
            timeout,
        })
    }
}

/// Largest collector response read (OTLP answers are a few bytes).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl HttpClient for RuntimeHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        use http_body_util::BodyExt;
        let (client, timeout) = (self.client.clone(), self.timeout);
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, http_body_util::Full::new(body));
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis()).into()),
            }
        });
        task.await.map_err(|e| -> HttpError { Box::new(e) })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<TracingConfig, String> {
        let mut raw = RawTracingConfig {
            otlp_endpoint: String::new(),
            service_name: "tally".into(),
            sample_ratio: "1.0".into(),
            export_timeout_ms: 10_000,
        };
        for (k, v) in pairs {
            match *k {
                "otlp_endpoint" => raw.otlp_endpoint = v.to_string(),
                "service_name" => raw.service_name = v.to_string(),
                "sample_ratio" => raw.sample_ratio = v.to_string(),
                _ => unreachable!(),
            }
        }
        TracingConfig::try_from(raw)
    }

    #[test]
    fn spans_cost_nothing_without_an_endpoint() {
        use crate::engine::trace::stage;
        let off = tracing::subscriber::with_default(subscriber(None, false), || {
            stage("decode").is_disabled()
        });
        assert!(off, "with traces off the spans are disabled");
        let provider = SdkTracerProvider::builder().build();
        let on = tracing::subscriber::with_default(
            subscriber(Some(provider.tracer("t")), false),
            || stage("decode").is_disabled(),
        );
        assert!(!on, "with a tracer the spans are recorded");
    }

    #[test]
    fn endpoint_and_ratio_are_checked() {
        let off = parse(&[]).unwrap();
        assert!(!off.enabled());
        let on = parse(&[("otlp_endpoint", "http://127.0.0.1:4318/")]).unwrap();
        assert!(on.enabled());
        assert_eq!(on.traces_url(), "http://127.0.0.1:4318/v1/traces");
        for bad in [
            "https://collector:4318",
            "127.0.0.1:4318",
            "http://bad host",
        ] {
            let e = parse(&[("otlp_endpoint", bad)]).unwrap_err();
            assert!(e.contains("otlp_endpoint"), "{e}");
        }
        for bad in ["1.5", "-0.1", "half", ""] {
            let e = parse(&[("sample_ratio", bad)]).unwrap_err();
            assert!(e.contains("sample_ratio"), "{e}");
        }
        assert_eq!(
            parse(&[("sample_ratio", "0.25")]).unwrap().sample_ratio,
            Decimal::new(25, 2)
        );
        assert!(parse(&[("service_name", " ")])
            .unwrap_err()
            .contains("service_name"));
    }

    #[test]
    fn the_config_loader_names_the_key() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let c = crate::config::Config::load_from(None, &[]).expect("defaults");
        assert!(!c.tracing.enabled(), "off by default");
        assert_eq!(c.tracing.sample_ratio, Decimal::ONE);
        let c = crate::config::Config::load_from(
            None,
            &env("TALLY__TRACING__OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        )
        .expect("endpoint");
        assert_eq!(c.tracing.traces_url(), "http://127.0.0.1:4318/v1/traces");
        let e = crate::config::Config::load_from(None, &env("TALLY__TRACING__SAMPLE_RATIO", "2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tracing.sample_ratio"), "{e}");
        let e = crate::config::Config::load_from(None, &env("TALLY__TRACING__ENDPOINT", "x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tracing.endpoint"), "{e}");
    }
}
