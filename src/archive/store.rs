//! The store stage: the object goes to S3 write-once.
//!
//! A key already holding exactly these bytes is an idempotent retry (an earlier attempt stored it and
//! did not commit: a crash, a failover, a pause). A key holding other content is never replaced (it may
//! be indexed by another server sharing the bucket, or be an uncommitted attempt of a flow that changed
//! since): the next generation key is tried instead (see `layout::GENERATIONS`). A new incarnation of
//! an id starts after its predecessor's generation, so it never takes its predecessor's key, even once
//! that object is gone (a lifecycle rule, an operator): the chain of `previous` locations only moves
//! forward, and a location, once indexed, never names other bytes.

use crate::format::captured::Captured;
use crate::format::Encoded;
use crate::layout;
use crate::ops::errors::FlowError;
use crate::s3::{FailureKind, S3Settings, Store, StoreError};

/// Stores `encoded` for `flow` and returns its key, once stored and verified.
pub fn store_once(
    s3: &Store,
    settings: &S3Settings,
    flow: &Captured,
    encoded: &Encoded,
) -> Result<String, FlowError> {
    let first = flow
        .previous
        .as_ref()
        .and_then(|location| layout::split_location(location, &flow.id))
        .map_or(0, |(_, generation)| generation + 1);
    let (prefix, max_name) = (&settings.prefix, settings.object_name_max);
    for key in layout::stored_keys_from(prefix, flow.db, &flow.id, first, max_name) {
        let existing = match s3.put_verified(&key, encoded) {
            Err(e) if e.kind == FailureKind::Exists => s3.verify_existing(&key, encoded),
            stored => return stored.map(|()| key).map_err(FlowError::Upload),
        };
        match existing {
            Ok(()) => return Ok(key),
            Err(e) if e.kind == FailureKind::Verify => continue,
            Err(e) => return Err(FlowError::Upload(e)),
        }
    }
    Err(FlowError::Upload(StoreError {
        kind: FailureKind::Exists,
        message: format!(
            "every one of the flow's {} object keys after its predecessor's holds other content; nothing was replaced",
            layout::GENERATIONS - first
        ),
    }))
}
