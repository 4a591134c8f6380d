//! The subscription index: a trie of MQTT topic filters, one level per node.
//!
//! One index serves every kind of subscriber — MQTT filters, `$share/`
//! groups, AMQP `amq.topic` bindings — so it knows nothing of them: a
//! subscription is a filter, a subscriber key (`u64`) and a value the caller
//! chooses (granted QoS, options, a group).
//!
//! Layout. The root is the empty prefix; every other node is one level of
//! one or more filters. Literal levels hang off a node by their text, `+`
//! and `#` in slots of their own, so matching a topic level is one look-up
//! plus two slot reads. The look-up compares strings while a node has a few
//! literal children (most have one: `dev-N` → `cmd`) and hashes only beyond
//! that, with std's keyed SipHash because levels come from clients. The node
//! at the end of a filter's path holds the filter text once and the values
//! of every key subscribed to it.
//!
//! Matching visits only nodes whose filter prefix matches a prefix of the
//! topic, so its cost grows with the topic's depth, the wildcards on the way
//! and the number of matches, never with subscriptions that cannot match.
//!
//! Invariants:
//! - every node but the root holds a subscription or has a child: the last
//!   `remove` on a path frees the nodes it leaves empty, up to the nearest
//!   one still in use;
//! - `keys[k]` holds exactly the nodes where `k` has a value, so
//!   `remove_key` goes straight to them;
//! - `len` is the number of (filter, key) pairs.
//!
//! Nodes live in an arena and refer to each other by index: a topic may be
//! 65,535 bytes of `/`, so no walk (nor drop) may recurse per level. Freed
//! slots are reused; like a `HashMap`, the arena keeps its peak size.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::topic;

/// A filter that breaks MQTT §4.7.1 (see [`topic::is_valid_filter`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid topic filter {filter:?}: it must be non-empty and without NUL, with `+` only as a whole level and `#` only as the whole last level"
)]
pub struct InvalidFilter {
    pub filter: String,
}

type NodeId = usize;

const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node<V> {
    /// Unused for the root.
    parent: NodeId,
    /// This node's level in its parent (`+` and `#` for the wildcard slots).
    level: Box<str>,
    children: Children,
    plus: Option<NodeId>,
    hash: Option<NodeId>,
    subscriptions: Option<Subscriptions<V>>,
}

#[derive(Debug)]
struct Subscriptions<V> {
    /// The path from the root to this node.
    filter: Box<str>,
    /// Never empty: the last key going takes the whole struct with it.
    by_key: BTreeMap<u64, V>,
}

impl<V> Node<V> {
    fn new(parent: NodeId, level: &str) -> Node<V> {
        Node {
            parent,
            level: level.into(),
            children: Children::default(),
            plus: None,
            hash: None,
            subscriptions: None,
        }
    }

    fn child(&self, level: &str) -> Option<NodeId> {
        match level {
            "+" => self.plus,
            "#" => self.hash,
            l => self.children.get(l),
        }
    }

    fn is_unused(&self) -> bool {
        self.subscriptions.is_none()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }
}

/// Subscriptions by MQTT topic filter: each (filter, subscriber key) holds
/// one value.
#[derive(Debug)]
pub struct TopicTrie<V> {
    nodes: Vec<Node<V>>,
    /// Slots of `nodes` not in the trie, each reset to an empty node.
    free: Vec<NodeId>,
    keys: HashMap<u64, HashSet<NodeId>>,
    len: usize,
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        TopicTrie::new()
    }
}

impl<V> TopicTrie<V> {
    pub fn new() -> Self {
        TopicTrie {
            nodes: vec![Node::new(ROOT, "")],
            free: Vec::new(),
            keys: HashMap::new(),
            len: 0,
        }
    }

