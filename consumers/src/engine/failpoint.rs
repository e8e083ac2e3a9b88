//! Named fault-injection points at every boundary of the state machine.
//!
//! Guarantee: without the `failpoints` cargo feature every point compiles to
//! nothing. With it (test builds turn it on), `TALLY_FAILPOINTS` arms points:
//!
//! ```text
//! TALLY_FAILPOINTS="after_claim=abort@2;before_commit=sleep(3000)"
//! ```
//!
//! Actions: `abort` (the process dies at once, as on `kill -9`: no unwinding,
//! no cleanup), `sleep(MS)`, `error` (a Retryable error at that point) and
//! `off`. `@N` fires on the N-th hit only (default: every hit); `@N+` on the
//! N-th and every later hit; `@N,M,...` on each hit listed. Every firing is logged to stderr as
//! `failpoint NAME fired` before it acts, so a test can assert it was reached.
//! A name prefixed with a stream (`audit.after_claim`) arms the point only in
//! that stream's batches (see [`in_stream`]), so a test can crash one stream
//! while the others run.

use crate::errors::StageError;

/// Every named point, in data-path order (documented in docs/architecture.md).
pub const POINTS: &[&str] = &[
    "take_ownership_after_lock",
    "after_dlq_ack",
    "before_claim",
    "after_claim",
    "before_clickhouse_insert",
    "between_insert_parts",
    "after_clickhouse_table",
    "after_clickhouse",
    "before_commit",
    "commit_after_budget_read",
    "after_commit",
    "relay_before_send",
    "relay_after_publish",
    "redrive_after_produce",
];

/// Refuses `TALLY_FAILPOINTS` in a build without failpoints (a test that arms
/// one must never pass because nothing fired), and validates it in one with.
pub fn check_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("TALLY_FAILPOINTS") else {
        return Ok(());
    };
    #[cfg(feature = "failpoints")]
    {
        armed::parse(&spec).map(|_| ())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        Err(format!(
            "TALLY_FAILPOINTS={spec} is set, but this build has no failpoints (build with --features tally/failpoints)"
        ))
    }
}

tokio::task_local! {
    static STREAM: &'static str;
}

/// Runs `f` (a batch of `stream`) with its failpoints scoped to that stream.
pub async fn in_stream<F: std::future::Future>(stream: &'static str, f: F) -> F::Output {
    STREAM.scope(stream, f).await
}

/// Hits point `name`: acts if it is armed (feature `failpoints` only).
#[inline]
pub async fn hit(name: &'static str) -> Result<(), StageError> {
    #[cfg(feature = "failpoints")]
    {
        armed::hit(name).await
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        Ok(())
    }
}

#[cfg(feature = "failpoints")]
mod armed {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        Abort,
        Sleep(u64),
        Error,
        Off,
    }

    #[derive(Debug)]
    pub struct Arm {
        pub action: Action,
        /// Fire on these hits (1-based); `from_nth`: on the first listed and every later one.
        pub nth: Option<Vec<u64>>,
        pub from_nth: bool,
        pub hits: AtomicU64,
    }

    pub fn parse(spec: &str) -> Result<HashMap<String, Arm>, String> {
        let mut out = HashMap::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, rest) = item
                .split_once('=')
                .ok_or_else(|| format!("TALLY_FAILPOINTS: `{item}` is not NAME=ACTION"))?;
            let point = match name.split_once('.') {
                Some((stream, point)) if ["usage", "policy", "audit"].contains(&stream) => point,
                _ => name,
            };
            if !POINTS.contains(&point) {
                return Err(format!("TALLY_FAILPOINTS: unknown failpoint `{name}`"));
            }
            let (action, count) = match rest.split_once('@') {
                Some((a, c)) => (a, Some(c)),
                None => (rest, None),
            };
            let action = match action {
                "abort" => Action::Abort,
                "error" => Action::Error,
                "off" => Action::Off,
                a if a.starts_with("sleep(") && a.ends_with(')') => Action::Sleep(
                    a[6..a.len() - 1]
                        .parse()
                        .map_err(|_| format!("TALLY_FAILPOINTS: bad sleep in `{item}`"))?,
                ),
                _ => return Err(format!("TALLY_FAILPOINTS: unknown action in `{item}`")),
            };
            let (nth, from_nth) = match count {
                None => (None, false),
                Some(c) => {
                    let (n, plus) = match c.strip_suffix('+') {
                        Some(n) => (n, true),
                        None => (c, false),
                    };
                    let ns = n
                        .split(',')
                        .map(|x| x.trim().parse::<u64>())
                        .collect::<Result<Vec<u64>, _>>()
                        .map_err(|_| format!("TALLY_FAILPOINTS: bad count in `{item}`"))?;
                    (Some(ns), plus)
                }
            };
            out.insert(
                name.to_string(),
                Arm {
                    action,
                    nth,
                    from_nth,
                    hits: AtomicU64::new(0),
                },
            );
        }
        Ok(out)
    }

    fn arms() -> &'static HashMap<String, Arm> {
        static ARMS: OnceLock<HashMap<String, Arm>> = OnceLock::new();
        ARMS.get_or_init(|| match std::env::var("TALLY_FAILPOINTS") {
            Ok(spec) => parse(&spec).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2)
            }),
            Err(_) => HashMap::new(),
        })
    }

    pub async fn hit(name: &'static str) -> Result<(), StageError> {
        let scoped = STREAM.try_with(|s| format!("{s}.{name}")).ok();
        let Some(arm) = scoped
            .as_deref()
            .and_then(|n| arms().get(n))
            .or_else(|| arms().get(name))
        else {
            return Ok(());
        };
        let n = arm.hits.fetch_add(1, Ordering::SeqCst) + 1;
        let fires = match &arm.nth {
            None => true,
            Some(ks) if arm.from_nth => ks.first().is_some_and(|k| n >= *k),
            Some(ks) => ks.contains(&n),
        };
        if !fires || arm.action == Action::Off {
            return Ok(());
        }
        eprintln!("failpoint {name} fired (hit {n}, {:?})", arm.action);
        match arm.action {
            Action::Abort => std::process::abort(),
            Action::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
            Action::Error => Err(StageError::Retryable(format!("failpoint {name}"))),
            Action::Off => Ok(()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_actions_and_counts() {
            let a = parse("after_claim=abort@2; before_commit=sleep(30);after_commit=error@3+")
                .unwrap();
            assert_eq!(a["after_claim"].action, Action::Abort);
            assert_eq!(a["after_claim"].nth, Some(vec![2]));
            let b = parse("take_ownership_after_lock=error@1,3").unwrap();
            assert_eq!(b["take_ownership_after_lock"].nth, Some(vec![1, 3]));
            assert_eq!(a["before_commit"].action, Action::Sleep(30));
            assert!(a["after_commit"].from_nth);
            assert!(parse("nope=abort").is_err());
            assert!(parse("audit.after_claim=abort").is_ok());
            assert!(parse("billing.after_claim=abort").is_err());
            assert!(parse("after_claim=explode").is_err());
        }
    }
}
