//! Shared subscriptions (MQTT 5 §4.8.2, served to MQTT 3.1.1 clients too,
//! as Mosquitto and EMQX do): a session subscribing to
//! `$share/{group}/{filter}` joins the group `(group, filter)`, and each
//! message matching `filter` goes to one member of every matching group,
//! besides the sessions whose plain filters match it.
//!
//! **Keying.** A membership has a trie key of its own (taken from the
//! router's id counter) under the group's filter, holding the member's
//! options; the session's own key holds its plain filters. So one session
//! may hold `f`, `$share/a/f` and `$share/b/f` at once without collision,
//! and a match yields every member of every matching group, which the
//! router narrows to one per group ([`Shares::member`] maps a membership
//! key back to its session and group). The session's `filters` map keeps
//! the full `$share/...` text, so persistence, unsubscribe and a restart
//! (which rejoins the groups from the stored filters) see one filter.
//!
//! **Choosing** ([`choose`]). Round-robin in membership-key order, from the
//! member after the one chosen last: the first online member whose
//! in-memory queue has room; else the first persistent member (online but
//! slow, or away: its durable queue keeps a QoS ≥ 1 message); else any
//! (an online clean member with a full queue: the drop is counted). A
//! member found gone or full at the fan-out is passed over for another
//! online member ([`pass_on`]). Retained messages are not sent to shared
//! subscriptions (MQTT 5 §4.8.2), and No Local is refused on them
//! (MQTT-3.8.3-4).
//!
//! **Redistribution** ([`crate::Router::redistribute`]). A delivery through
//! a group that a connection did not complete (in flight unacknowledged,
//! or not sent yet) goes to another online member. A persistent member's
//! queued deliveries (those with a seq) are not handed on: they stay in its
//! durable queue and come back to it on reconnect, which §4.8.2 allows and
//! which keeps the store's one entry per message and session. With no other
//! member online the delivery is dropped and counted
//! (`shared_no_member`): queueing it for an absent persistent member would
//! take a second log record, forwarded upstream a second time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::Message;
use crate::router::{Delivery, Registry, Router};
use crate::session::SubOptions;
use crate::topic::{self, Subscription};
use crate::trie::InvalidFilter;

/// Group deliveries dropped for want of a member to take them, summarised.
pub(crate) static NO_MEMBER: edge_log::Summary = edge_log::Summary::new(
    "shared subscriptions without an online member: deliveries dropped",
    edge_log::Level::Warn,
);

/// Every group and membership.
#[derive(Debug, Default)]
pub(crate) struct Shares {
    /// Membership key → its session and group.
    members: HashMap<u64, Member>,
    /// By the full filter text, `$share/{group}/{filter}`.
    groups: HashMap<Arc<str>, Group>,
}

/// One session's membership of one group.
#[derive(Debug)]
pub(crate) struct Member {
    /// The session's key.
    pub session: u64,
    /// The group's full filter text.
    pub group: Arc<str>,
}

/// The members of one `(group, filter)`.
#[derive(Debug)]
pub(crate) struct Group {
    /// The filter topics are matched against (without `$share/{group}/`).
    filter: Box<str>,
    /// Membership key → session key; never empty (the last member leaving
    /// takes the group with it).
    members: BTreeMap<u64, u64>,
    /// The membership chosen last (round-robin goes on after it).
    last: AtomicU64,
}

/// A member a message may go to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub membership: u64,
    pub session: u64,
    pub options: SubOptions,
}

impl Shares {
    pub(crate) fn member(&self, membership: u64) -> Option<&Member> {
        self.members.get(&membership)
    }

    pub(crate) fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    /// Makes `session` a member of the group named `name` (whose filter is
    /// `filter`); returns its membership key, `new_key()` if it was not one.
    fn join(
        &mut self,
        name: &str,
        filter: &str,
        session: u64,
        new_key: impl FnOnce() -> u64,
    ) -> u64 {
        if let Some(membership) = self.membership(name, session) {
            return membership;
        }
        let membership = new_key();
        let name: Arc<str> = match self.groups.get_key_value(name) {
            Some((name, _)) => Arc::clone(name),
            None => name.into(),
        };
        self.groups
            .entry(Arc::clone(&name))
            .or_insert_with(|| Group {
                filter: filter.into(),
                members: BTreeMap::new(),
                last: AtomicU64::new(0),
            })
            .members
            .insert(membership, session);
        self.members.insert(
            membership,
            Member {
                session,
                group: name,
            },
        );
        membership
    }

