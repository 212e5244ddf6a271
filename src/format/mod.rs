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

/// Where the first byte `marked` answers for is in `bytes`. The loops that look at every byte of an
/// event (the writer's line-break scan; Go's JSON checker, reader and string writer) pass the long runs
/// with none in blocks of 32 bytes, each tested with no early exit inside it, which the compiler turns
/// into vector compares when `marked` compares without branches (`|`, not `||` or `matches!`); the
/// block that holds one is then looked at byte by byte.
pub(crate) fn find_marked(bytes: &[u8], marked: impl Fn(u8) -> bool) -> Option<usize> {
    let (blocks, _) = bytes.as_chunks::<32>();
    let clean = 32
        * blocks
            .iter()
            .position(|block| block.iter().fold(false, |found, &c| found | marked(c)))
            .unwrap_or(blocks.len());
    bytes[clean..]
        .iter()
        .position(|&c| marked(c))
        .map(|n| clean + n)
}

/// The encoded object, ready for upload.
pub struct Encoded {
    pub body: Vec<u8>,
    /// Uncompressed JSONL size, header included.
    pub raw_bytes: u64,
    pub object_sha256: [u8; 32],
    pub object_md5: [u8; 16],
}
