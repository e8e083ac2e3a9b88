//! Exact cost arithmetic and the versioned price book (pure, no I/O).
//!
//! Guarantee: the cost of an event is a pure function of its token counts and the
//! price version in force at its `occurred_at`, computed in `rust_decimal` (never
//! f64), so a replay computes the same cost to the last digit. Every price in a
//! book is in the book's one currency (a row in another is rejected, named), so
//! every cost, and every sum of costs, is in that currency.

use crate::fasthash::Map;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// The five disjoint token classes of one usage event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub output: i64,
    pub reasoning: i64,
}

impl Tokens {
    pub fn total(&self) -> i64 {
        self.input + self.cached_input + self.cache_write + self.output + self.reasoning
    }
}

/// One price version: prices per 1M tokens for each class.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PriceVersion {
    pub effective_from: DateTime<Utc>,
    pub currency: String,
    pub input_per_m: Decimal,
    pub cached_input_per_m: Decimal,
    pub cache_write_per_m: Decimal,
    pub output_per_m: Decimal,
    pub reasoning_per_m: Decimal,
}

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// cost = sum over the five classes of tokens x price per 1M / 1,000,000, exact.
pub fn cost_of(tokens: &Tokens, price: &PriceVersion) -> Decimal {
    let sum = Decimal::from(tokens.input) * price.input_per_m
        + Decimal::from(tokens.cached_input) * price.cached_input_per_m
        + Decimal::from(tokens.cache_write) * price.cache_write_per_m
        + Decimal::from(tokens.output) * price.output_per_m
        + Decimal::from(tokens.reasoning) * price.reasoning_per_m;
    (sum / MILLION).normalize()
}

/// Whether a reported cost differs from the computed one by more than `tolerance`.
pub fn is_mismatch(reported: Option<Decimal>, computed: Decimal, tolerance: Decimal) -> bool {
    reported.is_some_and(|r| (r - computed).abs() > tolerance)
}

/// A price row whose currency is not the book's: prices are never mixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignPrice {
    pub provider: String,
    pub model: String,
    pub effective_from: DateTime<Utc>,
    pub currency: String,
    pub book_currency: String,
}

impl std::fmt::Display for ForeignPrice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "price row (provider {}, model {}, effective_from {}) is in {} but the price book's currency is {}",
            self.provider,
            self.model,
            self.effective_from.to_rfc3339(),
            self.currency,
            self.book_currency
        )
    }
}

impl std::error::Error for ForeignPrice {}

/// All price versions, by (provider, model), sorted by `effective_from`, all in
/// the book's currency.
#[derive(Debug, Clone)]
pub struct PriceBook {
    currency: String,
    /// provider -> model -> versions by `effective_from` (looked up by `&str`,
    /// without building a key per event).
    by_model: Map<String, Map<String, Vec<PriceVersion>>>,
}

impl Default for PriceBook {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            by_model: Map::default(),
        }
    }
}

impl PriceBook {
    /// A book in `currency`; the first row in any other currency is an error.
    pub fn new(
        currency: &str,
        rows: impl IntoIterator<Item = (String, String, PriceVersion)>,
    ) -> Result<Self, ForeignPrice> {
        let mut by_model: Map<String, Map<String, Vec<PriceVersion>>> = Map::default();
        for (provider, model, version) in rows {
            if version.currency != currency {
                return Err(ForeignPrice {
                    provider,
                    model,
                    effective_from: version.effective_from,
                    currency: version.currency,
                    book_currency: currency.into(),
                });
            }
            by_model
                .entry(provider)
                .or_default()
                .entry(model)
                .or_default()
                .push(version);
        }
        for versions in by_model.values_mut().flat_map(Map::values_mut) {
            versions.sort_by_key(|v| v.effective_from);
        }
        Ok(Self {
            currency: currency.into(),
            by_model,
        })
    }

