//! Reading tally's `/metrics` (Prometheus text format) in tests: samples with
//! their labels, the declared type of each family, sums over label subsets,
//! and the `tally_*` names that PromQL expressions or rule files reference.
//!
//! Guarantee: a line that is not a comment and does not parse as
//! `name{labels} value` fails the parse; nothing is silently skipped.

use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# TYPE` of each family (counter, gauge, histogram, summary).
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut out = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line")?;
                out.types.insert(name.into(), kind.trim().into());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples
                .push(parse_sample(line).with_context(|| format!("sample line {line:?}"))?);
        }
        Ok(out)
    }

    /// Sum of the samples named `name` whose labels include `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|s| s.value).sum()
    }

    /// The samples named `name` whose labels include `want`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// Whether family `name` has a type and at least one sample (a histogram
    /// `h` has samples named `h_bucket`, `h_sum`, `h_count`).
    pub fn has_family(&self, name: &str) -> bool {
        let Some(kind) = self.types.get(name) else {
            return false;
        };
        self.samples.iter().any(|s| {
            s.name == name
                || (matches!(kind.as_str(), "histogram" | "summary")
                    && s.name
                        .strip_prefix(name)
                        .is_some_and(|r| ["_bucket", "_sum", "_count"].contains(&r)))
        })
    }

    /// The family a referenced series name belongs to: `h_bucket`, `h_sum`
    /// and `h_count` of a histogram `h` are `h`.
    pub fn family_of(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.types.get(base).is_some_and(|k| k == "histogram") {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let (head, value) = line.rsplit_once(' ').context("no value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse()?,
    };
    let (name, labels) = match head.split_once('{') {
        None => (head, BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').context("unclosed labels")?;
            let mut labels = BTreeMap::new();
            for pair in split_labels(body) {
                let (k, v) = pair.split_once('=').context("label without =")?;
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .context("unquoted label value")?;
                labels.insert(k.to_string(), v.replace("\\\"", "\"").replace("\\\\", "\\"));
            }
            (name, labels)
        }
    };
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    out
}

/// Every identifier starting with `tally_` in `text` (metric names in PromQL
/// or in a rules file).
pub fn tally_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(pos) = text[i..].find("tally_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            out.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_types_and_names() {
        let text =
            "# HELP a_total x\n# TYPE a_total counter\na_total{stream=\"usage\",class=\"a,b\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\ng 1.5\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.sum("a_total", &[("stream", "usage")]), 3.0);
        assert_eq!(s.sum("a_total", &[("class", "a,b")]), 3.0);
        assert_eq!(s.sum("a_total", &[("stream", "policy")]), 0.0);
        assert!(s.has_family("h") && s.has_family("a_total"));
        assert!(!s.has_family("g"), "no TYPE line");
        assert_eq!(s.family_of("h_bucket"), "h");
        assert_eq!(s.family_of("a_total"), "a_total");
        assert!(Scrape::parse("bad line here x").is_err());
        let names = tally_names("rate(tally_x_total[5m]) / my_tally_y + tally_h_bucket{le=\"1\"}");
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["tally_h_bucket", "tally_x_total"]
        );
    }
}