    /// Takes `session` out of the group named `name`; returns the key its
    /// membership had.
    fn leave(&mut self, name: &str, session: u64) -> Option<u64> {
        let membership = self.membership(name, session)?;
        self.members.remove(&membership);
        if let Some(group) = self.groups.get_mut(name) {
            group.members.remove(&membership);
            if group.members.is_empty() {
                self.groups.remove(name);
            }
        }
        Some(membership)
    }

    fn membership(&self, name: &str, session: u64) -> Option<u64> {
        self.groups
            .get(name)?
            .members
            .iter()
            .find(|(_, s)| **s == session)
            .map(|(m, _)| *m)
    }
}

impl Group {
    /// Every member, with its options, in membership-key order.
    fn candidates(&self, registry: &Registry) -> Vec<Candidate> {
        self.members
            .iter()
            .filter_map(|(&membership, &session)| {
                let options = *registry.trie.get(&self.filter, membership)?;
                Some(Candidate {
                    membership,
                    session,
                    options,
                })
            })
            .collect()
    }

    /// `candidates` (in membership-key order) in the order a choice tries
    /// them: from the one after the membership chosen last, wrapping.
    fn rotation<'c>(&self, candidates: &'c [Candidate]) -> impl Iterator<Item = &'c Candidate> {
        let last = self.last.load(Ordering::Relaxed);
        let start = candidates.partition_point(|c| c.membership <= last);
        let (before, after) = candidates.split_at(start);
        after.iter().chain(before)
    }

    fn chose(&self, membership: u64) {
        self.last.store(membership, Ordering::Relaxed);
    }
}

/// The members of each group one publish matched, gathered from the trie.
#[derive(Debug, Default)]
pub(crate) struct Matches {
    groups: Vec<(Arc<str>, Vec<Candidate>)>,
}

impl Matches {
    /// A match of `membership` (each counts once, whichever topic of the
    /// publish it matched).
    pub(crate) fn add(&mut self, member: &Member, membership: u64, options: SubOptions) {
        let candidate = Candidate {
            membership,
            session: member.session,
            options,
        };
        match self.groups.iter_mut().find(|(g, _)| *g == member.group) {
            Some((_, candidates)) => {
                if !candidates.iter().any(|c| c.membership == membership) {
                    candidates.push(candidate);
                }
            }
            None => self
                .groups
                .push((Arc::clone(&member.group), vec![candidate])),
        }
    }

    /// Each matched group (by name) and the member it chose.
    pub(crate) fn choose(self, registry: &Registry) -> impl Iterator<Item = (Arc<str>, Candidate)> {
        self.groups
            .into_iter()
            .filter_map(|(name, mut candidates)| {
                let group = registry.shares.group(&name)?;
                candidates.sort_unstable_by_key(|c| c.membership);
                let chosen = choose(registry, group, &candidates)?;
                Some((name, chosen))
            })
    }
}

/// One member of `group` among `candidates` (see the module's doc).
fn choose(registry: &Registry, group: &Group, candidates: &[Candidate]) -> Option<Candidate> {
    let has_room = |c: &&Candidate| {
        registry
            .session(c.session)
            .and_then(|s| s.online.as_ref())
            .is_some_and(|o| o.tx.capacity() > 0)
    };
    let persistent = |c: &&Candidate| {
        registry
            .session(c.session)
            .is_some_and(|s| s.durable.is_some())
    };
    let chosen = group
        .rotation(candidates)
        .find(has_room)
        .or_else(|| group.rotation(candidates).find(persistent))
        .or_else(|| group.rotation(candidates).next())
        .copied()?;
    group.chose(chosen.membership);
    Some(chosen)
}

/// Hands `message` to an online member of the group `name` whose queue
/// takes it now, skipping the sessions `excluded` names; whether one did.
/// The delivery is not queued durably (it has no seq): if that member's
/// connection does not complete it, it is redistributed in turn.
pub(crate) fn pass_on(
    registry: &Registry,
    name: &Arc<str>,
    message: &Arc<Message>,
    excluded: impl Fn(u64) -> bool,
) -> bool {
    let Some(group) = registry.shares.group(name) else {
        return false;
    };
    let candidates = group.candidates(registry);
    for c in group.rotation(&candidates) {
        if excluded(c.session) {
            continue;
        }
        let Some(online) = registry.session(c.session).and_then(|s| s.online.as_ref()) else {
            continue;
        };
        if let Some(gate) = &online.gate
            && !gate.admit(message)
        {
            continue;
        }
        let delivery = Delivery {
            message: Arc::clone(message),
            qos: c.options.qos.min(message.qos),
            seq: None,
            retained: false,
            retain_as_published: c.options.retain_as_published && message.retain,
            sub_ids: (c.options.id != 0)
                .then_some(c.options.id)
                .into_iter()
                .collect(),
            share: Some(Arc::clone(name)),
        };
        if online.tx.try_send(delivery).is_ok() {
            group.chose(c.membership);
            return true;
        }
        if let Some(gate) = &online.gate {
            gate.refund(message);
        }
    }
    false
}

