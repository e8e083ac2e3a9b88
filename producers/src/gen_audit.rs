//! Deterministic synthetic audit traffic (`audit.event.v1`): users, services,
//! API keys and the system acting on a tenant's resources, with personal-data
//! access, privileged actions, failure bursts, duplicates and poison.
//!
//! Guarantee: an [`AuditGenerator`] is a pure function of its
//! [`AuditGenConfig`] (the same config yields byte-identical messages). Each
//! message is tagged with what the consumer must make of it ([`GenKind`],
//! [`Wire`]) and, unless it is poison, carries the event the pipeline must log.
//! A duplicate repeats an earlier event exactly (maybe in another encoding).
//! Messages are keyed by tenant id, so a tenant's events keep their order within
//! a partition, which is the order of its Merkle log.
//!
//! The actors of a tenant ([`tenant_actors`]) and who holds personal-data grants
//! ([`audit_grants`]) depend on the tenant id only. In one event-time minute in
//! four, a share ([`AuditGenConfig::failure_burst`]) of the messages are failed
//! or denied logins (API-key calls) of one actor, so `failed_action_burst` fires.

use crate::common::{
    chance, encode, hash_str, mix, one_of, pct, stream_iterator, threshold, uuid, Core, History,
    StreamConfig, StreamMessage, Tenant, Wire,
};
use crate::gen::GenKind;
use crate::malformed::{build_from, AUDIT_CATALOG};
use crate::world::World;
use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::json;
use std::collections::BTreeMap;
use tally_schemas::{ActorType, AuditEvent, Outcome};

/// One message of the audit stream.
pub type AuditMessage = StreamMessage<AuditEvent>;

/// Keeps this stream's draws apart from other streams of the same seed.
const SALT: u64 = 0x0061_7564_6974_0000;

/// Actions worth a `privileged_action` record (configure the rule with these).
pub const PRIVILEGED_ACTIONS: &[&str] = &[
    "role.grant",
    "role.revoke",
    "apikey.create",
    "apikey.revoke",
    "tenant.delete",
    "data.export",
];

// Who may perform an action (bit set of actor roles).
const USER: u8 = 1;
const ADMIN: u8 = 2;
const SERVICE: u8 = 4;
const KEY: u8 = 8;
const SYSTEM: u8 = 16;

/// An action: (name, resource type, percent of events touching personal data,
/// relative weight, who may perform it).
type ActionSpec = (&'static str, &'static str, u32, u32, u8);

const ACTIONS: &[ActionSpec] = &[
    (
        "conversation.read",
        "conversation",
        100,
        180,
        USER | SERVICE,
    ),
    ("user.read", "user", 100, 100, USER | KEY),
    ("user.update", "user", 100, 40, USER),
    ("prompt_log.view", "prompt_log", 80, 60, USER),
    ("model.invoke", "model", 0, 250, SERVICE | KEY),
    ("settings.read", "settings", 0, 100, USER | SERVICE | KEY),
    ("budget.update", "budget", 0, 30, ADMIN),
    ("login", "session", 0, 100, USER),
    ("data.export", "dataset", 60, 20, USER | SERVICE),
    ("role.grant", "role", 0, 10, ADMIN),
    ("role.revoke", "role", 0, 6, ADMIN),
    ("apikey.create", "api_key", 0, 8, ADMIN),
    ("apikey.revoke", "api_key", 0, 5, ADMIN),
    ("retention.purge", "dataset", 0, 20, SYSTEM),
    ("tenant.delete", "tenant", 0, 1, ADMIN),
];

const BROWSERS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
];
const SDKS: &[&str] = &[
    "python-requests/2.32.3",
    "curl/8.5.0",
    "openai-python/1.40.0",
    "tally-sdk-go/0.9.1",
];
const SERVICES: &[&str] = &["svc-billing", "svc-support-bot", "svc-etl", "svc-gateway"];
const USERS_PER_TENANT: usize = 12;
const KEYS_PER_TENANT: usize = 3;

/// One principal of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub actor_type: ActorType,
    pub actor_id: String,
    /// The user an API key belongs to (its events' `user_id`).
    pub owner: Option<String>,
    /// Where the actor usually connects from (`None` for the system).
    pub ip: Option<String>,
    roles: u8,
}