    /// Adds or replaces the value of `key` under `filter`; returns the value
    /// it replaced.
    pub fn insert(&mut self, filter: &str, key: u64, value: V) -> Result<Option<V>, InvalidFilter> {
        if !topic::is_valid_filter(filter) {
            return Err(InvalidFilter {
                filter: filter.to_string(),
            });
        }
        let mut id = ROOT;
        for level in filter.split('/') {
            id = match self.nodes[id].child(level) {
                Some(child) => child,
                None => self.add_child(id, level),
            };
        }
        let subscriptions = self.nodes[id]
            .subscriptions
            .get_or_insert_with(|| Subscriptions {
                filter: filter.into(),
                by_key: BTreeMap::new(),
            });
        let replaced = subscriptions.by_key.insert(key, value);
        if replaced.is_none() {
            self.len += 1;
            self.keys.entry(key).or_default().insert(id);
        }
        Ok(replaced)
    }

    /// Removes the value of `key` under `filter`, if there is one.
    pub fn remove(&mut self, filter: &str, key: u64) -> Option<V> {
        let id = self.find(filter)?;
        let value = self.take(id, key)?;
        if let Some(nodes) = self.keys.get_mut(&key) {
            nodes.remove(&id);
            if nodes.is_empty() {
                self.keys.remove(&key);
            }
        }
        Some(value)
    }

    /// Removes every subscription of `key` (a session going away); returns
    /// how many there were.
    pub fn remove_key(&mut self, key: u64) -> usize {
        let Some(nodes) = self.keys.remove(&key) else {
            return 0;
        };
        // Freeing one path never frees another node of `key`: each still
        // holds `key`'s value until its own turn.
        nodes
            .into_iter()
            .filter(|&id| self.take(id, key).is_some())
            .count()
    }

    /// Calls `f(filter, key, &value)` for every subscription whose filter
    /// matches `topic`, each once, in no particular order.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, u64, &V)) {
        // MQTT-4.7.2-1: a topic starting with `$` is not matched by a filter
        // whose first level is a wildcard.
        let root_wildcards = !topic.starts_with('$');
        let mut next = Some((ROOT, Some(topic)));
        let mut pending = Pending::default();
        while let Some((id, rest)) = next.take().or_else(|| pending.pop()) {
            let node = &self.nodes[id];
            let wildcards = id != ROOT || root_wildcards;
            // `#` takes any number of levels, none included ("a/#" matches "a").
            if let Some(hash) = node.hash.filter(|_| wildcards) {
                self.emit(hash, &mut f);
            }
            let Some(rest) = rest else {
                self.emit(id, &mut f);
                continue;
            };
            let (level, after) = first_level(rest);
            let literal = node.children.get(level).map(|child| (child, after));
            let plus = node.plus.filter(|_| wildcards).map(|plus| (plus, after));
            next = match (literal, plus) {
                (Some(literal), Some(plus)) => {
                    pending.push(plus);
                    Some(literal)
                }
                (literal, plus) => literal.or(plus),
            };
        }
    }

    pub fn get(&self, filter: &str, key: u64) -> Option<&V> {
        let id = self.find(filter)?;
        self.nodes[id].subscriptions.as_ref()?.by_key.get(&key)
    }

    /// Number of (filter, key) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes in the trie, the root included.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn emit(&self, id: NodeId, f: &mut impl FnMut(&str, u64, &V)) {
        if let Some(s) = &self.nodes[id].subscriptions {
            for (&key, value) in &s.by_key {
                f(&s.filter, key, value);
            }
        }
    }

    /// The node at the end of `filter`'s path, if the trie has one.
    fn find(&self, filter: &str) -> Option<NodeId> {
        filter
            .split('/')
            .try_fold(ROOT, |id, level| self.nodes[id].child(level))
    }

    fn add_child(&mut self, parent: NodeId, level: &str) -> NodeId {
        let node = Node::new(parent, level);
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        let slot = &mut self.nodes[parent];
        match level {
            "+" => slot.plus = Some(id),
            "#" => slot.hash = Some(id),
            l => slot.children.insert(l, id),
        }
        id
    }

    /// Removes `key`'s value at node `id` and frees the nodes that leaves
    /// unused. Leaves `keys` to the caller.
    fn take(&mut self, id: NodeId, key: u64) -> Option<V> {
        let subscriptions = self.nodes[id].subscriptions.as_mut()?;
        let value = subscriptions.by_key.remove(&key)?;
        if subscriptions.by_key.is_empty() {
            self.nodes[id].subscriptions = None;
        }
        self.len -= 1;
        self.prune(id);
        Some(value)
    }

    fn prune(&mut self, mut id: NodeId) {
        while id != ROOT && self.nodes[id].is_unused() {
            let parent = self.nodes[id].parent;
            let level = std::mem::take(&mut self.nodes[id].level);
            let slot = &mut self.nodes[parent];
            match &*level {
                "+" => slot.plus = None,
                "#" => slot.hash = None,
                l => slot.children.remove(l),
            }
            // Drops the node's maps now rather than when the slot is reused.
            self.nodes[id] = Node::new(ROOT, "");
            self.free.push(id);
            id = parent;
        }
    }
}

