//! Tests of the per-source guard, on synthetic instants.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

fn limits() -> GuardLimits {
    GuardLimits {
        max_connections_per_source: 2,
        connections_per_second_per_source: 1000.0,
        login_backoff_base: Duration::from_secs(1),
        login_backoff_max: Duration::from_secs(5),
        login_failures_allowed: 0,
    }
}

#[test]
fn the_first_failures_are_allowed_before_the_backoff() {
    let guard = SourceGuard::new(GuardLimits {
        login_failures_allowed: 2,
        ..limits()
    });
    let now = Instant::now();
    for _ in 0..2 {
        assert_eq!(guard.login_failed(LOOPBACK, now), Duration::ZERO);
        drop(guard.admit(LOOPBACK, now).expect("no back-off yet"));
    }
    assert_eq!(guard.login_failed(LOOPBACK, now), Duration::from_secs(1));
    assert!(matches!(
        guard.admit(LOOPBACK, now),
        Err(Refusal::LoginBackoff { .. })
    ));
    // A success does not reset the count; a quiet spell does.
    let quiet = now + guard.quiet() + Duration::from_secs(1);
    assert_eq!(guard.login_failed(LOOPBACK, quiet), Duration::ZERO);
}

#[test]
fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
    let guard = SourceGuard::new(limits());
    let now = Instant::now();
    let a: IpAddr = "2001:db8:1:2::10".parse().expect("addr");
    let b: IpAddr = "2001:db8:1:2:ffff::99".parse().expect("addr");
    let elsewhere: IpAddr = "2001:db8:1:3::10".parse().expect("addr");
    let _one = guard.admit(a, now).expect("first");
    let _two = guard.admit(b, now).expect("second, same /64");
    assert_eq!(
        guard.admit(a, now).err(),
        Some(Refusal::TooManyConnections),
        "a new address in the same /64 is the same source"
    );
    assert!(guard.admit(elsewhere, now).is_ok());
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("addr");
    assert_eq!(
        source_key(mapped),
        "192.0.2.1".parse::<IpAddr>().expect("addr")
    );
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const OTHER: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn connection_count_is_per_source_and_released_on_drop() {
    let guard = SourceGuard::new(limits());
    let t0 = Instant::now();
    let a = guard.admit(LOOPBACK, t0).expect("first");
    let b = guard.admit(LOOPBACK, t0).expect("second");
    assert_eq!(
        guard.admit(LOOPBACK, t0).err(),
        Some(Refusal::TooManyConnections)
    );
    let other = guard
        .admit(OTHER, t0)
        .expect("another source has its own count");
    assert_eq!(other.ip(), OTHER);
    drop(a);
    let c = guard.admit(LOOPBACK, t0).expect("a slot was given back");
    drop((b, c, other));
    assert_eq!(guard.sources(), 2);
}

#[test]
fn connection_rate_has_a_burst_of_twice_the_rate() {
    let guard = SourceGuard::new(GuardLimits {
        max_connections_per_source: usize::MAX,
        connections_per_second_per_source: 2.0,
        ..limits()
    });
    let t0 = Instant::now();
    let mut permits = Vec::new();
    for _ in 0..4 {
        permits.push(guard.admit(LOOPBACK, t0).expect("within the burst of 4"));
    }
    assert_eq!(
        guard.admit(LOOPBACK, t0).err(),
        Some(Refusal::ConnectionRate)
    );
    // A refusal costs no token: half a second later one connection is due.
    let t1 = t0 + Duration::from_millis(500);
    permits.push(guard.admit(LOOPBACK, t1).expect("refilled one"));
    assert_eq!(
        guard.admit(LOOPBACK, t1).err(),
        Some(Refusal::ConnectionRate)
    );
}

#[test]
fn a_fractional_rate_still_allows_one() {
    let guard = SourceGuard::new(GuardLimits {
        connections_per_second_per_source: 0.1,
        ..limits()
    });
    let t0 = Instant::now();
    drop(guard.admit(LOOPBACK, t0).expect("burst is at least 1"));
    assert_eq!(
        guard.admit(LOOPBACK, t0).err(),
        Some(Refusal::ConnectionRate)
    );
    assert!(guard.admit(LOOPBACK, t0 + Duration::from_secs(10)).is_ok());
}

#[test]
fn login_backoff_doubles_up_to_the_max_and_resets() {
    let guard = SourceGuard::new(limits());
    let t0 = Instant::now();
    let want = [1, 2, 4, 5, 5];
    let mut now = t0;
    for secs in want {
        assert_eq!(guard.login_failed(LOOPBACK, now), Duration::from_secs(secs));
        let refused = guard.admit(LOOPBACK, now).err();
        assert_eq!(
            refused,
            Some(Refusal::LoginBackoff {
                remaining: Duration::from_secs(secs)
            })
        );
        assert_eq!(refused.map(|r| r.reason()), Some("login_backoff"));
        let almost = now + Duration::from_secs(secs) - Duration::from_millis(1);
        assert!(matches!(
            guard.admit(LOOPBACK, almost),
            Err(Refusal::LoginBackoff { remaining }) if remaining == Duration::from_millis(1)
        ));
        now += Duration::from_secs(secs);
        drop(guard.admit(LOOPBACK, now).expect("the back-off ran out"));
    }
    assert!(
        guard.admit(OTHER, now).is_ok(),
        "other sources are unaffected"
    );
    // Failures are forgotten only after a quiet spell: the doubling then
    // starts again from the base.
    let later = now + guard.quiet() + Duration::from_secs(1);
    assert_eq!(guard.login_failed(LOOPBACK, later), Duration::from_secs(1));
}

#[test]
fn reasons() {
    assert_eq!(
        Refusal::TooManyConnections.reason(),
        "max_connections_per_source"
    );
    assert_eq!(Refusal::ConnectionRate.reason(), "connection_rate");
}

#[test]
fn idle_entries_are_pruned_and_busy_ones_kept() {
    let guard = SourceGuard::new(limits());
    let t0 = Instant::now();
    let held = guard.admit(LOOPBACK, t0).expect("held");
    guard.login_failed(OTHER, t0);
    // Many one-off sources, each idle once its token has refilled; with
    // `held` these are the first PRUNE_EVERY - 1 admissions.
    for i in 0..(PRUNE_EVERY - 2) {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
        drop(guard.admit(ip, t0).expect("fresh source"));
    }
    assert_eq!(guard.sources(), PRUNE_EVERY as usize);
    // The next admission (number PRUNE_EVERY) prunes: buckets are full 1 s later, OTHER's
    // back-off (1 s) has not run out at 0.5 s.
    let t1 = t0 + Duration::from_millis(500);
    let busy = guard.admit(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t1);
    assert!(busy.is_ok());
    assert_eq!(guard.sources(), 3, "held + backing off + the new one");
    assert!(matches!(
        guard.admit(OTHER, t1),
        Err(Refusal::LoginBackoff { .. })
    ));
    drop(held);
}

#[test]
fn guard_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SourceGuard>();
    assert_send_sync::<SourcePermit>();
}
