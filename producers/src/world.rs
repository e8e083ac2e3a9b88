//! The reference data of a demo/test world: tenants with teams, projects and
//! per-minute quotas, a versioned price table, budgets, plus the "dirty" ids
//! events may carry that have no reference data (an unpriced model, an
//! unknown tenant).
//!
//! [`demo_world`] is fully deterministic: the same arguments always give the
//! same world. Its quotas and budget amounts are sized against a reference run
//! of [`REFERENCE_RUN_EVENTS`] events spread over [`REFERENCE_RUN_MINUTES`]
//! minutes of event time with the default generator settings (see
//! `gen::GenConfig::new`), so that in such a run the biggest tenants exceed
//! their request quota in some minutes and a good share of budgets cross
//! their thresholds.

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

/// Events in the reference run the quotas and budgets are sized for.
pub const REFERENCE_RUN_EVENTS: i64 = 200_000;
/// Event-time minutes the reference run spreads over (the default 2 h span).
pub const REFERENCE_RUN_MINUTES: i64 = 120;

/// A tenant and its quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpec {
    pub tenant_id: String,
    pub name: String,
    pub teams: Vec<String>,
    pub projects: Vec<String>,
    /// Relative traffic weight (the generator picks tenants proportionally).
    pub weight: u32,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
}

/// One version of a model's price, per one million tokens of each class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSpec {
    pub provider: String,
    pub model: String,
    pub effective_from: DateTime<Utc>,
    pub currency: String,
    pub input_per_m: Decimal,
    pub cached_input_per_m: Decimal,
    pub cache_write_per_m: Decimal,
    pub output_per_m: Decimal,
    pub reasoning_per_m: Decimal,
}

impl PriceSpec {
    /// Exact cost of the given token counts at this price (no rounding).
    pub fn cost(
        &self,
        input: i64,
        cached_input: i64,
        cache_write: i64,
        output: i64,
        reasoning: i64,
    ) -> Decimal {
        let sum = Decimal::from(input) * self.input_per_m
            + Decimal::from(cached_input) * self.cached_input_per_m
            + Decimal::from(cache_write) * self.cache_write_per_m
            + Decimal::from(output) * self.output_per_m
            + Decimal::from(reasoning) * self.reasoning_per_m;
        sum / Decimal::from(1_000_000)
    }
}

/// What a budget is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Tenant,
    Team,
}

impl BudgetScope {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::Tenant => "tenant",
            BudgetScope::Team => "team",
        }
    }
}

/// The (UTC calendar) period a budget resets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// A spend budget with alert thresholds (percent of `amount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSpec {
    pub budget_id: String,
    pub scope: BudgetScope,
    pub tenant_id: String,
    /// `Some` exactly when `scope` is [`BudgetScope::Team`].
    pub team_id: Option<String>,
    pub period: BudgetPeriod,
    pub amount: Decimal,
    pub thresholds_pct: Vec<Decimal>,
}

/// Everything the pipeline's reference tables hold for one world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub tenants: Vec<TenantSpec>,
    /// Price versions; the first appearance order of (provider, model) is the
    /// generator's popularity order (most popular first).
    pub prices: Vec<PriceSpec>,
    pub budgets: Vec<BudgetSpec>,
    /// (provider, model) pairs events may use that have no price.
    pub unpriced: Vec<(String, String)>,
    /// Tenant ids events may use that are NOT in `tenants`.
    pub unknown_tenants: Vec<String>,
}

impl World {
    /// Distinct priced (provider, model) pairs in first-appearance order.
    pub fn priced_models(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for p in &self.prices {
            if !out.iter().any(|(pr, m)| *pr == p.provider && *m == p.model) {
                out.push((p.provider.clone(), p.model.clone()));
            }
        }
        out
    }

    /// The price version of (provider, model) in effect at `at`, if any.
    pub fn price_at(&self, provider: &str, model: &str, at: DateTime<Utc>) -> Option<&PriceSpec> {
        self.prices
            .iter()
            .filter(|p| p.provider == provider && p.model == model && p.effective_from <= at)
            .max_by_key(|p| p.effective_from)
    }

    /// The tenant with this id, if it is a known one.
    pub fn tenant(&self, tenant_id: &str) -> Option<&TenantSpec> {
        self.tenants.iter().find(|t| t.tenant_id == tenant_id)
    }
}

/// Whether a model bills separate reasoning tokens (the generator only gives
/// reasoning tokens to these).
pub fn is_reasoning_model(model: &str) -> bool {
    let b = model.as_bytes();
    (b.len() >= 2 && b[0] == b'o' && b[1].is_ascii_digit())
        || model.contains("reasoner")
        || model.starts_with("gemini-2.5")
}

fn dec(s: &str) -> Decimal {
    s.parse()
        .unwrap_or_else(|e| panic!("bad decimal literal {s:?}: {e}"))
}

