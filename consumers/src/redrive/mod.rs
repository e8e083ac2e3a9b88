//! `tally dlq redrive`: dead letters of chosen classes fed back to their stream's input topic.
//!
//! Guarantee: nothing is counted twice and nothing is re-produced twice. Each
//! selected letter is re-produced once to the input topic with its original key
//! and bytes (headers: the original ones minus `tally.error.*`/`tally.source.*`,
//! plus `tally.redrive.*` naming the letter), and Postgres `dlq_redrives` records
//! it, so a later run skips it unless `--again`. A run that dies between producing
//! and recording is reconciled by the next one from the input topic itself (the
//! `tally.redrive.dlq` header), never by producing blindly. Should a redriven copy
//! of an already counted event reach the pipeline anyway, the pipeline drops it as
//! a duplicate of (tenant, event id). Classes that a redrive cannot fix without
//! risking a double count (`dedup_conflict`, `beyond_dedup_horizon`) are refused.
//!
//! Modules: this one (options and the pure selection of letters), [`topic`]
//! (reading the DLQ and the input topic, producing), [`store`] (Postgres) and
//! [`run`] (a run, end to end).

pub mod run;
pub mod store;
pub mod topic;

use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Headers of a dead letter that a redriven message does not carry.
pub const DEAD_LETTER_HEADER_PREFIXES: [&str; 3] =
    ["tally.error.", "tally.source.", "tally.redrive."];
/// Names the letter a message was redriven from: `<dlq topic>/<partition>/<offset>`.
pub const HEADER_DLQ: &str = "tally.redrive.dlq";
/// The letter's class.
pub const HEADER_CLASS: &str = "tally.redrive.class";
/// The run that produced it (`dlq_redrive_runs.run_id`).
pub const HEADER_RUN: &str = "tally.redrive.run";

/// Classes a redrive refuses, with the reason.
pub const REFUSED: [(&str, &str); 2] = [
    (
        "dedup_conflict",
        "the first copy of that id counted; the redriven one would be a conflict again (a really new event needs a new id)",
    ),
    (
        "beyond_dedup_horizon",
        "tally can no longer tell whether an earlier copy was counted (its key may be pruned), so a redrive could count it twice",
    ),
];

/// The input and dead-letter topics of a stream, from the configuration.
pub fn topics(cfg: &crate::config::Config, stream: &str) -> Option<(String, String)> {
    match stream {
        "usage" => Some((cfg.kafka.usage_topic.clone(), cfg.kafka.dlq_topic.clone())),
        "policy" => Some((cfg.policy.topic.clone(), cfg.policy.dlq_topic.clone())),
        "audit" => Some((cfg.audit.topic.clone(), cfg.audit.dlq_topic.clone())),
        _ => None,
    }
}

/// Every dead-letter class a stream's letters can carry.
pub fn classes_of(stream: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = crate::engine::decode::ENGINE_CLASSES
        .iter()
        .chain(tally_schemas::DecodeError::CLASSES.iter())
        .copied()
        .collect();
    if stream == "policy" {
        out.extend(crate::streams::policy::opa::OpaError::CLASSES);
    }
    out
}

/// Checks `--class`: known to the stream, not refused.
pub fn check_classes(stream: &str, classes: &[String]) -> Result<BTreeSet<String>, String> {
    if classes.is_empty() {
        return Err("--class: name at least one dead-letter class".into());
    }
    let known = classes_of(stream);
    let mut out = BTreeSet::new();
    for c in classes {
        if let Some((_, why)) = REFUSED.iter().find(|(r, _)| r == c) {
            return Err(format!("--class {c}: refused: {why}"));
        }
        if !known.contains(&c.as_str()) {
            return Err(format!(
                "--class {c}: not a dead-letter class of the {stream} stream (one of: {})",
                known.join(", ")
            ));
        }
        out.insert(c.clone());
    }
    Ok(out)
}

/// What to redrive.
#[derive(Debug, Clone)]
pub struct Options {
    pub stream: String,
    pub classes: BTreeSet<String>,
    /// Start every DLQ partition at this offset (default: its beginning).
    pub from_offset: Option<i64>,
    /// Only letters dead-lettered at or after this time (the DLQ message's timestamp).
    pub since: Option<DateTime<Utc>>,
    pub dry_run: bool,
    /// Re-produce letters redriven before too.
    pub again: bool,
    /// Letters recorded and produced per round.
    pub batch: usize,
}

