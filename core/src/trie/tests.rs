use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// (filter, topic, matches) — OASIS MQTT 3.1.1 §4.7 / 5.0 §4.7, with the
/// spec's own examples first.
const RULES: &[(&str, &str, bool)] = &[
    // '#': the parent level and any number of child levels.
    ("sport/tennis/player1/#", "sport/tennis/player1", true),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/ranking",
        true,
    ),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/score/wimbledon",
        true,
    ),
    ("sport/tennis/player1/#", "sport/tennis/player2", false),
    ("sport/#", "sport", true),
    ("sport/#", "sports", false),
    ("sport/#", "sport/", true),
    ("a/#", "a", true),
    ("a/#", "a/b", true),
    ("a/#", "a/b/c", true),
    ("a/#", "b/a", false),
    ("a/b/#", "a", false),
    ("#", "a", true),
    ("#", "a/b/c", true),
    ("#", "/", true),
    ("#", "/a", true),
    ("#", "a//b", true),
    // '+': exactly one level, an empty one included.
    ("sport/tennis/+", "sport/tennis/player1", true),
    ("sport/tennis/+", "sport/tennis/player1/ranking", false),
    ("sport/+", "sport", false),
    ("sport/+", "sport/", true),
    ("+", "a", true),
    ("+", "a/b", false),
    ("+", "/a", false),
    ("+/+", "/finance", true),
    ("/+", "/finance", true),
    ("+/+", "a/b", true),
    ("+/+", "a", false),
    ("+/+", "a/b/c", false),
    ("+/+", "/", true),
    ("a/+/#", "a/b", true),
    ("a/+/#", "a/b/c/d", true),
    ("a/+/#", "a/", true),
    ("a/+/#", "a", false),
    ("+/#", "a", true),
    ("+/b/+", "a/b/c", true),
    ("+/b/+", "a/c/c", false),
    // Empty levels are levels.
    ("a//b", "a//b", true),
    ("a//b", "a/b", false),
    ("a/+/b", "a//b", true),
    ("a/b", "a//b", false),
    ("/a", "/a", true),
    ("/a", "a", false),
    ("+/a", "/a", true),
    ("a/", "a/", true),
    ("a/", "a", false),
    ("a", "a/", false),
    // Literal levels compare whole.
    ("a/b", "a/b", true),
    ("a/b", "a/bc", false),
    ("a/b", "a/b/c", false),
    ("a/b/c", "a/b", false),
    // '$' topics: no wildcard as the first level (MQTT-4.7.2-1)...
    ("#", "$SYS", false),
    ("#", "$SYS/broker/load", false),
    ("+", "$SYS", false),
    ("+/broker/load", "$SYS/broker/load", false),
    ("+/#", "$SYS/x", false),
    // ...but a literal one, and wildcards further down.
    ("$SYS/#", "$SYS", true),
    ("$SYS/#", "$SYS/broker/load", true),
    ("$SYS/broker/+", "$SYS/broker/load", true),
    ("$SYS/+/load", "$SYS/broker/load", true),
    ("$SYS", "$SYS", true),
    ("$", "$", true),
    ("$SYS/#", "SYS/x", false),
    ("+/$s", "a/$s", true),
    ("a/+", "a/$s", true),
    ("a/#", "a/$s", true),
    ("#", "a$", true),
];

fn matches_of(trie: &TopicTrie<u32>, topic: &str) -> Vec<(String, u64, u32)> {
    let mut found = Vec::new();
    trie.for_each_match(topic, |filter, key, &value| {
        found.push((filter.to_string(), key, value))
    });
    found.sort();
    found
}

#[test]
fn matching_rules() {
    for &(filter, topic, expected) in RULES {
        assert!(topic::is_valid_filter(filter), "{filter:?}");
        let mut trie = TopicTrie::new();
        trie.insert(filter, 7, 1).expect("valid filter");
        let found = matches_of(&trie, topic);
        let want = if expected {
            vec![(filter.to_string(), 7, 1)]
        } else {
            vec![]
        };
        assert_eq!(found, want, "trie: {filter:?} vs {topic:?}");
        assert_eq!(
            topic::matches(filter, topic),
            expected,
            "topic::matches: {filter:?} vs {topic:?}"
        );
    }
}

