//! Cluster guard. Until per-slot archiving exists, an archive on a cluster node runs only when every key
//! it reads or writes (the flow's own keys, the engine-wide index entries and the archive index) hashes
//! to one slot that this node serves as primary; anything else would write into slots other nodes own
//! (the index entry would land nowhere and the flow's history be reachable only in S3).

use redis_module::{CallReply, Context, ContextFlags};

use crate::ops::errors::FlowError;
use crate::runtime::server::call;

/// CRC16-CCITT (XMODEM), the cluster's key hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (the text between the first `{` and the next `}`, if not empty),
/// else of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) & 16383
}

/// Whether this node serves `slot` as primary, from `CLUSTER SLOTS` and `CLUSTER MYID`.
fn serves(ctx: &Context, slot: u16) -> Result<bool, FlowError> {
    let me = call(ctx, "CLUSTER", &[b"MYID"])?;
    let me = crate::runtime::server::bytes(&me).unwrap_or_default();
    let slots = call(ctx, "CLUSTER", &[b"SLOTS"])?;
    let CallReply::Array(ranges) = &slots else {
        return Ok(false);
    };
    for range in ranges.iter().flatten() {
        let CallReply::Array(parts) = &range else {
            continue;
        };
        let int = |i: usize| match parts.get(i) {
            Some(Ok(CallReply::I64(n))) => Some(n.to_i64()),
            _ => None,
        };
        let (Some(start), Some(end)) = (int(0), int(1)) else {
            continue;
        };
        if !(start..=end).contains(&(slot as i64)) {
            continue;
        }
        // The first node of a range is its primary: [ip, port, id, ...].
        let primary_id = match parts.get(2) {
            Some(Ok(CallReply::Array(node))) => match node.get(2) {
                Some(Ok(r)) => crate::runtime::server::bytes(&r),
                _ => None,
            },
            _ => None,
        };
        return Ok(primary_id.as_deref() == Some(&me[..]));
    }
    Ok(false)
}

/// On a cluster node, refuses unless every key of `keys` sits in one slot this node serves.
pub fn check(ctx: &Context, keys: &[&str]) -> Result<(), FlowError> {
    if !ctx.get_flags().contains(ContextFlags::CLUSTER) {
        return Ok(());
    }
    let Some(first) = keys.first() else {
        return Ok(());
    };
    let slot = key_slot(first.as_bytes());
    if let Some(other) = keys.iter().find(|k| key_slot(k.as_bytes()) != slot) {
        return Err(FlowError::Cluster(format!(
            "keys {} and {} are in different slots ({slot} and {}); on a cluster every key of a flow and its index entry must share one slot (hash tags)",
            crate::ops::errors::show_key(first),
            crate::ops::errors::show_key(other),
            key_slot(other.as_bytes())
        )));
    }
    if !serves(ctx, slot)? {
        return Err(FlowError::Cluster(format!(
            "slot {slot} of key {} is not served by this node as primary",
            crate::ops::errors::show_key(first)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_spec() {
        // Values from the cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }
}
