//! Cluster slots: the key hash, and the per-slot name of the archive index. Pure arithmetic, shared by
//! the layout (which names keys) and the cluster checks (which guard them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub const SLOTS: usize = 16384;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether the server runs in cluster mode (fixed for the life of the process).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Set once at load.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Builds the slot tag table ahead of the first index name (at load, on a cluster node).
pub fn build_tags() {
    let _ = tags();
}

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
    crc16(tagged.unwrap_or(key)) & (SLOTS as u16 - 1)
}

/// For every slot, the smallest non-negative integer whose decimal text hashes to it (the largest is
/// 109757; the table is built once, at load on a cluster node).
pub fn tags() -> &'static [u32] {
    static TABLE: OnceLock<Vec<u32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![u32::MAX; SLOTS];
        let mut missing = SLOTS;
        let mut n = 0u32;
        while missing > 0 {
            let slot = crc16(n.to_string().as_bytes()) as usize & (SLOTS - 1);
            if table[slot] == u32::MAX {
                table[slot] = n;
                missing -= 1;
            }
            n += 1;
        }
        table
    })
}

/// The index hash of `slot`: `<index>:{N}`, N the slot's tag (see the module docs).
pub fn slot_index_key(index: &str, slot: u16) -> String {
    format!("{index}:{{{}}}", tags()[slot as usize])
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

    #[test]
    fn every_slot_has_the_smallest_decimal_tag() {
        let t = tags();
        for (slot, &n) in t.iter().enumerate() {
            assert_eq!(key_slot(n.to_string().as_bytes()) as usize, slot);
            assert_eq!(
                key_slot(slot_index_key("archived:flows", slot as u16).as_bytes()) as usize,
                slot
            );
        }
        assert_eq!(t[0], 3560);
        assert_eq!(*t.iter().max().unwrap(), 109_757);
        // Smallest: no smaller integer hashes to the slot.
        assert!((0..3560u32).all(|n| key_slot(n.to_string().as_bytes()) != 0));
    }
}
