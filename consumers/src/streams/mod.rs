//! Stream definitions: what makes `llm.usage.v1`, `policy.decision.v1` and
//! `audit.event.v1` different, as pure code the exactly-once engine runs.
//!
//! Guarantee: nothing here does I/O or reads a clock; every function is deterministic
//! in its inputs (the caller passes `detected_at` and the stored counts), so a replayed
//! batch derives the same rows, rollups and violation ids as its first attempt.
//!
//! A stream supplies:
//! - **decode**: payload bytes to a validated event, or a classed dead-letter reason
//!   (policy: the schema codecs plus the OPA decision-log mapping, [`policy::opa`]);
//! - **dedup key**: the id a re-send repeats (policy: `decision_id`,
//!   [`policy::dedup_key`]; audit and usage: `event_id`);
//! - **enrich**: what is added or replaced before anything is stored (audit:
//!   pseudonyms of personal identifiers);
//! - **rows**: the raw table and its rollups ([`policy::rollup`]);
//! - **rules**: per-event violations and once-per-window crossings given the count
//!   earlier batches left ([`policy::rules`], [`audit::rules`], [`window`]);
//! - **commit effects**: the counters the final Postgres commit updates under row locks
//!   (deny and failure counts per window, in the sorted key order the rules return).

pub mod audit;
pub mod policy;
pub mod usage;
pub mod window;
pub mod window_store;

/// At most `max` bytes of `s`, cut at a character boundary, `…` marking a cut.
pub(crate) fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_cuts_at_char_boundaries() {
        assert_eq!(super::clip("abc", 3), "abc");
        assert_eq!(super::clip("abcd", 3), "abc…");
        assert_eq!(super::clip("ééé", 3), "é…");
        assert_eq!(super::clip("", 0), "");
    }
}