/// The actors of a tenant, the same for every seed: users (the first two are
/// admins, the next two support staff), services, API keys, the system.
pub fn tenant_actors(tenant_id: &str) -> Vec<Actor> {
    let h = hash_str(tenant_id);
    let octet = |i: u64| mix(h ^ i) % 250 + 1;
    let mut out = Vec::new();
    for n in 0..USERS_PER_TENANT {
        let roles = if n < 2 { USER | ADMIN } else { USER };
        out.push(Actor {
            actor_type: ActorType::User,
            actor_id: format!("user-{n:02}@{tenant_id}.example.com"),
            owner: None,
            ip: Some(format!("203.0.113.{}", octet(n as u64))),
            roles,
        });
    }
    for (i, s) in SERVICES.iter().enumerate() {
        out.push(Actor {
            actor_type: ActorType::Service,
            actor_id: (*s).to_string(),
            owner: None,
            ip: Some(format!("10.{}.0.{}", h % 200, i + 10)),
            roles: SERVICE,
        });
    }
    for n in 0..KEYS_PER_TENANT {
        out.push(Actor {
            actor_type: ActorType::ApiKey,
            actor_id: format!("ak_{:08x}", mix(h ^ (100 + n as u64)) & 0xFFFF_FFFF),
            owner: Some(format!("user-{:02}@{tenant_id}.example.com", n + 4)),
            ip: match n {
                0 => Some(format!("2001:db8:{:x}::{:x}", h & 0xFFFF, n + 1)),
                _ => Some(format!("198.51.100.{}", octet(100 + n as u64))),
            },
            roles: KEY,
        });
    }
    out.push(Actor {
        actor_type: ActorType::System,
        actor_id: "system".into(),
        owner: None,
        ip: None,
        roles: SYSTEM,
    });
    out
}

/// The resource types (`*`: all) the actor at position `i` of
/// [`tenant_actors`] may touch personal data of.
fn grants_of(i: usize) -> &'static [&'static str] {
    match i {
        0 | 1 => &["*"],
        2 | 3 => &["user", "conversation"],
        _ if i == USERS_PER_TENANT + 1 => &["conversation"],
        _ if i == USERS_PER_TENANT + 2 => &["dataset"],
        _ => &[],
    }
}

fn granted(i: usize, resource_type: &str) -> bool {
    grants_of(i)
        .iter()
        .any(|g| *g == "*" || *g == resource_type)
}

/// Personal-data grants of every tenant of `world`: (tenant, actor id as sent,
/// resource type or `*`). Admins hold `*`, support staff `user` and
/// `conversation`, the support bot `conversation`, the ETL service `dataset`.
/// Most personal-data events come from a granted actor; the rest raise
/// `personal_data_access`.
pub fn audit_grants(world: &World) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in Tenant::all(world) {
        for (i, a) in tenant_actors(&t.id).into_iter().enumerate() {
            for g in grants_of(i) {
                out.push((t.id.clone(), a.actor_id.clone(), (*g).to_string()));
            }
        }
    }
    out
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct AuditGenConfig {
    pub stream: StreamConfig,
    /// Share of the messages of a burst minute that are failures of the
    /// minute's actor.
    pub failure_burst: f64,
    /// Share of good events with an oversized user agent or details (cut to the
    /// configured limits by the pipeline).
    pub oversize: f64,
}

impl AuditGenConfig {
    /// [`StreamConfig::new`] defaults, 20% of a burst minute's messages in its
    /// failure burst, 0.2% oversized events.
    pub fn new(world: World, count: u64, seed: u64) -> Self {
        AuditGenConfig {
            stream: StreamConfig::new(world, count, seed),
            failure_burst: 0.2,
            oversize: 0.002,
        }
    }
}

/// The deterministic message stream of one [`AuditGenConfig`].
pub struct AuditGenerator {
    cfg: AuditGenConfig,
    core: Core,
    tenants: Vec<Tenant>,
    actors: Vec<Vec<Actor>>,
    action_cum: Vec<u64>,
    history: History<AuditEvent>,
    malformed_next: usize,
    t_burst: u64,
    t_oversize: u64,
}

/// `resource_id` of an event on `resource_type`.
fn resource_id(rng: &mut SmallRng, resource_type: &str, tenant_id: &str) -> String {
    match resource_type {
        "user" => format!("usr_{:04}", rng.random_range(0..5_000u32)),
        "conversation" => format!("conv-{:012x}", rng.random::<u64>() >> 16),
        "prompt_log" => format!("plog-{:012x}", rng.random::<u64>() >> 16),
        "model" => one_of(rng, &["gpt-4o-mini", "claude-haiku", "gemini-2.0-flash"]).to_string(),
        "budget" => format!("budget-{}", rng.random_range(1..=6u32)),
        "session" => format!("sess-{:016x}", rng.random::<u64>()),
        "dataset" => format!("ds-{}", rng.random_range(1..=40u32)),
        "role" => one_of(rng, &["role-admin", "role-editor", "role-viewer"]).to_string(),
        "api_key" => format!("ak_{:08x}", rng.random::<u32>()),
        "tenant" => tenant_id.to_string(),
        _ => "tenant-settings".to_string(),
    }
}

