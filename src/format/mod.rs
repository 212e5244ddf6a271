//! The archive object's format (docs/FORMAT.md), pure code: the flow as captured (`captured`, its
//! event log in a few blocks: `event_log`), its writer and the read-back proof (`writer`), its reader
//! (`reader`), the names they agree on, the object as it travels to S3, and the engine's state folded
//! from a flow's events (`engine`, with Go's JSON and time rules in `gojson` and `gotime`). Archiving
//! and reading both build on this room; it calls neither, nor the server.

pub mod captured;
pub mod engine;
pub mod event_log;
pub mod gojson;
pub mod gotime;
pub mod reader;
pub mod writer;

pub const FORMAT_NAME: &str = "flowarchive";
/// Version 2 added the trailer's `state`, the header's `previous`, and a `null` snapshot; readers
/// still read version 1.
pub const FORMAT_VERSION: u64 = 2;

/// The bytes a scan stops at (`find_marked`): `bytes`, and with `below` above 0 every byte under it.
pub(crate) struct Marks<const N: usize> {
    pub bytes: [u8; N],
    pub below: u8,
}

impl<const N: usize> Marks<N> {
    /// Whether the scan stops at `c` (compared without branches, so the portable scan vectorizes).
    pub fn has(&self, c: u8) -> bool {
        self.bytes
            .iter()
            .fold(c < self.below, |hit, &b| hit | (c == b))
    }
}

/// Where the first byte of `marks` is in `bytes`. The loops that look at every byte of an event (the
/// writer's line-break scan; Go's JSON checker, reader and string writer) call it at every string and
/// container, mostly to find a mark a few bytes on: blocks of 16 bytes are compared at once and the
/// mark's place taken from the block's bit mask, not looked for byte by byte; the last bytes, fewer
/// than a block, one at a time.
pub(crate) fn find_marked<const N: usize>(bytes: &[u8], marks: &Marks<N>) -> Option<usize> {
    let (blocks, _) = bytes.as_chunks::<16>();
    for (i, block) in blocks.iter().enumerate() {
        let mask = block_mask(block, marks);
        if mask != 0 {
            return Some(16 * i + mask.trailing_zeros() as usize);
        }
    }
    let clean = 16 * blocks.len();
    bytes[clean..]
        .iter()
        .position(|&c| marks.has(c))
        .map(|n| clean + n)
}

/// Bit `i` set where byte `i` of `block` is marked: SSE2 (in every x86-64 CPU) compares all 16 at
/// once.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn block_mask<const N: usize>(block: &[u8; 16], marks: &Marks<N>) -> u32 {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline every build targets; the load reads exactly the 16
    // bytes of `block`, unaligned.
    unsafe {
        let v = _mm_loadu_si128(block.as_ptr().cast());
        let mut hit = _mm_setzero_si128();
        for &b in &marks.bytes {
            hit = _mm_or_si128(hit, _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8)));
        }
        if marks.below > 0 {
            // v < below exactly where min(v, below - 1) == v (unsigned bytes).
            let ceiling = _mm_set1_epi8((marks.below - 1) as i8);
            hit = _mm_or_si128(hit, _mm_cmpeq_epi8(_mm_min_epu8(v, ceiling), v));
        }
        _mm_movemask_epi8(hit) as u32
    }
}

/// Elsewhere: the bytes compared without branches, which compilers turn into vector compares.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn block_mask<const N: usize>(block: &[u8; 16], marks: &Marks<N>) -> u32 {
    block
        .iter()
        .enumerate()
        .fold(0, |mask, (i, &c)| mask | (u32::from(marks.has(c)) << i))
}

/// The encoded object, ready for upload.
pub struct Encoded {
    pub body: Vec<u8>,
    /// Uncompressed JSONL size, header included.
    pub raw_bytes: u64,
    pub object_sha256: [u8; 32],
    pub object_md5: [u8; 16],
}

/// Checks `find_marked` with `marks` against a byte-by-byte scan: every byte value at every place of
/// texts around the block sizes, over a clean run, with a mark after it (the bytes around `below` and
/// past 0x7f among them: the vector compare is unsigned). Each scanner's tests pass it their set.
#[cfg(test)]
pub(crate) fn assert_scan_agrees<const N: usize>(marks: &Marks<N>) {
    let one_by_one = |bytes: &[u8]| bytes.iter().position(|&c| marks.has(c));
    assert!(!marks.has(b'a'), "the clean byte is marked");
    for value in 0..=255u8 {
        for len in [1, 15, 16, 17, 31, 32, 33, 47, 70] {
            for at in 0..len {
                let mut text = vec![b'a'; len];
                text[at] = value;
                if at + 1 < len {
                    text[len - 1] = marks.bytes.first().copied().unwrap_or(b'a');
                }
                assert_eq!(
                    find_marked(&text, marks),
                    one_by_one(&text),
                    "{value:#x} at {at} of {len}"
                );
            }
        }
    }
    assert_eq!(find_marked(&[], marks), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set of no bytes and a bound other than the control characters'.
    #[test]
    fn blocks_find_the_first_byte_under_a_bound() {
        assert_scan_agrees(&Marks {
            bytes: [],
            below: 0x41,
        });
    }
}
