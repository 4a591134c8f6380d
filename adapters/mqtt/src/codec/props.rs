//! The MQTT 5 property checks rumqttd's v5 codec leaves out.
//!
//! rumqttd parses property blocks leniently: a repeated property silently
//! replaces the first, a property of another packet type is accepted, and a
//! value that runs past the block's declared length is read anyway. MQTT 5
//! makes each of these an error with its own reason code (§2.2.2.2,
//! §4.13), so every client-bound property block is scanned here, from the
//! raw frame, before rumqttd decodes the packet:
//!
//! - an unknown property id, or a value cut by the end of its block or of
//!   the packet, is a Malformed Packet (0x81);
//! - a known property in a packet that does not carry it, a repeated one
//!   (user properties and, in SUBSCRIBE, none other may repeat), or a value
//!   the spec forbids (receive maximum 0, a flag other than 0/1,
//!   subscription identifier 0) is a Protocol Error (0x82).

use crate::error::ProtocolError;

/// Which property block is scanned: the allowed ids differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    Connect,
    Will,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
}

/// How a property's value is laid out.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Byte,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

fn kind(id: u8) -> Option<Kind> {
    Some(match id {
        1 | 23 | 25 | 36 | 37 | 40 | 41 | 42 => Kind::Byte,
        19 | 33 | 34 | 35 => Kind::U16,
        2 | 17 | 24 | 39 => Kind::U32,
        11 => Kind::VarInt,
        3 | 8 | 18 | 21 | 26 | 28 | 31 => Kind::Str,
        9 | 22 => Kind::Bin,
        38 => Kind::Pair,
        _ => return None,
    })
}

fn allowed(block: Block, id: u8) -> bool {
    let ids: &[u8] = match block {
        Block::Connect => &[17, 21, 22, 23, 25, 33, 34, 38, 39],
        Block::Will => &[1, 2, 3, 8, 9, 24, 38],
        // 11 (subscription identifier) goes from server to client only
        // (MQTT-3.3.4-6).
        Block::Publish => &[1, 2, 3, 8, 9, 35, 38],
        Block::Ack => &[31, 38],
        Block::Subscribe => &[11, 38],
        Block::Unsubscribe => &[38],
        Block::Disconnect => &[17, 28, 31, 38],
    };
    ids.contains(&id)
}

/// A variable byte integer at the start of `b`: (value, bytes taken).
pub(crate) fn varint(b: &[u8]) -> Result<(usize, usize), ProtocolError> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(ProtocolError::BadProperty {
        violation: false,
        why: "property length or value is not a valid variable byte integer".into(),
    })
}

fn malformed(why: String) -> ProtocolError {
    ProtocolError::BadProperty {
        violation: false,
        why,
    }
}

fn violation(why: String) -> ProtocolError {
    ProtocolError::BadProperty {
        violation: true,
        why,
    }
}

/// Checks the property block at the start of `b` (its length first);
/// returns the bytes it takes, length included.
pub(crate) fn check(block: Block, b: &[u8]) -> Result<usize, ProtocolError> {
    let (len, len_len) = varint(b)?;
    let end = len_len
        .checked_add(len)
        .filter(|end| *end <= b.len())
        .ok_or_else(|| malformed(format!("property length {len} runs past the packet")))?;
    let mut p = &b[len_len..end];
    let mut seen = [false; 43];
    while let Some((&id, rest)) = p.split_first() {
        let Some(kind) = kind(id) else {
            return Err(malformed(format!("unknown property id {id}")));
        };
        if !allowed(block, id) {
            return Err(violation(format!(
                "property {id} is not allowed in this packet"
            )));
        }
        if seen[usize::from(id)] && id != 38 {
            return Err(violation(format!("property {id} appears twice")));
        }
        seen[usize::from(id)] = true;
        let cut = || malformed(format!("property {id} runs past its block"));
        let size = match kind {
            Kind::Byte => {
                let v = *rest.first().ok_or_else(cut)?;
                if matches!(id, 1 | 23 | 25) && v > 1 {
                    return Err(violation(format!("property {id} must be 0 or 1, not {v}")));
                }
                1
            }
            Kind::U16 => {
                let v = rest.get(..2).ok_or_else(cut)?;
                if id == 33 && v == [0, 0] {
                    return Err(violation("receive maximum 0".into()));
                }
                2
            }
            Kind::U32 => {
                let v = rest.get(..4).ok_or_else(cut)?;
                if id == 39 && v == [0, 0, 0, 0] {
                    return Err(violation("maximum packet size 0".into()));
                }
                4
            }
            Kind::VarInt => {
                let (v, n) = varint(rest).map_err(|_| cut())?;
                if v == 0 {
                    return Err(violation("subscription identifier 0".into()));
                }
                n
            }
            Kind::Str | Kind::Bin => string_len(rest).ok_or_else(cut)?,
            Kind::Pair => {
                let key = string_len(rest).ok_or_else(cut)?;
                key + string_len(&rest[key..]).ok_or_else(cut)?
            }
        };
        p = &rest[size..];
    }
    Ok(end)
}

