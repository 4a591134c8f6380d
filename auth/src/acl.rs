//! The ACL file: Mosquitto `acl_file` syntax for MQTT topics plus one
//! `amqp CONFIGURE WRITE READ` line per user for AMQP resources.
//!
//! ```text
//! # Before any `user` line: anonymous clients.
//! topic read public/#
//! # Patterns apply to every client: %u user name, %c client id.
//! pattern readwrite devices/%u/#
//! user alice
//! topic write sensors/+/temp
//! topic deny sensors/secret
//! # AMQP: configure, write and read regexes; "" matches nothing.
//! amqp "" ^alice\..* .*
//! ```
//!
//! Rules for a client = its user section (or the anonymous section) + every
//! pattern, substituted. Publish is allowed iff some write/readwrite filter
//! matches the topic and no deny filter matches it. Subscribe is allowed iff
//! some read/readwrite filter [`covers`] the subscription and no deny filter
//! [`overlaps`] it. A substituted value holding `+`, `#` or `/` drops the
//! pattern, so substitution never widens access. Topics starting with `$`
//! are only matched by a literal first level (MQTT-4.7.2-1).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use regex::Regex;

use crate::AuthError;
use crate::passwd::validate_user_name;

/// What a rule grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn from_word(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }

    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// A `topic` rule: a validated filter.
#[derive(Debug, Clone)]
struct TopicRule {
    access: Access,
    filter: String,
}

/// A `pattern` rule: a filter template with `%u` / `%c`.
#[derive(Debug, Clone)]
struct PatternRule {
    access: Access,
    template: String,
}

impl PatternRule {
    /// The filter for this client, or None if the pattern does not apply.
    /// One pass, so a value holding `%c` or `%u` is not substituted again.
    fn substitute(&self, user: Option<&str>, client_id: &str) -> Option<String> {
        let mut filter = String::with_capacity(self.template.len() + 16);
        let mut rest = self.template.as_str();
        while let Some(at) = rest.find('%') {
            filter.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let value = match after.chars().next() {
                Some('u') => user?,
                Some('c') => client_id,
                _ => {
                    filter.push('%');
                    rest = after;
                    continue;
                }
            };
            if value.contains(['+', '#', '/']) {
                return None;
            }
            filter.push_str(value);
            rest = &after[1..];
        }
        filter.push_str(rest);
        validate_filter(&filter).ok()?;
        Some(filter)
    }
}

/// An `amqp` line: one anchored regex per permission; None matches nothing.
#[derive(Debug, Clone)]
struct AmqpRule {
    configure: Option<Regex>,
    write: Option<Regex>,
    read: Option<Regex>,
}

/// The rules of one `user` section (or of the anonymous one).
#[derive(Debug, Clone, Default)]
struct Section {
    topics: Vec<TopicRule>,
    amqp: Option<AmqpRule>,
}

/// An AMQP permission, as in RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AmqpPermission {
    /// Declare or delete exchanges and queues.
    Configure,
    /// Publish to an exchange, bind a queue to an exchange (the queue side).
    Write,
    /// Consume from a queue, bind from an exchange (the exchange side).
    Read,
}

/// Parsed ACL file: who may publish, subscribe, and touch AMQP resources.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Section,
    users: HashMap<String, Section>,
    patterns: Vec<PatternRule>,
}

const ALLOWED: &str = "expected `user NAME`, `topic [read|write|readwrite|deny] FILTER`, \
     `pattern [read|write|readwrite|deny] FILTER` or `amqp CONFIGURE WRITE READ`";

impl Acl {
    /// Reads and parses the ACL file at `path`.
    pub fn load(path: &Path) -> Result<Acl, AuthError> {
        let text = fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
        parse(&text, path)
    }

    /// Parses ACL text (errors name the path `<text>`).
    pub fn parse(text: &str) -> Result<Acl, AuthError> {
        parse(text, Path::new("<text>"))
    }

