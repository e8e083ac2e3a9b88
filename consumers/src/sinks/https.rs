//! HTTP(S) connectors for ClickHouse and the schema registry: TLS through the
//! system's OpenSSL, with the server's CA from a PEM file when one is configured.
//!
//! Guarantee: an `https://` URL is only ever spoken to over TLS with the
//! certificate chain and host name verified (against `ca_file`'s CAs, or the
//! system's when it is empty); a CA file that cannot be used is a config error
//! naming its key.

use crate::errors::StageError;
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::time::Duration;

/// As the clickhouse crate's own client: keep-alive probes on idle sockets.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The PEM certificates in `pem` (a bundle may hold several).
fn certificates(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in pem.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            current = Some(String::new());
        }
        if let Some(c) = current.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END CERTIFICATE-----") {
            if let Some(c) = current.take() {
                out.push(c);
            }
        }
    }
    out
}

/// A connector that speaks plain HTTP to `http://` and verified TLS to `https://`.
/// `key` names the config key of `ca_file` in errors.
pub fn connector(ca_file: &str, key: &str) -> Result<HttpsConnector<HttpConnector>, StageError> {
    let fatal = |m: String| StageError::Fatal(format!("config key `{key}`: {m}"));
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.enforce_http(false);
    let mut tls = native_tls::TlsConnector::builder();
    if !ca_file.is_empty() {
        let pem = std::fs::read_to_string(ca_file)
            .map_err(|e| fatal(format!("cannot read {ca_file}: {e}")))?;
        let certs = certificates(&pem);
        if certs.is_empty() {
            return Err(fatal(format!("{ca_file} holds no PEM certificate")));
        }
        for c in certs {
            let cert = native_tls::Certificate::from_pem(c.as_bytes())
                .map_err(|e| fatal(format!("{ca_file}: {e}")))?;
            tls.add_root_certificate(cert);
        }
    }
    let tls = tls.build().map_err(|e| fatal(format!("TLS setup: {e}")))?;
    Ok(HttpsConnector::from((http, tls.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_yields_each_certificate() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let certs = certificates(pem);
        assert_eq!(certs.len(), 2);
        assert!(certs[1].contains("BBB"));
    }

    #[test]
    fn an_unusable_ca_file_is_an_error_naming_its_key() {
        let e = connector("/etc/hostname", "clickhouse.ca_file")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("clickhouse.ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
