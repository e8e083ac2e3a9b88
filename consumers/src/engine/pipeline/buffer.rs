//! A partition's buffered messages, in offset order, and what they weigh.
//!
//! Guarantee: `bytes` is always the sum of the weights of the messages held,
//! whatever was pushed, taken or cleared, so the consumer's gate bounds the
//! memory of everything buffered across partitions (`pipeline.buffer_max_bytes`).

use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;

#[derive(Default)]
pub(super) struct Buffer {
    msgs: Vec<OwnedMessage>,
    bytes: usize,
}

/// The heap and inline bytes a buffered message holds: payload, key, topic
/// name, headers and the message itself.
pub(super) fn weight(m: &OwnedMessage) -> usize {
    let headers = m.headers().map_or(0, |h| {
        h.iter()
            .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len) + 48)
            .sum()
    });
    std::mem::size_of::<OwnedMessage>()
        + m.payload().map_or(0, <[u8]>::len)
        + m.key().map_or(0, <[u8]>::len)
        + m.topic().len()
        + headers
}

impl Buffer {
    pub(super) fn push(&mut self, m: OwnedMessage) {
        self.bytes += weight(&m);
        self.msgs.push(m);
    }

    pub(super) fn clear(&mut self) {
        self.msgs.clear();
        self.bytes = 0;
    }

    /// Takes the first `n` messages (all, if fewer are held).
    pub(super) fn take(&mut self, n: usize) -> Vec<OwnedMessage> {
        let n = n.min(self.msgs.len());
        let taken: Vec<OwnedMessage> = self.msgs.drain(..n).collect();
        let gone: usize = taken.iter().map(weight).sum();
        self.bytes -= gone;
        taken
    }

    pub(super) fn len(&self) -> usize {
        self.msgs.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn as_slice(&self) -> &[OwnedMessage] {
        &self.msgs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::Timestamp;

    fn msg(offset: i64, payload: usize, headers: bool) -> OwnedMessage {
        let h = headers.then(|| {
            OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(&[1u8; 55][..]),
            })
        });
        OwnedMessage::new(
            Some(vec![7; payload]),
            Some(b"tenant".to_vec()),
            "usage".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            h,
        )
    }

    #[test]
    fn bytes_follow_push_take_and_clear() {
        let mut b = Buffer::default();
        let ms: Vec<OwnedMessage> = (0..10)
            .map(|i| msg(i, 100 * i as usize, i % 3 == 0))
            .collect();
        let weights: Vec<usize> = ms.iter().map(weight).collect();
        for m in ms {
            b.push(m);
        }
        assert_eq!(b.bytes(), weights.iter().sum::<usize>());
        let first = b.take(4);
        assert_eq!(first.len(), 4);
        assert_eq!(first[3].offset(), 3);
        assert_eq!(b.bytes(), weights[4..].iter().sum::<usize>());
        assert_eq!(b.as_slice()[0].offset(), 4);
        let rest = b.take(100);
        assert_eq!(rest.len(), 6);
        assert_eq!((b.bytes(), b.len()), (0, 0));
        b.push(msg(10, 5, true));
        assert!(b.bytes() > 5 + 55);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn weight_counts_payload_key_topic_and_headers() {
        let plain = weight(&msg(0, 1000, false));
        assert_eq!(
            plain,
            std::mem::size_of::<OwnedMessage>() + 1000 + b"tenant".len() + "usage".len()
        );
        assert!(weight(&msg(0, 1000, true)) >= plain + "traceparent".len() + 55);
    }
}