#[test]
fn all_rules_in_one_trie() {
    let mut trie = TopicTrie::new();
    let filters: BTreeSet<&str> = RULES.iter().map(|&(f, _, _)| f).collect();
    for (key, filter) in filters.iter().enumerate() {
        trie.insert(filter, key as u64, 0).expect("valid filter");
    }
    let topics: BTreeSet<&str> = RULES.iter().map(|&(_, t, _)| t).collect();
    for topic in topics {
        let found: Vec<String> = matches_of(&trie, topic)
            .into_iter()
            .map(|(f, _, _)| f)
            .collect();
        let want: Vec<String> = filters
            .iter()
            .filter(|f| topic::matches(f, topic))
            .map(|f| f.to_string())
            .collect();
        assert_eq!(found, want, "{topic:?}");
    }
}

#[test]
fn insert_replaces_and_get_reads() {
    let mut trie = TopicTrie::new();
    assert!(trie.is_empty());
    assert_eq!(trie.insert("a/+", 1, 10), Ok(None));
    assert_eq!(trie.insert("a/+", 2, 20), Ok(None));
    assert_eq!(trie.insert("a/+", 1, 11), Ok(Some(10)));
    assert_eq!(trie.len(), 2);
    assert_eq!(trie.get("a/+", 1), Some(&11));
    assert_eq!(trie.get("a/+", 3), None);
    assert_eq!(trie.get("a", 1), None);
    assert_eq!(trie.get("a/b", 1), None);
    assert_eq!(
        matches_of(&trie, "a/x"),
        vec![("a/+".into(), 1, 11), ("a/+".into(), 2, 20)]
    );
}

#[test]
fn invalid_filters_are_refused() {
    let mut trie = TopicTrie::new();
    for bad in ["", "a/#/b", "#/a", "a+", "a/b#", "+a/b", "a\0b"] {
        assert_eq!(
            trie.insert(bad, 1, 0),
            Err(InvalidFilter { filter: bad.into() }),
            "{bad:?}"
        );
    }
    assert!(trie.is_empty());
    assert_eq!(trie.node_count(), 1);
    assert_eq!(trie.remove("a/#/b", 1), None);
}

#[test]
fn remove_takes_one_subscription() {
    let mut trie = TopicTrie::new();
    trie.insert("a/b", 1, 10).expect("valid");
    trie.insert("a/b", 2, 20).expect("valid");
    trie.insert("a/#", 1, 30).expect("valid");
    assert_eq!(trie.remove("a/b", 1), Some(10));
    assert_eq!(trie.remove("a/b", 1), None);
    assert_eq!(trie.remove("a/c", 1), None);
    assert_eq!(trie.remove("a", 1), None);
    assert_eq!(trie.len(), 2);
    assert_eq!(
        matches_of(&trie, "a/b"),
        vec![("a/#".into(), 1, 30), ("a/b".into(), 2, 20)]
    );
}

#[test]
fn remove_key_removes_every_filter_of_that_key_only() {
    let mut trie = TopicTrie::new();
    for filter in ["site/dev-1/cmd/#", "site/+/status", "#", "$SYS/#"] {
        trie.insert(filter, 1, 1).expect("valid");
    }
    trie.insert("site/+/status", 2, 2).expect("valid");
    assert_eq!(trie.remove_key(1), 4);
    assert_eq!(trie.remove_key(1), 0);
    assert_eq!(trie.remove_key(99), 0);
    assert_eq!(trie.len(), 1);
    assert_eq!(trie.get("site/+/status", 2), Some(&2));
    assert_eq!(trie.get("site/+/status", 1), None);
    // root, site, +, status
    assert_eq!(trie.node_count(), 4);
    assert_eq!(trie.remove_key(2), 1);
    assert_eq!(trie.node_count(), 1);
    // A key's index entry goes with its last filter, whichever way it went.
    trie.insert("a", 3, 3).expect("valid");
    assert_eq!(trie.remove("a", 3), Some(3));
    assert!(trie.keys.is_empty());
}

