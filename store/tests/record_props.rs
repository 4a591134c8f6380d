//! Generated tests of the record encoding: decoding any bytes is an error
//! or a record, never a panic; encoding round-trips; no strict prefix of an
//! encoding decodes.

use bytes::Bytes;
use edge_store::{DecodeError, Record};
use proptest::prelude::*;

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9/+#-]{1,24}",
        // Any Unicode, multi-byte included.
        prop::collection::vec(any::<char>(), 0..16).prop_map(|v| v.into_iter().collect()),
        // Long: a pattern, cheap to generate even in a debug build.
        ("[a-zé€]{1,4}", 1..max.max(2)).prop_map(|(unit, n)| unit.repeat(n)),
    ]
}

fn blob() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        // Large: a pattern from a seed, cheap to generate even in a debug build.
        1 => (any::<u8>(), 64usize..200_000).prop_map(|(seed, n)| {
            (0..n).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
        }),
    ]
    .prop_map(Bytes::from)
}

fn record() -> impl Strategy<Value = Record> {
    (
        any::<u64>(),
        any::<u8>(),
        any::<bool>(),
        text(1_000),
        text(100),
        prop::collection::vec((text(50), blob()), 0..6),
        blob(),
    )
        .prop_map(
            |(timestamp_ms, qos, retain, topic, publisher, headers, payload)| Record {
                timestamp_ms,
                qos,
                retain,
                topic,
                publisher,
                headers,
                payload,
            },
        )
}

fn encode(r: &Record) -> Result<Vec<u8>, TestCaseError> {
    r.encode()
        .map_err(|e| TestCaseError::fail(format!("encode: {e}")))
}

/// Encodings with bytes changed, dropped, inserted or cut off: inputs that
/// get past the version byte and the first lengths.
fn mangled() -> impl Strategy<Value = Vec<u8>> {
    (
        record(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(r, edits, cut)| {
            let mut bytes = r.encode().unwrap_or_default();
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes[i] ^= 1 << (byte % 8),
                    2 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, byte),
                }
            }
            let cut = cut.index(bytes.len() + 1);
            bytes.truncate(bytes.len() - cut / 8);
            bytes
        })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        // Version 1 followed by noise.
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|mut v| {
            v.insert(0, 1);
            v
        }),
        mangled(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decode_of_any_bytes_never_panics(bytes in any_input()) {
        if let Ok(r) = Record::decode(&bytes) {
            // What decodes re-encodes into something that decodes the same
            // (the flags byte is normalised, so not necessarily the same bytes).
            let again = encode(&r)?;
            prop_assert!(again.len() <= bytes.len());
            prop_assert_eq!(Record::decode(&again), Ok(r));
        }
    }

    #[test]
    fn round_trip(r in record()) {
        let bytes = encode(&r)?;
        prop_assert_eq!(bytes.len(), r.encoded_len());
        prop_assert_eq!(bytes[0], 1, "version");
        prop_assert_eq!(Record::decode(&bytes), Ok(r));
    }

    #[test]
    fn every_strict_prefix_fails(r in record()) {
        let bytes = encode(&r)?;
        // Every cut inside the fixed fields and the lengths, and a sample
        // of cuts inside long payloads (a full sweep of a 200 kB record
        // would be quadratic).
        let step = (bytes.len() / 1_000).max(1);
        let cuts = (0..bytes.len().min(1_024))
            .chain((0..bytes.len()).step_by(step))
            .chain(bytes.len().saturating_sub(64)..bytes.len());
        for cut in cuts {
            prop_assert!(
                Record::decode(&bytes[..cut]).is_err(),
                "prefix of {} of {} bytes decoded", cut, bytes.len()
            );
        }
    }

    #[test]
    fn unknown_version_is_refused(r in record(), version in any::<u8>()) {
        prop_assume!(version != 1);
        let mut bytes = encode(&r)?;
        bytes[0] = version;
        prop_assert_eq!(Record::decode(&bytes), Err(DecodeError::UnknownVersion(version)));
    }
}

#[test]
fn fields_over_their_length_prefix_are_refused_not_truncated() {
    let long = "x".repeat(usize::from(u16::MAX) + 1);
    let cases = [
        (
            Record {
                topic: long.clone(),
                ..Record::default()
            },
            "topic",
        ),
        (
            Record {
                publisher: long.clone(),
                ..Record::default()
            },
            "publisher",
        ),
        (
            Record {
                headers: vec![(long.clone(), Bytes::new())],
                ..Record::default()
            },
            "header key",
        ),
        (
            Record {
                headers: vec![(String::new(), Bytes::new()); usize::from(u16::MAX) + 1],
                ..Record::default()
            },
            "headers",
        ),
    ];
    for (r, field) in cases {
        assert_eq!(r.encode(), Err(DecodeError::TooLong(field)));
    }
    // The largest lengths that fit do round-trip.
    let fits = "y".repeat(usize::from(u16::MAX));
    let r = Record {
        topic: fits.clone(),
        publisher: fits,
        ..Record::default()
    };
    assert_eq!(Record::decode(&r.encode().expect("encode")), Ok(r));
}

#[test]
fn a_header_count_larger_than_the_input_is_truncated() {
    // version, timestamp, qos, flags, empty topic, empty publisher, 65535 headers.
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&[0; 10]);
    bytes.extend_from_slice(&[0, 0, 0, 0, 0xFF, 0xFF]);
    assert_eq!(Record::decode(&bytes), Err(DecodeError::Truncated));
}