/// Splits off the first level of `topic`: (level, the rest if there is a
/// rest). A byte scan: levels are short, where `str::split_once`'s searcher
/// costs more than the search.
fn first_level(topic: &str) -> (&str, Option<&str>) {
    match topic.bytes().position(|b| b == b'/') {
        // `/` is ASCII, so both sides are on char boundaries.
        Some(i) => (&topic[..i], topic.get(i + 1..)),
        None => (topic, None),
    }
}

/// A node still to visit in `for_each_match`, with the topic after the
/// levels leading to it (`None` once the topic is used up).
type Visit<'t> = (NodeId, Option<&'t str>);

/// The branches `for_each_match` has yet to take (a literal level and a `+`
/// both matched): one at most per topic level, so the first few stay off
/// the heap and a publish allocates nothing unless its topic is deep and
/// branches at every level.
#[derive(Debug, Default)]
struct Pending<'t> {
    inline: [Visit<'t>; 8],
    len: usize,
    spilled: Vec<Visit<'t>>,
}

impl<'t> Pending<'t> {
    fn push(&mut self, visit: Visit<'t>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = visit;
                self.len += 1;
            }
            None => self.spilled.push(visit),
        }
    }

    /// Last in, first out: `spilled` fills only while `inline` is full.
    fn pop(&mut self) -> Option<Visit<'t>> {
        if let Some(visit) = self.spilled.pop() {
            return Some(visit);
        }
        self.len = self.len.checked_sub(1)?;
        self.inline.get(self.len).copied()
    }
}

/// A node's literal children: a list while short, a map beyond.
#[derive(Debug)]
enum Children {
    Few(Vec<(Box<str>, NodeId)>),
    Many(HashMap<Box<str>, NodeId>),
}

impl Children {
    /// Up to this many, comparing levels costs less than hashing one with
    /// SipHash (~230 instructions for a short level, measured).
    const FEW: usize = 8;

    fn get(&self, level: &str) -> Option<NodeId> {
        match self {
            Children::Few(list) => list.iter().find(|(l, _)| **l == *level).map(|&(_, id)| id),
            Children::Many(map) => map.get(level).copied(),
        }
    }

    /// `level` must not be there yet.
    fn insert(&mut self, level: &str, id: NodeId) {
        match self {
            Children::Few(list) if list.len() < Self::FEW => list.push((level.into(), id)),
            Children::Few(list) => {
                let mut map: HashMap<Box<str>, NodeId> = std::mem::take(list).into_iter().collect();
                map.insert(level.into(), id);
                *self = Children::Many(map);
            }
            Children::Many(map) => {
                map.insert(level.into(), id);
            }
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(list) => list.retain(|(l, _)| **l != *level),
            Children::Many(map) => {
                map.remove(level);
                // Back to a list well below the limit, so that churn around
                // it does not convert every time.
                if map.len() <= Self::FEW / 2 {
                    *self = Children::Few(map.drain().collect());
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Children::Few(list) => list.is_empty(),
            Children::Many(map) => map.is_empty(),
        }
    }
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

#[cfg(test)]
mod tests;