/// `details` JSON of an event.
fn details(rng: &mut SmallRng, action: &str, outcome: Outcome) -> String {
    let v = match (action, outcome) {
        ("login", Outcome::Failure) => {
            json!({"method": "password", "error": "invalid_credentials"})
        }
        (_, Outcome::Denied) => json!({"error": "forbidden", "missing_permission": action}),
        (_, Outcome::Failure) => json!({"error": "internal", "retryable": true}),
        ("login", _) => {
            json!({"method": one_of(rng, &["password", "sso", "passkey"]), "mfa": pct(rng, 70)})
        }
        ("role.grant" | "role.revoke", _) => {
            json!({"grantee": format!("usr_{:04}", rng.random_range(0..5_000u32)), "scope": "tenant"})
        }
        ("data.export", _) => {
            json!({"format": one_of(rng, &["csv", "parquet"]), "rows": rng.random_range(1..2_000_000u32)})
        }
        ("budget.update", _) => {
            json!({"old": "100", "new": rng.random_range(100..5_000u32).to_string()})
        }
        ("model.invoke", _) => json!({"tokens": rng.random_range(10..20_000u32)}),
        ("tenant.delete", _) => json!({"confirmation": "typed", "grace_days": 30}),
        _ => json!({}),
    };
    v.to_string()
}

impl AuditGenerator {
    pub fn new(cfg: AuditGenConfig) -> Self {
        let tenants = Tenant::all(&cfg.stream.world);
        let actors = tenants.iter().map(|t| tenant_actors(&t.id)).collect();
        AuditGenerator {
            core: Core::new(&cfg.stream, SALT),
            tenants,
            actors,
            action_cum: crate::common::cumulative(ACTIONS.iter().map(|a| u64::from(a.3))),
            history: History::new(),
            malformed_next: 0,
            t_burst: threshold(cfg.failure_burst),
            t_oversize: threshold(cfg.oversize),
            cfg,
        }
    }

    /// The config this generator was built from.
    pub fn config(&self) -> &AuditGenConfig {
        &self.cfg
    }

    /// (tenant, actor, action, outcome, burst ip) of the next event.
    fn subject(&mut self) -> (usize, usize, &'static ActionSpec, Outcome, Option<String>) {
        let burst = self.core.burst(self.cfg.stream.seed ^ SALT);
        let in_burst = chance(&mut self.core.rng, self.t_burst);
        if let (Some(h), true) = (burst, in_burst) {
            // A non-admin user or an API key failing again and again from one address.
            let top = self.tenants.len().min(3) as u64;
            let t = usize::try_from((h >> 16) % top).unwrap_or(0);
            let candidates = (USERS_PER_TENANT - 4 + KEYS_PER_TENANT) as u64;
            let c = usize::try_from((h >> 32) % candidates).unwrap_or(0);
            let a = if c < USERS_PER_TENANT - 4 {
                4 + c
            } else {
                USERS_PER_TENANT + SERVICES.len() + c - (USERS_PER_TENANT - 4)
            };
            let action = if a < USERS_PER_TENANT {
                "login"
            } else {
                "model.invoke"
            };
            let spec = ACTIONS
                .iter()
                .find(|s| s.0 == action)
                .unwrap_or(&ACTIONS[0]);
            let outcome = if pct(&mut self.core.rng, 60) {
                Outcome::Failure
            } else {
                Outcome::Denied
            };
            return (
                t,
                a,
                spec,
                outcome,
                Some(format!("192.0.2.{}", h % 250 + 1)),
            );
        }
        let t = self.core.tenant().min(self.tenants.len() - 1);
        let spec = &ACTIONS[crate::common::pick(&mut self.core.rng, &self.action_cum)];
        let rng = &mut self.core.rng;
        // Personal data is mostly touched by someone with a grant for it.
        let want_grant = spec.2 > 0 && pct(rng, 80);
        let mut candidates: Vec<usize> = self.actors[t]
            .iter()
            .enumerate()
            .filter(|(_, a)| a.roles & spec.4 != 0)
            .map(|(i, _)| i)
            .collect();
        if want_grant && candidates.iter().any(|i| granted(*i, spec.1)) {
            candidates.retain(|i| granted(*i, spec.1));
        }
        let a = candidates
            .get(rng.random_range(0..candidates.len().max(1)))
            .copied()
            .unwrap_or(0);
        let failing = if spec.0 == "login" { 12 } else { 5 };
        let outcome = match rng.random_range(0..100u32) {
            x if x < 90 - failing => Outcome::Success,
            x if x < 90 => Outcome::Failure,
            93.. if pct(rng, 50) => Outcome::Partial,
            93.. => Outcome::Pending,
            _ => Outcome::Denied,
        };
        (t, a, spec, outcome, None)
    }