/// Where a dead letter came from (its `tally.source.*` headers).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One message of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Letter {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
    }

    pub fn class(&self) -> Option<&str> {
        self.header("tally.error.class")
    }

    pub fn source(&self) -> Option<Source> {
        Some(Source {
            topic: self.header("tally.source.topic")?.to_string(),
            partition: self.header("tally.source.partition")?.parse().ok()?,
            offset: self.header("tally.source.offset")?.parse().ok()?,
        })
    }

    /// The headers the redriven message carries: the letter's own minus the
    /// dead-letter ones, plus the redrive's.
    pub fn redrive_headers(&self, dlq_topic: &str, run_id: i64) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(k, _)| !DEAD_LETTER_HEADER_PREFIXES.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
            .collect();
        out.push((
            HEADER_DLQ.into(),
            letter_id(dlq_topic, self.partition, self.offset).into_bytes(),
        ));
        out.push((
            HEADER_CLASS.into(),
            self.class().unwrap_or_default().as_bytes().to_vec(),
        ));
        out.push((HEADER_RUN.into(), run_id.to_string().into_bytes()));
        out
    }
}

/// The value of [`HEADER_DLQ`].
pub fn letter_id(dlq_topic: &str, partition: i32, offset: i64) -> String {
    format!("{dlq_topic}/{partition}/{offset}")
}

/// Why a letter is not redriven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// No `tally.error.class` or `tally.source.*` headers: not written by tally.
    NotADeadLetter,
    /// Of a class not asked for.
    OtherClass,
    /// Its source topic is not the stream's input topic.
    OtherTopic,
    /// Dead-lettered before `--since`.
    BeforeSince,
    /// This letter was redriven by an earlier run (`--again` repeats it).
    AlreadyRedriven,
    /// Another copy of the same dead letter (same source offset; the DLQ is at
    /// least once) was redriven, in this run or before.
    CopyOfRedriven,
    /// The letter is a redriven message that was dead-lettered again: the fix
    /// did not take (`--again` retries it).
    FailedAgain,
}

impl Skip {
    pub fn describe(self) -> &'static str {
        match self {
            Skip::NotADeadLetter => "not a tally dead letter (no tally.error/tally.source headers)",
            Skip::OtherClass => "of other classes",
            Skip::OtherTopic => "from another source topic",
            Skip::BeforeSince => "dead-lettered before --since",
            Skip::AlreadyRedriven => "redriven before (--again repeats them)",
            Skip::CopyOfRedriven => "copies of a letter redriven (same source offset)",
            Skip::FailedAgain => {
                "redriven before and dead-lettered again: the fix did not take (--again retries them)"
            }
        }
    }
}

/// What earlier runs recorded, as far as the letters at hand are concerned.
#[derive(Debug, Default)]
pub struct Recorded {
    /// DLQ (partition, offset) of letters redriven.
    pub letters: BTreeSet<(i32, i64)>,
    /// Sources of letters redriven.
    pub sources: BTreeSet<Source>,
    /// Input-topic (partition, offset) of redriven messages.
    pub targets: BTreeSet<(i32, i64)>,
}

/// Whether to redrive `l` (Ok: yes); `seen` holds the sources selected so far in this run.
pub fn select(
    l: &Letter,
    opts: &Options,
    input_topic: &str,
    recorded: &Recorded,
    seen: &BTreeSet<Source>,
) -> Result<(), Skip> {
    let (Some(class), Some(source)) = (l.class(), l.source()) else {
        return Err(Skip::NotADeadLetter);
    };
    if !opts.classes.contains(class) {
        return Err(Skip::OtherClass);
    }
    if source.topic != input_topic {
        return Err(Skip::OtherTopic);
    }
    if let (Some(since), Some(ts)) = (opts.since, l.timestamp) {
        if ts < since {
            return Err(Skip::BeforeSince);
        }
    }
    if seen.contains(&source) {
        return Err(Skip::CopyOfRedriven);
    }
    if opts.again {
        return Ok(());
    }
    if recorded.letters.contains(&(l.partition, l.offset)) {
        return Err(Skip::AlreadyRedriven);
    }
    if recorded.sources.contains(&source) {
        return Err(Skip::CopyOfRedriven);
    }
    if recorded
        .targets
        .contains(&(source.partition, source.offset))
    {
        return Err(Skip::FailedAgain);
    }
    Ok(())
}