#[test]
fn removing_everything_leaves_only_the_root() {
    let mut trie = TopicTrie::new();
    let filters = [
        "a", "a/b", "a/b/c", "a/+", "a/#", "+", "#", "+/+", "a/+/#", "/a", "a//b", "", "$SYS/#",
    ];
    let slots = {
        for (key, filter) in filters.iter().enumerate() {
            if !filter.is_empty() {
                trie.insert(filter, key as u64, 0).expect("valid");
                trie.insert(filter, 100, 0).expect("valid");
            }
        }
        trie.nodes.len()
    };
    // Filters sharing a prefix share its nodes, and a node holding
    // subscriptions keeps its parent when a sibling goes.
    assert_eq!(trie.remove("a/b/c", 2), Some(0));
    assert_eq!(trie.get("a/b", 1), Some(&0));
    for (key, filter) in filters.iter().enumerate() {
        trie.remove(filter, key as u64);
    }
    assert_eq!(trie.remove_key(100), 12);
    assert!(trie.is_empty());
    assert_eq!(trie.node_count(), 1);
    // Churn reuses the freed slots.
    for round in 0..100 {
        for (key, filter) in filters.iter().enumerate() {
            if !filter.is_empty() {
                trie.insert(filter, key as u64 + round, 0).expect("valid");
            }
        }
        for (key, filter) in filters.iter().enumerate() {
            trie.remove(filter, key as u64 + round);
        }
        assert_eq!(trie.node_count(), 1);
    }
    assert_eq!(trie.nodes.len(), slots);
}

#[test]
fn many_siblings_switch_between_list_and_map() {
    let mut trie = TopicTrie::new();
    let filter = |i: u64| format!("site/dev-{i}/cmd/#");
    for round in 0..3 {
        for i in 0..40 {
            trie.insert(&filter(i), i, round).expect("valid");
            assert_eq!(trie.get(&filter(i), i), Some(&round));
        }
        let site_is_map = |trie: &TopicTrie<u32>| {
            let id = trie.find("site").expect("site node");
            matches!(trie.nodes[id].children, Children::Many(_))
        };
        assert!(site_is_map(&trie));
        // Down to a list on the way out, and every child still found.
        for i in (0..40).rev() {
            if i < Children::FEW as u64 / 2 {
                assert!(!site_is_map(&trie));
            }
            for j in 0..=i {
                let topic = format!("site/dev-{j}/cmd/x");
                assert_eq!(matches_of(&trie, &topic), vec![(filter(j), j, round)]);
            }
            assert_eq!(trie.remove(&filter(i), i), Some(round));
            assert_eq!(matches_of(&trie, &format!("site/dev-{i}/cmd")), vec![]);
        }
        assert_eq!(trie.node_count(), 1);
    }
}

#[test]
fn a_topic_branching_at_every_level_finds_every_match() {
    // Every filter of 10 levels, each `a` or `+`: the walk branches at each
    // level, more than `Pending` holds inline.
    let mut trie = TopicTrie::new();
    for mask in 0..1u32 << 10 {
        let levels: Vec<&str> = (0..10)
            .map(|i| if mask >> i & 1 == 1 { "+" } else { "a" })
            .collect();
        trie.insert(&levels.join("/"), u64::from(mask), mask)
            .expect("valid");
    }
    let mut keys = Vec::new();
    trie.for_each_match(&["a"; 10].join("/"), |filter, key, _| {
        assert!(topic::matches(filter, "a/a/a/a/a/a/a/a/a/a"), "{filter}");
        keys.push(key);
    });
    keys.sort();
    assert_eq!(keys, (0..1u64 << 10).collect::<Vec<_>>());
    // `+` alone where the topic has `b`.
    let mut found = 0;
    trie.for_each_match("a/a/a/a/a/a/a/a/a/b", |filter, _, _| {
        assert!(filter.ends_with("/+"), "{filter}");
        found += 1;
    });
    assert_eq!(found, 1 << 9);
}

