//! The archive object's format (docs/FORMAT.md): the names both its writer (archive::encode) and its
//! reader (read::decode) agree on, and the object as it travels to S3.

pub const FORMAT_NAME: &str = "flowarchive";
pub const FORMAT_VERSION: u64 = 1;

/// The encoded object, ready for upload.
pub struct Encoded {
    pub body: Vec<u8>,
    /// Uncompressed JSONL size, header included.
    pub raw_bytes: u64,
    pub object_sha256: [u8; 32],
    pub object_md5: [u8; 16],
}
