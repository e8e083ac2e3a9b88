//! `tally gen --stream all` against the real broker: every generated message of
//! each stream arrives on its topic, keyed by tenant, and each tenant's messages
//! arrive in the order they were generated (one key, one partition). Unkeyed
//! poison (empty payloads) may land on any partition: only its count is checked.

use chrono::{TimeZone, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::collections::BTreeMap;
use std::time::Duration;
use tally_producers::cli::{configs, run, GenOptions, StreamChoice, Topics};
use tally_producers::{AuditGenerator, Encoding, Generator, Outgoing, PolicyGenerator};
use tally_tests::{read_topic, services_up};

/// Payloads per key, each in stream order, and the number of unkeyed ones.
type ByKey = (BTreeMap<Vec<u8>, Vec<Vec<u8>>>, usize);

fn by_key(pairs: impl Iterator<Item = (Option<Vec<u8>>, Vec<u8>)>) -> ByKey {
    let (mut keyed, mut unkeyed) = (BTreeMap::<_, Vec<_>>::new(), 0);
    for (key, payload) in pairs {
        match key {
            Some(k) => keyed.entry(k).or_default().push(payload),
            None => unkeyed += 1,
        }
    }
    (keyed, unkeyed)
}

fn generated<M: Outgoing>(msgs: impl Iterator<Item = M>) -> ByKey {
    by_key(msgs.map(|m| (m.key().map(<[u8]>::to_vec), m.payload().to_vec())))
}

#[tokio::test]
async fn all_streams_arrive_in_tenant_order() -> anyhow::Result<()> {
    services_up();
    let brokers =
        std::env::var("TALLY__KAFKA__BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let run_id = format!("{}.{}", std::process::id(), Utc::now().timestamp_micros());
    let name = |stream: &str| format!("t.gen_streams.{run_id}.{stream}");
    let topics = Topics {
        usage: name("usage"),
        policy: name("policy"),
        audit: name("audit"),
    };
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = [&topics.usage, &topics.policy, &topics.audit]
        .into_iter()
        .map(|t| NewTopic::new(t, 4, TopicReplication::Fixed(1)))
        .collect();
    let timeout = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    for created in admin.create_topics(&new, &timeout).await? {
        created.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }

    let opts = GenOptions {
        stream: StreamChoice::All,
        count: 1_500,
        rate: None,
        encoding: Encoding::Mixed,
        duplicates: 0.05,
        late: 0.01,
        malformed: 0.05,
        seed: 77,
        tenants: 8,
        opa_share: 0.3,
        topic: None,
        price_change_at: Utc.with_ymd_and_hms(2026, 2, 1, 12, 0, 0).unwrap(),
    };
    let reports = run(&tally_producers::connection(&brokers), &topics, &opts).await?;
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|(_, r)| r.sent == 1_500), "{reports:?}");

    let c = configs(&opts);
    let (usage, policy, audit) = (c.usage.unwrap(), c.policy.unwrap(), c.audit.unwrap());
    let want = [
        (&topics.usage, generated(Generator::new(usage))),
        (&topics.policy, generated(PolicyGenerator::new(policy))),
        (&topics.audit, generated(AuditGenerator::new(audit))),
    ];
    for (topic, want) in want {
        let got = read_topic(&brokers, topic, 1_500, Duration::from_secs(60))?;
        assert_eq!(got.len(), 1_500, "{topic}");
        let got = by_key(got.into_iter().map(|m| (m.key, m.payload)));
        assert!(want.0.len() >= 8, "{topic}: {} keys", want.0.len());
        assert_eq!(got.1, want.1, "{topic}: unkeyed messages");
        assert!(
            got.0 == want.0,
            "{topic}: a tenant's messages arrived out of order"
        );
    }
    Ok(())
}
