//! The archive object's format (docs/FORMAT.md), pure code: the flow as captured (`captured`, its
//! event log in one buffer: `event_log`), its writer and the read-back proof (`writer`), its reader
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

/// The encoded object, ready for upload.
pub struct Encoded {
    pub body: Vec<u8>,
    /// Uncompressed JSONL size, header included.
    pub raw_bytes: u64,
    pub object_sha256: [u8; 32],
    pub object_md5: [u8; 16],
}
