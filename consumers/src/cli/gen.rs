//! `tally gen --encoding confluent`: the schema ids its messages carry.
//!
//! Guarantee: with `registry.url` set, every Confluent-framed message `tally gen`
//! sends carries the id the registry returned for the bundled current schema of its
//! stream, registered under the topic's subject (`<topic>-value`, Confluent's
//! TopicNameStrategy) before anything is produced; a registry that refuses the
//! schema stops the command with nothing sent. Without a registry the ids are 1,
//! with a warning.

use crate::config::Config;
use crate::engine::registry_client::RegistryClient;
use anyhow::Context;
use tally_producers::cli::{GenOptions, SchemaIds, StreamChoice, Topics};
use tally_schemas::current_schema_text;

/// Confluent's TopicNameStrategy: the subject of a topic's message values.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Registers the schema of each stream `opts` produces and returns the ids; ids of
/// streams it does not produce stay 1.
pub async fn confluent_schema_ids(
    cfg: &Config,
    topics: &Topics,
    opts: &GenOptions,
) -> anyhow::Result<SchemaIds> {
    let mut ids = SchemaIds::default();
    if cfg.registry.url.trim().is_empty() {
        eprintln!(
            "warning: --encoding confluent without registry.url: the messages carry schema id 1, \
             which only decodes if the registry tally reads from has exactly this stream's schema \
             under id 1 (set registry.url / TALLY__REGISTRY__URL to register it and use its id)"
        );
        return Ok(ids);
    }
    let client = RegistryClient::from_config(&cfg.registry)?;
    let streams = [
        (
            StreamChoice::Usage,
            "llm.usage.v1",
            &topics.usage,
            &mut ids.usage,
        ),
        (
            StreamChoice::Policy,
            "policy.decision.v1",
            &topics.policy,
            &mut ids.policy,
        ),
        (
            StreamChoice::Audit,
            "audit.event.v1",
            &topics.audit,
            &mut ids.audit,
        ),
    ];
    for (stream, schema_subject, default_topic, id) in streams {
        if opts.stream != stream && opts.stream != StreamChoice::All {
            continue;
        }
        let topic = opts.topic.as_ref().unwrap_or(default_topic);
        let subject = value_subject(topic);
        let schema = current_schema_text(schema_subject)
            .with_context(|| format!("no bundled schema for {schema_subject}"))?;
        *id = client
            .register(&subject, schema)
            .await
            .with_context(|| format!("registering the {schema_subject} schema"))?;
        eprintln!("gen: {schema_subject} registered as subject {subject}, schema id {id}");
    }
    Ok(ids)
}
