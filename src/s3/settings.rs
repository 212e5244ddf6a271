//! The S3 settings of one job, and the choices among them a config names (`sse`, `checksum`,
//! `verify`).

use std::sync::atomic::AtomicI64;

use super::{credentials, retry};

/// Server-side encryption of uploads (`sse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sse {
    None,
    Aes256,
    Kms,
}

impl Sse {
    pub fn parse(v: &str) -> Result<Sse, String> {
        match v {
            "" | "none" => Ok(Sse::None),
            "AES256" => Ok(Sse::Aes256),
            "aws:kms" => Ok(Sse::Kms),
            _ => Err("sse must be none, AES256 or aws:kms".into()),
        }
    }

    /// The `x-amz-server-side-encryption` value, if any.
    pub(super) fn header(self) -> Option<&'static str> {
        match self {
            Sse::None => None,
            Sse::Aes256 => Some("AES256"),
            Sse::Kms => Some("aws:kms"),
        }
    }
}

/// How uploads are checksummed (`checksum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// `Content-MD5` and `x-amz-checksum-sha256`.
    Sha256,
    /// `Content-MD5` only, for stores that reject `x-amz-checksum-*` headers; the sha256 is kept in
    /// the object's metadata and verified on read.
    Md5,
}

impl Checksum {
    pub fn parse(v: &str) -> Result<Checksum, String> {
        match v {
            "sha256" => Ok(Checksum::Sha256),
            "md5" => Ok(Checksum::Md5),
            _ => Err("checksum must be sha256 or md5".into()),
        }
    }
}

/// How an upload is proven stored before anything is deleted (`verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    /// A HEAD after every PUT must show the uploaded size and prove the content.
    Head,
    /// The PUT's answer proves the upload when it echoes the object's sha256, from any store: one
    /// request fewer, and a store that records checksums unchecked is believed.
    PutResponse,
    /// The PUT's echo proves the upload only from a store proven to validate checksums (a probe with
    /// a wrong checksum was refused, [`proven`]); otherwise, and under `checksum md5`, the HEAD.
    Auto,
}

/// S3 destination and credentials of one job.
#[derive(Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    pub credentials: credentials::CredentialConfig,
    pub timeout_ms: u64,
    pub verify: VerifyMode,
    /// Where what is learnt of a store is said: the server log at notice (`s3` does not import `ops`).
    pub notice: fn(&str),
    pub retry: retry::Policy,
    pub sse: Sse,
    pub sse_kms_key_id: String,
    pub storage_class: String,
    pub checksum: Checksum,
    /// The longest object name (the key's last segment) the store takes (`object-name-max`).
    pub object_name_max: usize,
    /// The upload rate cap shared by all uploads, bytes per second (0: unlimited), read live at every
    /// wait, so a CONFIG SET applies to uploads already waiting.
    pub upload_bytes_per_sec: &'static AtomicI64,
}