    /// Whether the client may publish to `topic` (a topic name, no wildcards).
    pub fn can_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        if validate_topic(topic).is_err() {
            return false;
        }
        let mut allowed = false;
        for (access, filter) in self.rules(user, client_id) {
            if matches(&filter, topic) {
                if access == Access::Deny {
                    return false;
                }
                allowed |= access.writes();
            }
        }
        allowed
    }

    /// Whether the client may subscribe to `filter` (a `$share/GROUP/` prefix
    /// is stripped first).
    pub fn can_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let Some(filter) = strip_share(filter) else {
            return false;
        };
        if validate_filter(filter).is_err() {
            return false;
        }
        let mut allowed = false;
        for (access, rule) in self.rules(user, client_id) {
            if access == Access::Deny {
                if overlaps(&rule, filter) {
                    return false;
                }
            } else if access.reads() && !allowed {
                allowed = covers(&rule, filter);
            }
        }
        allowed
    }

    /// Whether the client's `amqp` line grants `permission` on `resource`
    /// (the whole name must match). No `amqp` line: nothing is allowed.
    pub fn amqp_allows(
        &self,
        user: Option<&str>,
        permission: AmqpPermission,
        resource: &str,
    ) -> bool {
        let Some(rule) = self.section(user).and_then(|s| s.amqp.as_ref()) else {
            return false;
        };
        let regex = match permission {
            AmqpPermission::Configure => &rule.configure,
            AmqpPermission::Write => &rule.write,
            AmqpPermission::Read => &rule.read,
        };
        regex.as_ref().is_some_and(|r| r.is_match(resource))
    }

    fn section(&self, user: Option<&str>) -> Option<&Section> {
        match user {
            None => Some(&self.anonymous),
            Some(name) => self.users.get(name),
        }
    }

    /// The rules that apply to this client: its section's, then the patterns'.
    fn rules<'a>(
        &'a self,
        user: Option<&'a str>,
        client_id: &'a str,
    ) -> impl Iterator<Item = (Access, String)> + 'a {
        let topics = self
            .section(user)
            .into_iter()
            .flat_map(|s| s.topics.iter())
            .map(|r| (r.access, r.filter.clone()));
        let patterns = self
            .patterns
            .iter()
            .filter_map(move |p| Some((p.access, p.substitute(user, client_id)?)));
        topics.chain(patterns)
    }
}

fn parse(text: &str, path: &Path) -> Result<Acl, AuthError> {
    let mut acl = Acl::default();
    let mut current: Option<String> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let error = |reason: String| AuthError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (keyword, rest) = split_word(trimmed);
        let section = match &current {
            None => &mut acl.anonymous,
            Some(name) => acl.users.entry(name.clone()).or_default(),
        };
        match keyword {
            "user" => {
                validate_user_name(rest).map_err(|e| error(format!("`user NAME`: {e}")))?;
                acl.users.entry(rest.to_string()).or_default();
                current = Some(rest.to_string());
            }
            "topic" | "pattern" => {
                let (access, filter) = split_access(rest);
                if filter.is_empty() {
                    return Err(error(format!("`{keyword}` needs a topic filter")));
                }
                validate_filter(filter)
                    .map_err(|reason| error(format!("bad topic filter {filter:?}: {reason}")))?;
                if keyword == "topic" {
                    section.topics.push(TopicRule {
                        access,
                        filter: filter.to_string(),
                    });
                } else {
                    acl.patterns.push(PatternRule {
                        access,
                        template: filter.to_string(),
                    });
                }
            }
            "amqp" => {
                if section.amqp.is_some() {
                    return Err(error(
                        "a second `amqp` line for the same user (one per user)".into(),
                    ));
                }
                let words: Vec<&str> = rest.split_whitespace().collect();
                let [configure, write, read] = words[..] else {
                    return Err(error(format!(
                        "`amqp` needs three regexes (CONFIGURE WRITE READ; `\"\"` matches nothing), found {}",
                        words.len()
                    )));
                };
                let compile = |name: &str, word: &str| {
                    amqp_regex(word).map_err(|e| error(format!("bad {name} regex: {e}")))
                };
                section.amqp = Some(AmqpRule {
                    configure: compile("CONFIGURE", configure)?,
                    write: compile("WRITE", write)?,
                    read: compile("READ", read)?,
                });
            }
            other => return Err(error(format!("unknown keyword {other:?}: {ALLOWED}"))),
        }
    }
    Ok(acl)
}