    /// The one currency of every price, cost and total.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The version in force at `at`: the latest with `effective_from <= at`.
    pub fn price_at(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<&PriceVersion> {
        let versions = self.by_model.get(provider)?.get(model)?;
        let idx = versions.partition_point(|v| v.effective_from <= at);
        idx.checked_sub(1).map(|i| &versions[i])
    }

    pub fn len(&self) -> usize {
        self.by_model
            .values()
            .flat_map(Map::values)
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn price(
        input: &str,
        cached: &str,
        write: &str,
        output: &str,
        reasoning: &str,
    ) -> PriceVersion {
        PriceVersion {
            effective_from: Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
            currency: "USD".into(),
            input_per_m: Decimal::from_str(input).unwrap(),
            cached_input_per_m: Decimal::from_str(cached).unwrap(),
            cache_write_per_m: Decimal::from_str(write).unwrap(),
            output_per_m: Decimal::from_str(output).unwrap(),
            reasoning_per_m: Decimal::from_str(reasoning).unwrap(),
        }
    }

    #[test]
    fn every_class_is_priced_including_cache_writes() {
        let p = price("2.5", "1.25", "3.75", "10", "10");
        let t = Tokens {
            input: 1000,
            cached_input: 2000,
            cache_write: 400,
            output: 300,
            reasoning: 200,
        };
        // 2500 + 2500 + 1500 + 3000 + 2000 = 11500 / 1e6
        assert_eq!(cost_of(&t, &p), Decimal::from_str("0.0115").unwrap());
        let only_write = Tokens {
            cache_write: 1_000_000,
            ..Tokens::default()
        };
        assert_eq!(cost_of(&only_write, &p), Decimal::from_str("3.75").unwrap());
    }

    #[test]
    fn tiny_prices_are_exact() {
        let p = price("0.075", "0.01875", "0", "0.3", "0");
        let t = Tokens {
            input: 1,
            cached_input: 1,
            cache_write: 0,
            output: 1,
            reasoning: 0,
        };
        assert_eq!(cost_of(&t, &p), Decimal::from_str("0.00000039375").unwrap());
    }

    #[test]
    fn price_versions_by_time() {
        let mut old = price("1", "0", "0", "0", "0");
        old.effective_from = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        let mut new = price("2", "0", "0", "0", "0");
        new.effective_from = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let book = PriceBook::new(
            "USD",
            [
                ("p".to_string(), "m".to_string(), new.clone()),
                ("p".to_string(), "m".to_string(), old.clone()),
            ],
        )
        .unwrap();
        assert_eq!(
            book.price_at("p", "m", Utc.with_ymd_and_hms(2019, 1, 1, 0, 0, 0).unwrap()),
            None
        );
        assert_eq!(
            book.price_at(
                "p",
                "m",
                Utc.with_ymd_and_hms(2026, 5, 31, 23, 59, 59).unwrap()
            ),
            Some(&old)
        );
        assert_eq!(book.price_at("p", "m", new.effective_from), Some(&new));
        assert_eq!(book.price_at("p", "x", new.effective_from), None);
    }

    #[test]
    fn a_price_in_another_currency_is_rejected_by_name() {
        let usd = price("1", "0", "0", "0", "0");
        let mut eur = price("2", "0", "0", "0", "0");
        eur.currency = "EUR".into();
        eur.effective_from = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let err = PriceBook::new(
            "USD",
            [
                ("p".to_string(), "m".to_string(), usd.clone()),
                ("p".to_string(), "m".to_string(), eur),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "price row (provider p, model m, effective_from 2026-06-01T00:00:00+00:00) \
             is in EUR but the price book's currency is USD"
        );
        let book = PriceBook::new("USD", [("p".to_string(), "m".to_string(), usd)]).unwrap();
        assert_eq!(book.currency(), "USD");
        assert_eq!(PriceBook::default().currency(), "USD");
    }

    #[test]
    fn mismatch_tolerance() {
        let tol = Decimal::from_str("0.01").unwrap();
        let c = Decimal::from_str("1.00").unwrap();
        assert!(!is_mismatch(None, c, tol));
        assert!(!is_mismatch(
            Some(Decimal::from_str("1.01").unwrap()),
            c,
            tol
        ));
        assert!(is_mismatch(
            Some(Decimal::from_str("1.02").unwrap()),
            c,
            tol
        ));
    }

    fn arb_tokens() -> impl Strategy<Value = Tokens> {
        (
            0i64..100_000_000,
            0i64..100_000_000,
            0i64..100_000_000,
            0i64..100_000_000,
            0i64..100_000_000,
        )
            .prop_map(
                |(input, cached_input, cache_write, output, reasoning)| Tokens {
                    input,
                    cached_input,
                    cache_write,
                    output,
                    reasoning,
                },
            )
    }

    fn arb_price() -> impl Strategy<Value = PriceVersion> {
        // prices with up to 6 decimals, up to 1000 per 1M tokens
        prop::array::uniform5(0i64..1_000_000_000).prop_map(|p| PriceVersion {
            effective_from: Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
            currency: "USD".into(),
            input_per_m: Decimal::new(p[0], 6),
            cached_input_per_m: Decimal::new(p[1], 6),
            cache_write_per_m: Decimal::new(p[2], 6),
            output_per_m: Decimal::new(p[3], 6),
            reasoning_per_m: Decimal::new(p[4], 6),
        })
    }

    fn arb_currency() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["USD", "EUR", "GBP", "JPY"]).prop_map(String::from)
    }

    proptest! {
        /// A book accepts exactly the rows in its currency; a mixed set of rows
        /// is rejected naming a row in a foreign currency, and whatever a book
        /// returns is in its currency.
        #[test]
        fn a_book_never_mixes_currencies(
            book in arb_currency(),
            rows in prop::collection::vec((0u8..3, 0i64..1000, arb_currency(), arb_price()), 0..12),
            at in 0i64..1000,
        ) {
            let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
            let rows: Vec<(String, String, PriceVersion)> = rows
                .into_iter()
                .map(|(m, day, cur, mut p)| {
                    p.effective_from = base + chrono::Duration::days(day);
                    p.currency = cur;
                    ("p".to_string(), format!("m{m}"), p)
                })
                .collect();
            let foreign = rows.iter().find(|r| r.2.currency != book).cloned();
            match (PriceBook::new(&book, rows.clone()), foreign) {
                (Ok(b), None) => {
                    prop_assert_eq!(b.currency(), book.as_str());
                    prop_assert_eq!(b.len(), rows.len());
                    for m in 0..3 {
                        let at = base + chrono::Duration::days(at);
                        if let Some(v) = b.price_at("p", &format!("m{m}"), at) {
                            prop_assert_eq!(&v.currency, &book);
                            prop_assert!(v.effective_from <= at);
                        }
                    }
                }
                (Err(e), Some(f)) => {
                    prop_assert_eq!(&e.currency, &f.2.currency);
                    prop_assert_eq!(&e.book_currency, &book);
                    prop_assert!(e.currency != book);
                    let msg = e.to_string();
                    prop_assert!(msg.contains(&e.model) && msg.contains(&e.currency) && msg.contains(&book));
                }
                (r, f) => prop_assert!(false, "book {book}: {:?} with foreign row {:?}", r.map(|b| b.len()), f),
            }
        }

        #[test]
        fn cost_is_additive_over_events(a in arb_tokens(), b in arb_tokens(), p in arb_price()) {
            let sum = Tokens {
                input: a.input + b.input,
                cached_input: a.cached_input + b.cached_input,
                cache_write: a.cache_write + b.cache_write,
                output: a.output + b.output,
                reasoning: a.reasoning + b.reasoning,
            };
            prop_assert_eq!(cost_of(&a, &p) + cost_of(&b, &p), cost_of(&sum, &p));
        }

        #[test]
        fn cost_is_exact_at_scale_12_and_non_negative(t in arb_tokens(), p in arb_price()) {
            let c = cost_of(&t, &p);
            prop_assert!(c >= Decimal::ZERO);
            prop_assert!(c.scale() <= 12);
            // multiplying back by 1e6 recovers the integer-by-price sum exactly
            let back = c * MILLION;
            let direct = Decimal::from(t.input) * p.input_per_m
                + Decimal::from(t.cached_input) * p.cached_input_per_m
                + Decimal::from(t.cache_write) * p.cache_write_per_m
                + Decimal::from(t.output) * p.output_per_m
                + Decimal::from(t.reasoning) * p.reasoning_per_m;
            prop_assert_eq!(back.normalize(), direct.normalize());
        }
    }
}