/// (provider, model, input, cached input, cache write, output) per 1M tokens,
/// most popular first. Reasoning tokens bill at the output price.
const MODELS: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("openai", "gpt-4o-mini", "0.15", "0.075", "0.15", "0.60"),
    ("anthropic", "claude-haiku", "0.80", "0.08", "1.00", "4.00"),
    (
        "google",
        "gemini-2.0-flash",
        "0.10",
        "0.025",
        "0.10",
        "0.40",
    ),
    ("openai", "gpt-4o", "2.50", "1.25", "2.50", "10.00"),
    (
        "anthropic",
        "claude-sonnet-4",
        "3.00",
        "0.30",
        "3.75",
        "15.00",
    ),
    ("openai", "o3-mini", "1.10", "0.55", "1.10", "4.40"),
    ("google", "gemini-2.5-pro", "1.25", "0.31", "1.25", "10.00"),
    ("mistral", "mistral-large", "2.00", "2.00", "2.00", "6.00"),
    (
        "deepseek",
        "deepseek-reasoner",
        "0.55",
        "0.14",
        "0.55",
        "2.19",
    ),
    (
        "anthropic",
        "claude-opus-4",
        "15.00",
        "1.50",
        "18.75",
        "75.00",
    ),
];

/// Models that get a second, 20% cheaper price version at `price_change_at`.
const REPRICED: &[&str] = &["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"];

const NAME_A: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Wonka",
    "Vandelay",
    "Pied Piper",
    "Aperture",
    "Massive",
    "Oscorp",
];
const NAME_B: &[&str] = &[
    "Labs",
    "Corp",
    "Systems",
    "Analytics",
    "Health",
    "Robotics",
    "AI",
];

/// Spend/amount ratios the reference run should reach, cycled over budgets:
/// 8/10 cross 50%, 3/10 cross 80%, 1/10 crosses 100%.
const TENANT_BUDGET_TARGETS: &[&str] = &[
    "0.60", "0.90", "0.55", "0.35", "1.30", "0.70", "0.85", "0.65", "0.45", "0.75",
];
const TEAM_BUDGET_TARGETS: &[&str] = &["0.70", "0.40", "0.95", "0.60", "1.20", "0.55"];

/// Zipf-like weight of the tenant at 0-based `rank`.
fn tenant_weight(rank: usize) -> u32 {
    let r = u32::try_from(rank)
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1);
    (100_000 / r).max(1)
}

/// A deterministic demo world with `n_tenants` tenants (at least 1) whose
/// first three priced models get a cheaper price from `price_change_at`.
pub fn demo_world(n_tenants: usize, price_change_at: DateTime<Utc>) -> World {
    let n = n_tenants.max(1);
    let epoch = Utc
        .with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
        .single()
        .expect("valid epoch");

    let mut prices = Vec::new();
    for &(provider, model, input, cached, cache_write, output) in MODELS {
        let base = PriceSpec {
            provider: provider.to_string(),
            model: model.to_string(),
            effective_from: epoch,
            currency: "USD".to_string(),
            input_per_m: dec(input),
            cached_input_per_m: dec(cached),
            cache_write_per_m: dec(cache_write),
            output_per_m: dec(output),
            reasoning_per_m: dec(output),
        };
        let repriced = REPRICED.contains(&model).then(|| {
            let f = dec("0.8");
            PriceSpec {
                effective_from: price_change_at,
                input_per_m: (base.input_per_m * f).normalize(),
                cached_input_per_m: (base.cached_input_per_m * f).normalize(),
                cache_write_per_m: (base.cache_write_per_m * f).normalize(),
                output_per_m: (base.output_per_m * f).normalize(),
                reasoning_per_m: (base.reasoning_per_m * f).normalize(),
                ..base.clone()
            }
        });
        prices.push(base);
        prices.extend(repriced);
    }

    let total_weight: i64 = (0..n).map(|i| i64::from(tenant_weight(i))).sum();
    let events_per_minute = REFERENCE_RUN_EVENTS / REFERENCE_RUN_MINUTES;
    let mut tenants = Vec::with_capacity(n);
    for i in 0..n {
        let weight = tenant_weight(i);
        let n_teams = if i < 3 { 4 } else { 1 + (i * 7 + 3) % 4 };
        let n_projects = if i < 3 { 3 } else { 1 + (i * 5 + 1) % 3 };
        let teams = (0..n_teams)
            .map(|t| format!("team-{}", char::from(b'a' + u8::try_from(t).unwrap_or(0))))
            .collect();
        let projects = (0..n_projects).map(|p| format!("proj-{}", p + 1)).collect();
        // Mean requests per event-minute of this tenant in the reference run.
        let mean_rpm = (events_per_minute * i64::from(weight) / total_weight).max(1);
        let mean_tpm = mean_rpm * crate::gen::MEAN_TOKENS_PER_EVENT;
        // The biggest tenants sit just above their mean (bursts push them
        // over); everyone else has plenty of headroom.
        let (requests_per_minute, tokens_per_minute) = if i < 3 {
            (mean_rpm * 13 / 10, mean_tpm * 14 / 10)
        } else {
            ((mean_rpm * 5).max(60), (mean_tpm * 6).max(500_000))
        };
        let name = if i < NAME_A.len() * NAME_B.len() {
            format!(
                "{} {}",
                NAME_A[i % NAME_A.len()],
                NAME_B[(i / NAME_A.len() + i) % NAME_B.len()]
            )
        } else {
            format!("Tenant {:03}", i + 1)
        };
        tenants.push(TenantSpec {
            tenant_id: format!("t-{:03}", i + 1),
            name,
            teams,
            projects,
            weight,
            requests_per_minute,
            tokens_per_minute,
        });
    }

    let world_no_budgets = World {
        tenants,
        prices,
        budgets: Vec::new(),
        unpriced: vec![("acme".to_string(), "mystery-1".to_string())],
        unknown_tenants: vec!["t-unknown".to_string()],
    };
    let budgets = demo_budgets(&world_no_budgets, total_weight);
    World {
        budgets,
        ..world_no_budgets
    }
}

