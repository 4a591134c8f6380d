//! Tests of the ACL: filter algebra against brute force over a small topic
//! universe, parsing, and the publish/subscribe/AMQP decisions.

use super::*;

/// Matching written independently of `matches`: on level lists, recursively.
fn brute_match(filter: &[&str], topic: &[&str]) -> bool {
    fn go(f: &[&str], t: &[&str]) -> bool {
        match f.split_first() {
            None => t.is_empty(),
            Some((&"#", _)) => true,
            Some((&"+", rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((level, rest)) => t.first() == Some(level) && go(rest, &t[1..]),
        }
    }
    if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
        return false;
    }
    go(filter, topic)
}

/// Every sequence of 1..=max_len words from `alphabet`.
fn sequences(alphabet: &[&'static str], max_len: usize) -> Vec<Vec<&'static str>> {
    let mut all: Vec<Vec<&'static str>> = Vec::new();
    let mut frontier: Vec<Vec<&'static str>> = vec![Vec::new()];
    for _ in 0..max_len {
        let mut next = Vec::new();
        for prefix in &frontier {
            for word in alphabet {
                let mut longer = prefix.clone();
                longer.push(word);
                next.push(longer);
            }
        }
        all.extend(next.iter().cloned());
        frontier = next;
    }
    all
}

struct Universe {
    filters: Vec<String>,
    /// matched[f][t]: filter f matches topic t (by brute force).
    matched: Vec<Vec<bool>>,
}

fn universe() -> Universe {
    // Topic levels include one ("b") that no filter names literally. The
    // empty topic (one empty level) is in the universe: the filter algebra
    // counts it, which can only make `covers` stricter and `overlaps` wider.
    let topics: Vec<Vec<&str>> = sequences(&["a", "b", "$s", ""], 4);
    let filters: Vec<String> = sequences(&["a", "$s", "", "+", "#"], 3)
        .into_iter()
        .map(|f| f.join("/"))
        .filter(|f| validate_filter(f).is_ok())
        .collect();
    let matched = filters
        .iter()
        .map(|f| {
            let levels: Vec<&str> = f.split('/').collect();
            topics.iter().map(|t| brute_match(&levels, t)).collect()
        })
        .collect();
    for (f, row) in filters.iter().zip(&matched) {
        for (t, &want) in topics.iter().zip(row) {
            assert_eq!(matches(f, &t.join("/")), want, "matches({f:?}, {t:?})");
        }
    }
    Universe { filters, matched }
}

#[test]
fn covers_and_overlaps_agree_with_brute_force() {
    let u = universe();
    assert!(u.filters.len() > 100, "{}", u.filters.len());
    for (i, a) in u.filters.iter().enumerate() {
        for (j, b) in u.filters.iter().enumerate() {
            let (ma, mb) = (&u.matched[i], &u.matched[j]);
            let covered = mb.iter().zip(ma).all(|(&in_b, &in_a)| !in_b || in_a);
            let overlap = mb.iter().zip(ma).any(|(&in_b, &in_a)| in_b && in_a);
            assert_eq!(covers(a, b), covered, "covers({a:?}, {b:?})");
            assert_eq!(overlaps(a, b), overlap, "overlaps({a:?}, {b:?})");
        }
    }
}

#[test]
fn covers_examples_from_the_brief() {
    assert!(covers("a/#", "a/b/+"));
    assert!(covers("a/#", "a/#"));
    assert!(covers("a/#", "a"));
    assert!(covers("a/+", "a/b"));
    assert!(!covers("a/+", "a/#"));
    assert!(covers("+/#", "#"));
    assert!(!covers("#", "$SYS/#"));
    assert!(covers("$SYS/#", "$SYS/broker/+"));
    assert!(overlaps("a/secret", "a/+"));
    assert!(overlaps("a/secret", "#"));
    assert!(!overlaps("#", "$SYS/x"));
    assert!(!overlaps("a/+", "a"));
}

#[test]
fn filter_validation() {
    for good in ["#", "+", "a/#", "+/+/x", "/", "a//b", "$SYS/#", "%u/x"] {
        assert_eq!(validate_filter(good), Ok(()), "{good}");
    }
    for bad in ["", "a/#/b", "a#", "a/b#", "a+/b", "+a", "a\0"] {
        assert!(validate_filter(bad).is_err(), "{bad:?}");
    }
}

const EXAMPLE: &str = r#"
# anonymous
topic read public/#
topic deny public/private

pattern readwrite devices/%u/#
pattern write clients/%c/status

user alice
topic write sensors/+/temp
topic read sensors/#
topic deny sensors/secret
amqp "" ^alice\..* .*

user bob
topic sensors/bob
amqp bob\..* bob\..* ""
"#;

fn example() -> Acl {
    Acl::parse(EXAMPLE).expect("the example parses")
}

#[test]
fn anonymous_section() {
    let acl = example();
    assert!(
        !acl.can_subscribe(None, "c1", "public/#"),
        "the deny overlaps"
    );
    assert!(acl.can_subscribe(None, "c1", "public/news"));
    assert!(acl.can_subscribe(None, "c1", "public/+/x"));
    assert!(!acl.can_subscribe(None, "c1", "public/private"));
    assert!(!acl.can_subscribe(None, "c1", "public/+"));
    assert!(!acl.can_publish(None, "c1", "public/news"), "read only");
    assert!(!acl.can_subscribe(None, "c1", "sensors/a/temp"));
    // Patterns with %c apply to anonymous clients, those with %u do not.
    assert!(acl.can_publish(None, "c1", "clients/c1/status"));
    assert!(!acl.can_publish(None, "c1", "clients/c2/status"));
    assert!(!acl.can_publish(None, "c1", "devices/c1/x"));
}

#[test]
fn user_sections_and_deny() {
    let acl = example();
    let alice = Some("alice");
    assert!(acl.can_publish(alice, "c", "sensors/kitchen/temp"));
    assert!(!acl.can_publish(alice, "c", "sensors/kitchen/humidity"));
    assert!(
        !acl.can_publish(alice, "c", "sensors/+/temp"),
        "no wildcards in topics"
    );
    assert!(!acl.can_publish(alice, "c", ""));
    assert!(acl.can_subscribe(alice, "c", "sensors/kitchen/#"));
    assert!(
        !acl.can_subscribe(alice, "c", "sensors/#"),
        "overlaps the deny"
    );
    assert!(
        !acl.can_subscribe(alice, "c", "sensors/+"),
        "overlaps the deny"
    );
    assert!(acl.can_subscribe(alice, "c", "sensors/+/x"));
    assert!(
        !acl.can_subscribe(alice, "c", "public/news"),
        "not anonymous"
    );
    // Access omitted = readwrite.
    assert!(acl.can_publish(Some("bob"), "c", "sensors/bob"));
    assert!(acl.can_subscribe(Some("bob"), "c", "sensors/bob"));
    // A user with no section gets only the patterns.
    assert!(acl.can_publish(Some("carol"), "c", "devices/carol/x"));
    assert!(!acl.can_publish(Some("carol"), "c", "sensors/bob"));
}

#[test]
fn shared_subscriptions_are_checked_without_the_prefix() {
    let acl = example();
    assert!(acl.can_subscribe(Some("alice"), "c", "$share/g/sensors/a/temp"));
    assert!(!acl.can_subscribe(Some("alice"), "c", "$share/g/sensors/#"));
    assert!(!acl.can_subscribe(Some("alice"), "c", "$share//sensors/a/temp"));
    assert!(!acl.can_subscribe(Some("alice"), "c", "$share/g"));
}

#[test]
fn substitution_never_widens_access() {
    let acl = example();
    assert!(acl.can_subscribe(Some("dave"), "c", "devices/dave/#"));
    assert!(!acl.can_subscribe(Some("+"), "c", "devices/x/#"));
    assert!(!acl.can_subscribe(Some("#"), "c", "devices/#"));
    assert!(!acl.can_publish(Some("a/b"), "c", "devices/a/b/x"));
    assert!(!acl.can_publish(None, "+", "clients/x/status"));
    assert!(!acl.can_publish(None, "a/b", "clients/a/b/status"));
    // A user name holding `%c` is not substituted a second time.
    let acl = Acl::parse("pattern write home/%u/%c\n").expect("parses");
    assert!(acl.can_publish(Some("%c"), "bob", "home/%c/bob"));
    assert!(!acl.can_publish(Some("%c"), "bob", "home/bob/bob"));
}

#[test]
fn dollar_topics_need_a_literal_first_level() {
    let acl = Acl::parse("topic #\ntopic read $SYS/broker/#\n").expect("parses");
    assert!(acl.can_publish(None, "c", "a/b"));
    assert!(!acl.can_publish(None, "c", "$SYS/x"));
    assert!(!acl.can_subscribe(None, "c", "$SYS/#"));
    assert!(acl.can_subscribe(None, "c", "$SYS/broker/load"));
    let acl = Acl::parse("topic #\ntopic deny #\n").expect("parses");
    assert!(!acl.can_subscribe(None, "c", "a"));
}

#[test]
fn amqp_permissions() {
    let acl = example();
    let alice = Some("alice");
    assert!(
        !acl.amqp_allows(alice, AmqpPermission::Configure, "alice.q"),
        "\"\" matches nothing"
    );
    assert!(!acl.amqp_allows(alice, AmqpPermission::Configure, ""));
    assert!(acl.amqp_allows(alice, AmqpPermission::Write, "alice.x"));
    assert!(
        !acl.amqp_allows(alice, AmqpPermission::Write, "xalice.x"),
        "anchored at start"
    );
    assert!(acl.amqp_allows(alice, AmqpPermission::Read, "anything"));
    let bob = Some("bob");
    assert!(acl.amqp_allows(bob, AmqpPermission::Configure, "bob.q"));
    assert!(!acl.amqp_allows(bob, AmqpPermission::Configure, "bob.q.x\n"));
    assert!(!acl.amqp_allows(bob, AmqpPermission::Read, "bob.q"));
    // Anchored at the end too: the whole name must match.
    let acl = Acl::parse("amqp abc abc abc\n").expect("parses");
    assert!(acl.amqp_allows(None, AmqpPermission::Read, "abc"));
    assert!(!acl.amqp_allows(None, AmqpPermission::Read, "abcd"));
    assert!(!acl.amqp_allows(None, AmqpPermission::Read, "xabc"));
    // Alternation stays inside the anchors.
    let acl = Acl::parse("amqp a|b a|b a|b\n").expect("parses");
    assert!(!acl.amqp_allows(None, AmqpPermission::Read, "ab"));
    assert!(acl.amqp_allows(None, AmqpPermission::Read, "b"));
    // No amqp line: nothing.
    let acl = example();
    assert!(!acl.amqp_allows(None, AmqpPermission::Read, "x"));
    assert!(!acl.amqp_allows(Some("carol"), AmqpPermission::Read, "x"));
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        ("topic read a\nfrobnicate x\n", 2, "unknown keyword"),
        ("topic read a/#/b\n", 1, "bad topic filter"),
        ("topic\n", 1, "needs a topic filter"),
        ("\n\nuser\n", 3, "user NAME"),
        ("user a b\n", 1, "user NAME"),
        ("amqp .* .*\n", 1, "three regexes"),
        ("amqp ( .* .*\n", 1, "CONFIGURE"),
        ("user x\namqp .* .* .*\namqp .* .* .*\n", 3, "second `amqp`"),
        ("pattern read a+\n", 1, "bad topic filter"),
    ];
    for (text, want_line, want_reason) in cases {
        match Acl::parse(text) {
            Err(e @ AuthError::Parse { line, .. }) => {
                assert_eq!(line, want_line, "{e}");
                assert!(e.to_string().contains(want_reason), "{e}");
            }
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }
    let unknown = Acl::parse("frobnicate\n").expect_err("unknown keyword");
    assert!(
        unknown
            .to_string()
            .contains("topic [read|write|readwrite|deny] FILTER"),
        "{unknown}"
    );
}

#[test]
fn a_filter_named_like_an_access_word() {
    // `topic read` alone is a readwrite rule on the topic "read".
    let acl = Acl::parse("topic read\ntopic deny a b\n").expect("parses");
    assert!(acl.can_publish(None, "c", "read"));
    assert!(
        !acl.can_publish(None, "c", "a b"),
        "filters may hold spaces"
    );
}