/// What a run did (or, with `--dry-run`, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub dlq_topic: String,
    pub input_topic: String,
    pub dry_run: bool,
    pub run_id: Option<i64>,
    pub scanned: u64,
    /// Selected letters per class.
    pub selected: BTreeMap<String, u64>,
    pub skipped: BTreeMap<Skip, u64>,
    pub produced: u64,
    /// Sends of an interrupted earlier run found on the input topic (recorded now).
    pub reconciled_found: u64,
    /// Sends of an interrupted earlier run not on the topic (selectable again).
    pub reconciled_missing: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let selected: u64 = self.selected.values().sum();
        writeln!(
            f,
            "redrive {} -> {}{}",
            self.dlq_topic,
            self.input_topic,
            if self.dry_run {
                " (dry run: nothing produced or recorded)"
            } else {
                ""
            }
        )?;
        if self.reconciled_found + self.reconciled_missing > 0 {
            writeln!(
                f,
                "  interrupted earlier run: {} sends found on {} (recorded now), {} never sent (selectable again)",
                self.reconciled_found, self.input_topic, self.reconciled_missing
            )?;
        }
        writeln!(
            f,
            "  scanned {} dead letters, selected {selected}",
            self.scanned
        )?;
        for (class, n) in &self.selected {
            writeln!(f, "    {class}: {n}")?;
        }
        for (skip, n) in &self.skipped {
            writeln!(f, "  skipped {n}: {}", skip.describe())?;
        }
        match (self.dry_run, self.run_id) {
            (true, _) => writeln!(f, "  would produce {selected}"),
            (false, None) => writeln!(f, "  produced 0 (nothing to redrive; no run recorded)"),
            (false, Some(run)) => writeln!(
                f,
                "  produced {} to {} (run {run})",
                self.produced, self.input_topic
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(class: &str, p: i32, o: i64, src: (i32, i64)) -> Letter {
        let h = |k: &str, v: String| (k.to_string(), Some(v.into_bytes()));
        Letter {
            partition: p,
            offset: o,
            timestamp: None,
            key: Some(b"t1".to_vec()),
            payload: Some(b"{}".to_vec()),
            headers: vec![
                h("tally.error.class", class.into()),
                h("tally.error.message", "m".into()),
                h("tally.source.topic", "in".into()),
                h("tally.source.partition", src.0.to_string()),
                h("tally.source.offset", src.1.to_string()),
                h("trace", "abc".into()),
            ],
        }
    }

    fn opts(again: bool) -> Options {
        Options {
            stream: "usage".into(),
            classes: ["unknown_schema_id".to_string()].into(),
            from_offset: None,
            since: None,
            dry_run: false,
            again,
            batch: 10,
        }
    }

    #[test]
    fn selection() {
        let o = opts(false);
        let none = BTreeSet::new();
        let mut rec = Recorded::default();
        let l = letter("unknown_schema_id", 0, 5, (1, 9));
        assert_eq!(select(&l, &o, "in", &rec, &none), Ok(()));
        assert_eq!(select(&l, &o, "other", &rec, &none), Err(Skip::OtherTopic));
        let other = letter("invalid_json", 0, 6, (1, 10));
        assert_eq!(select(&other, &o, "in", &rec, &none), Err(Skip::OtherClass));
        let mut bare = l.clone();
        bare.headers.retain(|(k, _)| k != "tally.source.offset");
        assert_eq!(
            select(&bare, &o, "in", &rec, &none),
            Err(Skip::NotADeadLetter)
        );
        let seen: BTreeSet<Source> = [l.source().unwrap()].into();
        assert_eq!(select(&l, &o, "in", &rec, &seen), Err(Skip::CopyOfRedriven));
        rec.letters.insert((0, 5));
        assert_eq!(
            select(&l, &o, "in", &rec, &none),
            Err(Skip::AlreadyRedriven)
        );
        assert_eq!(select(&l, &opts(true), "in", &rec, &none), Ok(()));
        let copy = letter("unknown_schema_id", 1, 2, (1, 9));
        rec.sources.insert(l.source().unwrap());
        assert_eq!(
            select(&copy, &o, "in", &rec, &none),
            Err(Skip::CopyOfRedriven)
        );
        let mut dated = l.clone();
        dated.timestamp = DateTime::from_timestamp(1_000, 0);
        let since = Options {
            since: DateTime::from_timestamp(2_000, 0),
            ..opts(false)
        };
        assert_eq!(
            select(&dated, &since, "in", &Recorded::default(), &none),
            Err(Skip::BeforeSince)
        );
        let again = letter("unknown_schema_id", 0, 7, (3, 40));
        rec.targets.insert((3, 40));
        assert_eq!(
            select(&again, &o, "in", &rec, &none),
            Err(Skip::FailedAgain)
        );
        assert_eq!(select(&again, &opts(true), "in", &rec, &none), Ok(()));
    }

    #[test]
    fn redrive_headers_drop_the_dead_letter_ones() {
        let h = letter("unknown_schema_id", 2, 8, (1, 9)).redrive_headers("in.dlq", 4);
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["trace", HEADER_DLQ, HEADER_CLASS, HEADER_RUN]);
        assert_eq!(h[1].1, b"in.dlq/2/8");
        assert_eq!(h[2].1, b"unknown_schema_id");
    }

    #[test]
    fn classes_are_checked() {
        assert!(check_classes("usage", &["unknown_schema_id".into()]).is_ok());
        let e = check_classes("usage", &["dedup_conflict".into()]).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let e = check_classes("usage", &["opa_missing_tenant".into()]).unwrap_err();
        assert!(e.contains("not a dead-letter class"), "{e}");
        assert!(check_classes("policy", &["opa_missing_tenant".into()]).is_ok());
        assert!(check_classes("policy", &[]).is_err());
    }
}
