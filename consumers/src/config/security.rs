//! Connection security: TLS and SASL settings of Kafka, TLS of Postgres,
//! ClickHouse and the schema registry, and secrets read from files.
//!
//! Guarantee: a secret comes from its key or from `<key>_file` (never both),
//! is read once at load, and never reaches `Debug`, a log line or an error:
//! every error names the key and the file, never the value.

use super::{Config, ConfigError};
use std::path::Path;

/// `kafka.security_protocol` values (librdkafka's, lower case).
pub const KAFKA_PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
/// `kafka.sasl_mechanism` values librdkafka supports without Kerberos.
pub const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
/// `postgres.sslmode` values (libpq's); empty keeps the URL's own `sslmode`.
pub const PG_SSLMODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// librdkafka properties tally sets itself: `kafka.properties` may not set them
/// (the security ones have keys of their own; the others carry the guarantee).
const RESERVED_KAFKA_PROPERTIES: [&str; 22] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "transactional.id",
    "enable.partition.eof",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
];

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Fills `value` from `file` when `file` is set. The file's trailing newline is
/// dropped (as `kubectl create secret --from-file` and `echo >` leave one).
fn resolve(value: &mut String, file: &str, key: &str) -> Result<(), ConfigError> {
    if file.trim().is_empty() {
        return Ok(());
    }
    let file_key = format!("{key}_file");
    if !value.is_empty() {
        return Err(invalid(
            &file_key,
            format!("set either `{key}` or `{file_key}`, not both"),
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| invalid(&file_key, format!("cannot read {file}: {e}")))?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return Err(invalid(&file_key, format!("{file} is empty")));
    }
    *value = text.to_string();
    Ok(())
}

/// Reads every `<secret>_file` into its secret.
pub(super) fn resolve_secret_files(cfg: &mut Config) -> Result<(), ConfigError> {
    let k = &mut cfg.kafka;
    resolve(
        &mut k.sasl_password,
        &k.sasl_password_file,
        "kafka.sasl_password",
    )?;
    resolve(
        &mut k.ssl_key_password,
        &k.ssl_key_password_file,
        "kafka.ssl_key_password",
    )?;
    let p = &mut cfg.postgres;
    resolve(&mut p.password, &p.password_file, "postgres.password")?;
    let c = &mut cfg.clickhouse;
    resolve(&mut c.password, &c.password_file, "clickhouse.password")?;
    let r = &mut cfg.registry;
    resolve(&mut r.password, &r.password_file, "registry.password")?;
    let a = &mut cfg.audit;
    resolve(&mut a.signing_key, &a.signing_key_file, "audit.signing_key")?;
    resolve(
        &mut a.pseudonym_key,
        &a.pseudonym_key_file,
        "audit.pseudonym_key",
    )?;
    Ok(())
}

/// A file a key names must be readable now, not at the first connection.
fn readable(key: &str, path: &str) -> Result<(), ConfigError> {
    if path.is_empty() {
        return Ok(());
    }
    std::fs::File::open(Path::new(path))
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// Checks the security keys of every connection.
pub(super) fn validate(cfg: &Config) -> Result<(), ConfigError> {
    validate_kafka(cfg)?;
    let pg = &cfg.postgres;
    if !pg.sslmode.is_empty() && !PG_SSLMODES.contains(&pg.sslmode.as_str()) {
        return Err(invalid(
            "postgres.sslmode",
            format!(
                "must be empty (the URL's) or one of {}",
                PG_SSLMODES.join(", ")
            ),
        ));
    }
    readable("postgres.ssl_root_cert", &pg.ssl_root_cert)?;
    readable("postgres.ssl_client_cert", &pg.ssl_client_cert)?;
    readable("postgres.ssl_client_key", &pg.ssl_client_key)?;
    if pg.ssl_client_cert.is_empty() != pg.ssl_client_key.is_empty() {
        return Err(invalid(
            "postgres.ssl_client_cert",
            "postgres.ssl_client_cert and postgres.ssl_client_key go together",
        ));
    }
    let ch = &cfg.clickhouse;
    if !ch.ca_file.is_empty() && !ch.url.starts_with("https://") {
        return Err(invalid(
            "clickhouse.ca_file",
            "is set but clickhouse.url is not https://",
        ));
    }
    readable("clickhouse.ca_file", &ch.ca_file)?;
    if !ch.ca_file.is_empty() {
        crate::sinks::https::connector(&ch.ca_file, "clickhouse.ca_file")
            .map_err(|e| invalid("clickhouse.ca_file", e.to_string()))?;
    }
    let reg = &cfg.registry;
    if !reg.url.is_empty() && !reg.url.starts_with("http://") && !reg.url.starts_with("https://") {
        return Err(invalid(
            "registry.url",
            "must be empty or start with http:// or https://",
        ));
    }
    if !reg.ca_file.is_empty() && !reg.url.starts_with("https://") {
        return Err(invalid(
            "registry.ca_file",
            "is set but registry.url is not https://",
        ));
    }
    readable("registry.ca_file", &reg.ca_file)?;
    if !reg.ca_file.is_empty() {
        crate::sinks::https::connector(&reg.ca_file, "registry.ca_file")
            .map_err(|e| invalid("registry.ca_file", e.to_string()))?;
    }
    if reg.username.is_empty() != reg.password.is_empty() {
        return Err(invalid(
            "registry.username",
            "registry.username and registry.password (or registry.password_file) go together",
        ));
    }
    Ok(())
}

fn validate_kafka(cfg: &Config) -> Result<(), ConfigError> {
    let k = &cfg.kafka;
    let protocol = k.security_protocol.to_ascii_lowercase();
    if !KAFKA_PROTOCOLS.contains(&protocol.as_str()) {
        return Err(invalid(
            "kafka.security_protocol",
            format!(
                "must be one of {} (got `{}`)",
                KAFKA_PROTOCOLS.join(", "),
                k.security_protocol
            ),
        ));
    }
    let sasl = protocol.starts_with("sasl_");
    let tls = protocol.ends_with("ssl");
    if sasl {
        if !SASL_MECHANISMS.contains(&k.sasl_mechanism.as_str()) {
            return Err(invalid(
                "kafka.sasl_mechanism",
                format!(
                    "must be one of {} while kafka.security_protocol is {protocol}",
                    SASL_MECHANISMS.join(", ")
                ),
            ));
        }
        if k.sasl_username.is_empty() || k.sasl_password.is_empty() {
            return Err(invalid(
                "kafka.sasl_username",
                format!(
                    "kafka.sasl_username and kafka.sasl_password (or kafka.sasl_password_file) \
                     must be set while kafka.security_protocol is {protocol}"
                ),
            ));
        }
    } else {
        for (key, value) in [
            ("kafka.sasl_mechanism", &k.sasl_mechanism),
            ("kafka.sasl_username", &k.sasl_username),
            ("kafka.sasl_password", &k.sasl_password),
        ] {
            if !value.is_empty() {
                return Err(invalid(
                    key,
                    format!("is set but kafka.security_protocol is {protocol} (no SASL)"),
                ));
            }
        }
    }
    for (key, value) in [
        ("kafka.ssl_ca_location", &k.ssl_ca_location),
        (
            "kafka.ssl_certificate_location",
            &k.ssl_certificate_location,
        ),
        ("kafka.ssl_key_location", &k.ssl_key_location),
    ] {
        if !value.is_empty() && !tls {
            return Err(invalid(
                key,
                format!("is set but kafka.security_protocol is {protocol} (no TLS)"),
            ));
        }
        readable(key, value)?;
    }
    if k.ssl_certificate_location.is_empty() != k.ssl_key_location.is_empty() {
        return Err(invalid(
            "kafka.ssl_certificate_location",
            "kafka.ssl_certificate_location and kafka.ssl_key_location go together",
        ));
    }
    for name in k.properties.keys() {
        if RESERVED_KAFKA_PROPERTIES.contains(&name.as_str()) {
            return Err(invalid(
                &format!("kafka.properties.\"{name}\""),
                "tally sets this librdkafka property itself (security settings have kafka.* keys \
                 of their own)",
            ));
        }
        if name.contains("password") || name.contains("secret") {
            return Err(invalid(
                &format!("kafka.properties.\"{name}\""),
                "secrets may not be passed through kafka.properties (they would not be redacted); \
                 use the kafka.* key and its _file variant",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("TALLY__STREAMS__AUDIT".to_string(), "false".to_string())])
            .collect();
        Config::load_from(None, &env)
    }

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an Invalid error, got {other}"),
        }
    }

    #[test]
    fn secret_from_file_drops_the_newline_and_never_shows_in_debug() {
        let dir = std::env::temp_dir().join(format!("tally-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cr3t-from-file\n").unwrap();
        let cfg = load(&[("TALLY__CLICKHOUSE__PASSWORD_FILE", file.to_str().unwrap())]).unwrap();
        assert_eq!(cfg.clickhouse.password, "s3cr3t-from-file");
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
        let both = load(&[
            ("TALLY__CLICKHOUSE__PASSWORD_FILE", file.to_str().unwrap()),
            ("TALLY__CLICKHOUSE__PASSWORD", "inline"),
        ])
        .unwrap_err();
        assert_eq!(key_of(both), "clickhouse.password_file");
        let missing = load(&[("TALLY__POSTGRES__PASSWORD_FILE", "/nonexistent/pw")]).unwrap_err();
        let text = missing.to_string();
        assert!(text.contains("postgres.password_file") && text.contains("/nonexistent/pw"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kafka_security_keys_are_checked_together() {
        let e = load(&[("TALLY__KAFKA__SECURITY_PROTOCOL", "tls")]).unwrap_err();
        assert_eq!(key_of(e), "kafka.security_protocol");
        let e = load(&[("TALLY__KAFKA__SECURITY_PROTOCOL", "SASL_SSL")]).unwrap_err();
        assert_eq!(key_of(e), "kafka.sasl_mechanism");
        let e = load(&[
            ("TALLY__KAFKA__SECURITY_PROTOCOL", "sasl_plaintext"),
            ("TALLY__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
        ])
        .unwrap_err();
        assert_eq!(key_of(e), "kafka.sasl_username");
        let e = load(&[("TALLY__KAFKA__SASL_USERNAME", "u")]).unwrap_err();
        assert_eq!(key_of(e), "kafka.sasl_username");
        let e = load(&[("TALLY__KAFKA__SSL_CA_LOCATION", "/etc/hostname")]).unwrap_err();
        assert_eq!(key_of(e), "kafka.ssl_ca_location");
        let ok = load(&[
            ("TALLY__KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("TALLY__KAFKA__SASL_MECHANISM", "SCRAM-SHA-256"),
            ("TALLY__KAFKA__SASL_USERNAME", "u"),
            ("TALLY__KAFKA__SASL_PASSWORD", "p"),
        ]);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn pass_through_properties_may_not_override_tally_or_carry_secrets() {
        for (name, _) in [
            ("enable.auto.commit", ""),
            ("sasl.password", ""),
            ("sasl.oauthbearer.client.secret", ""),
        ] {
            let dir = std::env::temp_dir().join(format!("tally-props-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("t.toml");
            std::fs::write(
                &file,
                format!(
                    "[streams]\naudit = false\n[kafka]\nproperties = {{ \"{name}\" = \"x\" }}\n"
                ),
            )
            .unwrap();
            let e = Config::load_from(Some(&file), &[]).unwrap_err();
            assert!(key_of(e).starts_with("kafka.properties."), "{name}");
        }
        let dir = std::env::temp_dir().join(format!("tally-props-{}", std::process::id()));
        let file = dir.join("t.toml");
        std::fs::write(&file, "[streams]\naudit = false\n[kafka]\nproperties = { \"socket.keepalive.enable\" = \"true\" }\n").unwrap();
        let cfg = Config::load_from(Some(&file), &[]).unwrap();
        assert_eq!(cfg.kafka.properties["socket.keepalive.enable"], "true");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn postgres_and_http_tls_keys_are_checked() {
        let e = load(&[("TALLY__POSTGRES__SSLMODE", "verify_full")]).unwrap_err();
        assert_eq!(key_of(e), "postgres.sslmode");
        let e = load(&[("TALLY__POSTGRES__SSL_ROOT_CERT", "/nonexistent/ca.pem")]).unwrap_err();
        assert_eq!(key_of(e), "postgres.ssl_root_cert");
        let e = load(&[("TALLY__CLICKHOUSE__CA_FILE", "/etc/hostname")]).unwrap_err();
        assert_eq!(key_of(e), "clickhouse.ca_file");
        let e = load(&[
            ("TALLY__CLICKHOUSE__URL", "https://ch:8443"),
            ("TALLY__CLICKHOUSE__CA_FILE", "/etc/hostname"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = load(&[
            ("TALLY__REGISTRY__URL", "https://registry:8081"),
            ("TALLY__REGISTRY__USERNAME", "u"),
        ])
        .unwrap_err();
        assert_eq!(key_of(e), "registry.username");
        let ok = load(&[
            ("TALLY__REGISTRY__URL", "https://registry:8081"),
            ("TALLY__CLICKHOUSE__URL", "https://ch:8443"),
            (
                "TALLY__CLICKHOUSE__CA_FILE",
                "/etc/ssl/certs/ca-certificates.crt",
            ),
            ("TALLY__POSTGRES__SSLMODE", "verify-full"),
        ]);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }
}