/// Budgets sized from the expected reference-run spend of each tenant/team.
fn demo_budgets(world: &World, total_weight: i64) -> Vec<BudgetSpec> {
    let cost_per_event = crate::gen::expected_cost_per_event(world);
    let run_spend = cost_per_event * Decimal::from(REFERENCE_RUN_EVENTS);
    let thresholds = vec![Decimal::from(50), Decimal::from(80), Decimal::from(100)];
    let min_amount = dec("0.01");
    let mut budgets = Vec::new();
    let mut team_budgets = 0usize;
    for (i, t) in world.tenants.iter().enumerate() {
        let tenant_spend = run_spend * Decimal::from(t.weight) / Decimal::from(total_weight);
        let target = dec(TENANT_BUDGET_TARGETS[i % TENANT_BUDGET_TARGETS.len()]);
        budgets.push(BudgetSpec {
            budget_id: format!("b-{}-day", t.tenant_id),
            scope: BudgetScope::Tenant,
            tenant_id: t.tenant_id.clone(),
            team_id: None,
            period: BudgetPeriod::Day,
            amount: (tenant_spend / target).round_dp(2).max(min_amount),
            thresholds_pct: thresholds.clone(),
        });
        // A monthly budget for the first team of every tenant with 2+ teams.
        if t.teams.len() >= 2 {
            let team = &t.teams[0];
            let team_spend = tenant_spend * crate::gen::TEAM_SET_PCT
                / Decimal::from(100)
                / Decimal::from(t.teams.len());
            let target = dec(TEAM_BUDGET_TARGETS[team_budgets % TEAM_BUDGET_TARGETS.len()]);
            team_budgets += 1;
            budgets.push(BudgetSpec {
                budget_id: format!("b-{}-{}-month", t.tenant_id, team),
                scope: BudgetScope::Team,
                tenant_id: t.tenant_id.clone(),
                team_id: Some(team.clone()),
                period: BudgetPeriod::Month,
                amount: (team_spend / target).round_dp(2).max(min_amount),
                thresholds_pct: thresholds.clone(),
            });
        }
    }
    budgets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        demo_world(20, Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap())
    }

    #[test]
    fn deterministic_and_well_formed() {
        let w = world();
        assert_eq!(w, world());
        assert_eq!(w.tenants.len(), 20);
        assert_eq!(w.tenants[0].tenant_id, "t-001");
        assert!(w.tenants[0].weight > 5 * w.tenants[10].weight);
        for t in &w.tenants {
            assert!((1..=4).contains(&t.teams.len()));
            assert!((1..=3).contains(&t.projects.len()));
            assert!(t.requests_per_minute > 0 && t.tokens_per_minute > 0);
        }
        assert!(w.unknown_tenants.iter().all(|u| w.tenant(u).is_none()));
        assert!(w.budgets.iter().all(|b| b.amount > Decimal::ZERO));
        assert!(w.budgets.iter().any(|b| b.scope == BudgetScope::Team));
        assert_eq!(
            w.budgets
                .iter()
                .filter(|b| b.scope == BudgetScope::Tenant)
                .count(),
            20
        );
    }

    #[test]
    fn price_versions() {
        let w = world();
        let change = Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap();
        let before = w
            .price_at("openai", "gpt-4o", change - chrono::Duration::seconds(1))
            .unwrap();
        let after = w.price_at("openai", "gpt-4o", change).unwrap();
        assert_eq!(before.input_per_m, dec("2.50"));
        assert_eq!(after.input_per_m, dec("2.00"));
        let versioned = w
            .priced_models()
            .iter()
            .filter(|(p, m)| {
                w.prices
                    .iter()
                    .filter(|x| x.provider == *p && x.model == *m)
                    .count()
                    > 1
            })
            .count();
        assert!(versioned >= 2);
        assert!(w.price_at("acme", "mystery-1", change).is_none());
        assert!(is_reasoning_model("o3-mini") && !is_reasoning_model("gpt-4o"));
    }
}
