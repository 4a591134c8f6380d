//! Retained messages in memory: the newest per topic, as the store holds
//! them (the store is the durable copy, loaded at start).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::message::Message;
use crate::topic;

#[derive(Debug, Default)]
pub(crate) struct RetainedIndex {
    by_topic: BTreeMap<Arc<str>, Arc<Message>>,
}

impl RetainedIndex {
    /// A retained publish, committed: sets the topic's message, or clears
    /// it when the payload is empty (MQTT-3.3.1-10/11).
    pub(crate) fn apply(&mut self, message: &Arc<Message>) {
        if message.payload.is_empty() {
            self.by_topic.remove(&message.topic);
        } else {
            self.by_topic
                .insert(Arc::clone(&message.topic), Arc::clone(message));
        }
    }

    /// The retained messages whose topic `filter` matches (`$` topics only
    /// for filters that name the `$` level) and that have not expired.
    pub(crate) fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = crate::message::now_ms();
        self.by_topic
            .iter()
            .filter(|(t, m)| topic::matches(filter, t) && !m.is_expired(now))
            .map(|(_, m)| Arc::clone(m))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_topic.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::message::QoS;

    fn retained(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        let mut m = Message::new(
            topic,
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            "p".into(),
        );
        m.retain = true;
        Arc::new(m)
    }

    #[test]
    fn newest_per_topic_empty_clears_dollar_topics_need_their_level() {
        let mut index = RetainedIndex::default();
        index.apply(&retained("a/b", b"1"));
        index.apply(&retained("a/b", b"2"));
        index.apply(&retained("a/c", b"3"));
        index.apply(&retained("$SYS/x", b"4"));
        let got: Vec<Bytes> = index
            .matching("a/+")
            .iter()
            .map(|m| m.payload.clone())
            .collect();
        assert_eq!(got, [Bytes::from_static(b"2"), Bytes::from_static(b"3")]);
        assert_eq!(
            index.matching("#").len(),
            2,
            "no $ topic for a leading wildcard"
        );
        assert_eq!(index.matching("$SYS/#").len(), 1);
        index.apply(&retained("a/b", b""));
        assert_eq!(index.matching("a/#").len(), 1);
        assert_eq!(index.len(), 2);
    }
}