    /// Draws a fresh, valid event at the current cursor.
    fn sample(&mut self) -> AuditEvent {
        let occurred_at = self.core.occurred_at(self.cfg.stream.start);
        let (t, a, spec, outcome, burst_ip) = self.subject();
        let oversize = chance(&mut self.core.rng, self.t_oversize);
        let rng = &mut self.core.rng;
        let (tenant, actor) = (&self.tenants[t], &self.actors[t][a]);
        let ip = burst_ip.or_else(|| match actor.actor_type {
            ActorType::User if pct(rng, 10) => {
                Some(format!("203.0.113.{}", rng.random_range(1..=254u32)))
            }
            _ if pct(rng, 5) => None,
            _ => actor.ip.clone(),
        });
        let mut user_agent = match actor.actor_type {
            ActorType::User => Some(one_of(rng, BROWSERS).to_string()),
            ActorType::Service => Some(format!("tally-svc/1.4 ({})", actor.actor_id)),
            ActorType::ApiKey => Some(one_of(rng, SDKS).to_string()),
            ActorType::System => None,
        };
        let mut details = details(rng, spec.0, outcome);
        if oversize {
            if pct(rng, 50) {
                // Multi-byte characters, so a cut must find a character boundary.
                user_agent = Some(format!("Mozilla/5.0 ({})", "Zürich-Ω ".repeat(150)));
            } else {
                let columns: Vec<String> = (0..9_000).map(|i| format!("col_{i}")).collect();
                details = json!({"columns": columns}).to_string();
            }
        }
        let mut tags = BTreeMap::new();
        if pct(rng, 80) {
            let env = if pct(rng, 90) { "prod" } else { "staging" };
            tags.insert("env".to_string(), env.to_string());
        }
        let user_id = match actor.actor_type {
            ActorType::User => Some(actor.actor_id.clone()),
            _ => actor.owner.clone(),
        };
        let source = match actor.actor_type {
            ActorType::User => *one_of(rng, &["console", "admin-api"]),
            ActorType::Service => "svc-mesh",
            ActorType::ApiKey => "gateway",
            ActorType::System => "scheduler",
        };
        AuditEvent {
            event_id: uuid(rng),
            occurred_at,
            tenant_id: tenant.id.clone(),
            team_id: tenant.team(rng),
            project_id: tenant.project(rng),
            user_id,
            source: source.to_string(),
            tags,
            actor_type: actor.actor_type,
            actor_id: actor.actor_id.clone(),
            action: spec.0.to_string(),
            resource_type: spec.1.to_string(),
            resource_id: resource_id(rng, spec.1, &tenant.id),
            outcome,
            ip,
            user_agent,
            details,
            personal_data: pct(rng, spec.2),
        }
    }

    fn message(&mut self, kind: GenKind, e: AuditEvent) -> AuditMessage {
        let s = &self.cfg.stream;
        let (payload, wire) = encode(&mut self.core.rng, s.encoding, s.confluent_schema_id, &e);
        StreamMessage {
            key: Some(e.tenant_id.as_bytes().to_vec()),
            payload,
            kind,
            wire,
            event: Some(e),
        }
    }

    /// Nothing: audit re-sends are single messages.
    fn queued(&mut self) -> Option<AuditMessage> {
        None
    }

    fn good(&mut self) -> AuditMessage {
        let e = self.sample();
        self.history.push(e.clone());
        self.message(GenKind::Good, e)
    }

    fn duplicate(&mut self) -> AuditMessage {
        match self.history.pick(&mut self.core.rng).cloned() {
            Some(e) => self.message(GenKind::Duplicate, e),
            None => self.good(),
        }
    }

    fn malformed(&mut self) -> AuditMessage {
        let e = self.sample();
        let (payload, class) = build_from(AUDIT_CATALOG, self.malformed_next, &e);
        self.malformed_next += 1;
        StreamMessage {
            key: (!payload.is_empty()).then(|| e.tenant_id.as_bytes().to_vec()),
            payload,
            kind: GenKind::Malformed { class },
            wire: Wire::Poison,
            event: None,
        }
    }
}

stream_iterator!(AuditGenerator, AuditMessage);