/// Bytes a length-prefixed string or binary value takes, if all there.
fn string_len(b: &[u8]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    (b.len() >= 2 + len).then_some(2 + len)
}

/// A length-prefixed field at the start of `b`: bytes it takes.
pub(crate) fn field_len(b: &[u8]) -> Result<usize, ProtocolError> {
    string_len(b).ok_or_else(|| malformed("a field runs past the packet".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_violation(r: Result<usize, ProtocolError>) -> Option<bool> {
        match r {
            Err(ProtocolError::BadProperty { violation, .. }) => Some(violation),
            _ => None,
        }
    }

    #[test]
    fn blocks_are_checked_like_the_spec_says() {
        // Empty block.
        assert_eq!(check(Block::Publish, &[0]).expect("ok"), 1);
        // Message expiry 10 s, two user properties.
        let mut b = vec![0, 2, 0, 0, 0, 10];
        b.extend_from_slice(&[38, 0, 1, b'k', 0, 1, b'v', 38, 0, 1, b'k', 0, 1, b'w']);
        b[0] = (b.len() - 1) as u8;
        assert_eq!(check(Block::Publish, &b).expect("ok"), b.len());
        // Unknown id 99: malformed.
        assert_eq!(
            is_violation(check(Block::Publish, &[2, 99, 0])),
            Some(false)
        );
        // Twice message expiry: protocol error.
        let twice = [10, 2, 0, 0, 0, 1, 2, 0, 0, 0, 1];
        assert_eq!(is_violation(check(Block::Publish, &twice)), Some(true));
        // Block length past the packet: malformed.
        assert_eq!(is_violation(check(Block::Publish, &[9, 1, 0])), Some(false));
        // A value past its block (string of 5 in a block of 3): malformed.
        assert_eq!(
            is_violation(check(
                Block::Publish,
                &[3, 3, 0, 5, b'a', b'b', b'c', b'd', b'e']
            )),
            Some(false)
        );
        // Subscription identifier from a client's PUBLISH: protocol error.
        assert_eq!(is_violation(check(Block::Publish, &[2, 11, 1])), Some(true));
        assert_eq!(check(Block::Subscribe, &[2, 11, 1]).expect("ok"), 3);
        assert_eq!(
            is_violation(check(Block::Subscribe, &[2, 11, 0])),
            Some(true)
        );
        // Receive maximum 0, request problem information 2.
        assert_eq!(
            is_violation(check(Block::Connect, &[3, 33, 0, 0])),
            Some(true)
        );
        assert_eq!(is_violation(check(Block::Connect, &[2, 23, 2])), Some(true));
        // Will delay belongs to the will, not the CONNECT.
        assert_eq!(
            is_violation(check(Block::Connect, &[5, 24, 0, 0, 0, 1])),
            Some(true)
        );
        assert_eq!(check(Block::Will, &[5, 24, 0, 0, 0, 1]).expect("ok"), 6);
    }
}