impl Router {
    /// Hands the group deliveries a connection of `client_id` did not
    /// complete (sent and unacknowledged, or not sent) to other online
    /// members of their groups; returns how many went. Deliveries not
    /// through a group, and a persistent session's queued ones (with a
    /// seq: they stay in its queue), are left alone; those no member can
    /// take, or past their expiry, are dropped and counted. Call it once
    /// the connection left its session, so that nothing more is chosen
    /// for it meanwhile.
    pub fn redistribute(&self, client_id: &str, deliveries: Vec<Delivery>) -> usize {
        let registry = self.inner.registry();
        let now = crate::message::now_ms();
        let leaving = |session: u64| {
            registry
                .by_key
                .get(&session)
                .is_some_and(|id| **id == *client_id)
        };
        let mut passed = 0;
        for d in deliveries {
            let (Some(group), None) = (&d.share, d.seq) else {
                continue;
            };
            if d.message.is_expired(now) {
                crate::session::expired(&d.message);
            } else if pass_on(&registry, group, &d.message, leaving) {
                passed += 1;
            } else {
                no_member(group, &d.message);
            }
        }
        if passed > 0 {
            metrics::counter!("edge_shared_redistributed_total").increment(passed as u64);
            tracing::debug!(
                client_id,
                passed,
                "group deliveries handed to other members"
            );
        }
        passed
    }
}

/// A group delivery nobody could take: counted, summarised.
pub(crate) fn no_member(group: &str, message: &Message) {
    metrics::counter!("edge_messages_dropped_total", "reason" => "shared_no_member").increment(1);
    NO_MEMBER.record("shared_no_member", || {
        format!("group={group} topic={}", message.topic)
    });
}

/// The subscription bookkeeping that knows of groups: a plain filter is
/// the session's key in the trie, a shared one its membership's.
impl Registry {
    /// Adds or replaces `session`'s subscription to `filter` (plain or
    /// `$share/...`); returns the options it replaced.
    pub(crate) fn subscribe(
        &mut self,
        session: u64,
        filter: &str,
        options: SubOptions,
        ids: &AtomicU64,
    ) -> Result<Option<SubOptions>, InvalidFilter> {
        let invalid = || InvalidFilter {
            filter: filter.to_string(),
        };
        match topic::parse_subscription(filter).ok_or_else(invalid)? {
            Subscription::Plain(plain) => self.trie.insert(plain, session, options),
            Subscription::Shared { filter: inner, .. } => {
                let membership = self.shares.join(filter, inner, session, || {
                    ids.fetch_add(1, Ordering::Relaxed)
                });
                self.trie.insert(inner, membership, options)
            }
        }
    }

    /// Removes `session`'s subscription to `filter`, if it has one.
    pub(crate) fn unsubscribe(&mut self, session: u64, filter: &str) -> Option<SubOptions> {
        match topic::parse_subscription(filter)? {
            Subscription::Plain(plain) => self.trie.remove(plain, session),
            Subscription::Shared { filter: inner, .. } => {
                let membership = self.shares.leave(filter, session)?;
                self.trie.remove(inner, membership)
            }
        }
    }

    /// Removes every subscription of the session of `client_id` (its
    /// `filters` emptied, its groups left).
    pub(crate) fn unsubscribe_all(&mut self, client_id: &str) {
        let Some(slot) = self.sessions.get_mut(client_id) else {
            return;
        };
        let session = slot.key;
        let filters = std::mem::take(&mut slot.filters);
        self.trie.remove_key(session);
        for filter in filters.keys() {
            if let Some(Subscription::Shared { filter: inner, .. }) =
                topic::parse_subscription(filter)
                && let Some(membership) = self.shares.leave(filter, session)
            {
                self.trie.remove(inner, membership);
            }
        }
    }

    /// The session a trie key stands for: its own, or a membership's.
    pub(crate) fn owner(&self, key: u64) -> u64 {
        self.shares.member(key).map_or(key, |m| m.session)
    }
}

#[cfg(test)]
mod tests;
