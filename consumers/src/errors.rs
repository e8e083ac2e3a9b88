//! Error classification, done once at each sink boundary.
//!
//! Retryable: retried with backoff (the step is idempotent). Fatal: the pipeline
//! stops without committing anything further. LostOwnership: another instance
//! owns the partition now; drop buffered work for it and re-read its state.
//! Poison messages never reach here: they are classified by the decoder and
//! go to the dead-letter topic.

use std::fmt;

#[derive(Debug)]
pub enum StageError {
    Retryable(String),
    Fatal(String),
    LostOwnership(String),
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageError::Retryable(m) => write!(f, "retryable: {m}"),
            StageError::Fatal(m) => write!(f, "fatal: {m}"),
            StageError::LostOwnership(m) => write!(f, "lost ownership: {m}"),
        }
    }
}

impl std::error::Error for StageError {}

impl StageError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StageError::Retryable(_))
    }
}

/// Postgres: connection trouble, serialization failures and shutdowns are retryable.
pub fn classify_pg(context: &str, e: sqlx::Error) -> StageError {
    let msg = format!("{context}: {e}");
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StageError::Retryable(msg),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 08 connection, 40 transaction rollback (serialization, deadlock),
            // 53 insufficient resources, 57P0x operator intervention / shutdown.
            if code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
            {
                StageError::Retryable(msg)
            } else {
                StageError::Fatal(msg)
            }
        }
        _ => StageError::Fatal(msg),
    }
}

/// `map_err` adapter: classifies a Postgres error with its context.
pub fn pg(context: &'static str) -> impl Fn(sqlx::Error) -> StageError {
    move |e| classify_pg(context, e)
}

/// ClickHouse: network errors, timeouts and load errors are retryable; schema
/// and syntax errors are our bug or a missing migration, hence fatal.
pub fn classify_ch(context: &str, e: clickhouse::error::Error) -> StageError {
    use clickhouse::error::Error as E;
    let msg = format!("{context}: {e}");
    match &e {
        E::Network(_) | E::TimedOut => StageError::Retryable(msg),
        E::BadResponse(text) => {
            // Codes that will not heal by retrying: syntax, unknown table/column,
            // type mismatch, cannot parse. (216, "query with the same id is already
            // running", is an earlier attempt still in progress: retryable.)
            const FATAL: [&str; 8] = [
                "Code: 62,",
                "Code: 60,",
                "Code: 47,",
                "Code: 53,",
                "Code: 16,",
                "Code: 27,",
                "Code: 33,",
                "Code: 70,",
            ];
            if FATAL.iter().any(|c| text.contains(c)) {
                StageError::Fatal(msg)
            } else {
                StageError::Retryable(msg)
            }
        }
        _ => StageError::Fatal(msg),
    }
}

/// Kafka producer errors: a full queue or a broker problem is retryable; a
/// message that is too large or a bad topic is fatal.
pub fn classify_kafka(context: &str, e: &rdkafka::error::KafkaError) -> StageError {
    use rdkafka::types::RDKafkaErrorCode as C;
    let msg = format!("{context}: {e}");
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::InvalidTopic,
        ) => StageError::Fatal(msg),
        _ => StageError::Retryable(msg),
    }
}
