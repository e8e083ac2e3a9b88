//! Consumer-group rebalance notifications, handed from librdkafka's callbacks
//! (which must not block) to the pipeline loop. Guarantee: a revoked partition
//! whose batch is still running keeps its Postgres lock until that batch ends,
//! so the next owner can only start after it (and replays it if it failed).

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use std::sync::{Arc, Mutex};

/// Rebalance notifications, handed from librdkafka's callback to the loop.
#[derive(Default)]
pub struct RebalanceLog {
    events: Mutex<Vec<(bool, Vec<i32>)>>,
}

pub struct TallyContext {
    pub log: Arc<RebalanceLog>,
    pub topic: String,
}

impl ClientContext for TallyContext {
    /// With `enable.partition.eof` the end of a partition reaches the context
    /// too: it is an event (`pipeline.rs` handles it), not an error.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if !matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for TallyContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = r {
            self.push(false, tpl);
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            self.push(true, tpl);
        }
    }
}

impl RebalanceLog {
    /// Takes the notifications recorded so far: (assigned?, partitions).
    pub fn take(&self) -> Vec<(bool, Vec<i32>)> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }
}

impl TallyContext {
    fn push(&self, assigned: bool, tpl: &TopicPartitionList) {
        let parts: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        tracing::info!(assigned, partitions = ?parts, "rebalance");
        if let Ok(mut ev) = self.log.events.lock() {
            ev.push((assigned, parts));
        }
    }
}