#[test]
fn deep_filters_and_topics_do_not_recurse() {
    // The maximum MQTT topic length, all separators: 65,536 empty levels.
    let deep = "/".repeat(65_535);
    let mut trie = TopicTrie::new();
    trie.insert(&deep, 1, 1).expect("valid");
    trie.insert(&format!("{deep}#"), 2, 2).expect("valid");
    trie.insert("#", 3, 3).expect("valid");
    let mut keys = Vec::new();
    trie.for_each_match(&deep, |_, key, _| keys.push(key));
    keys.sort();
    assert_eq!(keys, [1, 2, 3]);
    assert_eq!(trie.remove(&deep, 1), Some(1));
    assert_eq!(trie.node_count(), 65_538);
    // Dropping a deep trie is flat too.
    drop(trie);
}

#[derive(Debug, Clone)]
enum Op {
    Insert(String, u64, u32),
    Remove(String, u64),
    RemoveKey(u64),
    Match(String),
}

fn levels(from: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(from), 1..=4).prop_map(|l| l.join("/"))
}

fn op() -> impl Strategy<Value = Op> {
    // May be invalid ("#/a", ""): the trie must refuse those.
    let filter = || levels(&["a", "b", "$s", "", "+", "#"]);
    let topic = levels(&["a", "b", "$s", ""]);
    let key = 0..4u64;
    prop_oneof![
        4 => (filter(), key.clone(), any::<u32>()).prop_map(|(f, k, v)| Op::Insert(f, k, v)),
        2 => (filter(), key.clone()).prop_map(|(f, k)| Op::Remove(f, k)),
        1 => key.prop_map(Op::RemoveKey),
        4 => topic.prop_map(Op::Match),
    ]
}

/// 1 (the root) + every distinct level prefix of the filters in `model`.
fn expected_nodes(model: &BTreeMap<(String, u64), u32>) -> usize {
    let mut prefixes = BTreeSet::new();
    for (filter, _) in model.keys() {
        for (i, _) in filter.match_indices('/') {
            prefixes.insert(&filter[..i]);
        }
        prefixes.insert(filter.as_str());
    }
    1 + prefixes.len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agrees_with_topic_matches(ops in prop::collection::vec(op(), 1..64)) {
        let mut trie = TopicTrie::new();
        let mut model: BTreeMap<(String, u64), u32> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(filter, key, value) => {
                    let got = trie.insert(&filter, key, value);
                    if topic::is_valid_filter(&filter) {
                        prop_assert_eq!(got, Ok(model.insert((filter.clone(), key), value)));
                        prop_assert_eq!(trie.get(&filter, key), Some(&value));
                    } else {
                        prop_assert!(got.is_err());
                    }
                }
                Op::Remove(filter, key) => {
                    let want = model.remove(&(filter.clone(), key));
                    prop_assert_eq!(trie.remove(&filter, key), want);
                    prop_assert_eq!(trie.get(&filter, key), None);
                }
                Op::RemoveKey(key) => {
                    let before = model.len();
                    model.retain(|(_, k), _| *k != key);
                    prop_assert_eq!(trie.remove_key(key), before - model.len());
                }
                Op::Match(topic) => {
                    let want: Vec<(String, u64, u32)> = model
                        .iter()
                        .filter(|((f, _), _)| topic::matches(f, &topic))
                        .map(|((f, k), v)| (f.clone(), *k, *v))
                        .collect();
                    prop_assert_eq!(matches_of(&trie, &topic), want, "topic {:?}", topic);
                }
            }
            prop_assert_eq!(trie.len(), model.len());
            prop_assert_eq!(trie.node_count(), expected_nodes(&model));
        }
        for key in 0..4 {
            trie.remove_key(key);
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.node_count(), 1);
        prop_assert!(trie.keys.is_empty());
    }
}