/// The first word and the rest, trimmed.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (s, ""),
    }
}

/// `[ACCESS] FILTER`: an access word followed by a filter, or a bare filter (readwrite).
fn split_access(rest: &str) -> (Access, &str) {
    let (word, filter) = split_word(rest);
    match Access::from_word(word) {
        Some(access) if !filter.is_empty() => (access, filter),
        _ => (Access::ReadWrite, rest),
    }
}

/// An anchored regex; `""` (or an empty word) matches nothing. Surrounding
/// double quotes are stripped, as a shell would for `rabbitmqctl`.
fn amqp_regex(word: &str) -> Result<Option<Regex>, regex::Error> {
    let inner = word
        .strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .unwrap_or(word);
    if inner.is_empty() {
        return Ok(None);
    }
    Regex::new(&format!("^(?:{inner})$")).map(Some)
}

/// Strips a `$share/GROUP/` prefix; None if the prefix is malformed.
fn strip_share(filter: &str) -> Option<&str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Some(filter);
    };
    let (group, filter) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return None;
    }
    Some(filter)
}

/// Checks an MQTT topic filter: not empty, `#` only as the whole last level,
/// `+` only as a whole level, no NUL.
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("it is empty");
    }
    if filter.contains('\0') {
        return Err("it contains NUL");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

/// Checks an MQTT topic name: not empty, no wildcards, no NUL.
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("it is empty");
    }
    if topic.contains(['+', '#', '\0']) {
        return Err("a topic name holds no `+`, `#` or NUL");
    }
    Ok(())
}

fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Whether the valid filter `filter` matches the topic name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if t[0].starts_with('$') && is_wildcard(f[0]) {
        return false;
    }
    let mut i = 0;
    loop {
        match (f.get(i), t.get(i)) {
            (Some(&"#"), _) => return true,
            (None, None) => return true,
            (Some(&"+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        i += 1;
    }
}

/// Whether every topic `sub` matches is matched by `rule` (both valid filters).
///
/// The empty topic (invalid in MQTT) is counted as a topic, which only ever
/// errs towards "not covered".
pub fn covers(rule: &str, sub: &str) -> bool {
    let r: Vec<&str> = rule.split('/').collect();
    let mut s: Vec<&str> = sub.split('/').collect();
    if s[0].starts_with('$') && is_wildcard(r[0]) {
        return false;
    }
    // At the first level `#` means "one level or more" (a topic has at least
    // one level), which `+/#` also means.
    if s == ["#"] {
        s = vec!["+", "#"];
    }
    covers_levels(&r, &s)
}

fn covers_levels(r: &[&str], s: &[&str]) -> bool {
    match (r.first(), s.first()) {
        (Some(&"#"), _) => true,
        (None, None) => true,
        (_, Some(&"#")) | (None, Some(_)) | (Some(_), None) => false,
        (Some(&"+"), Some(_)) => covers_levels(&r[1..], &s[1..]),
        (Some(a), Some(b)) => a == b && covers_levels(&r[1..], &s[1..]),
    }
}

/// Whether some topic is matched by both valid filters.
///
/// The empty topic (invalid in MQTT) is counted as a topic, which only ever
/// errs towards "overlapping" (so a deny rule refuses a little more).
pub fn overlaps(a: &str, b: &str) -> bool {
    let a: Vec<&str> = a.split('/').collect();
    let b: Vec<&str> = b.split('/').collect();
    let excludes_dollar = |x: &str, y: &str| is_wildcard(x) && y.starts_with('$');
    if excludes_dollar(a[0], b[0]) || excludes_dollar(b[0], a[0]) {
        return false;
    }
    overlaps_levels(&a, &b)
}

fn overlaps_levels(a: &[&str], b: &[&str]) -> bool {
    match (a.first(), b.first()) {
        (Some(&"#"), _) | (_, Some(&"#")) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(x), Some(y)) => {
            (*x == "+" || *y == "+" || x == y) && overlaps_levels(&a[1..], &b[1..])
        }
    }
}

#[cfg(test)]
mod tests;
