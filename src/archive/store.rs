//! The store stage: the object goes to S3 write-once.
//!
//! A key already holding exactly these bytes is an idempotent retry (an earlier attempt stored it and
//! did not commit: a crash, a failover, a pause). A key holding other content is never replaced (it may
//! be indexed by another server sharing the bucket, or be an uncommitted attempt of a flow that changed
//! since): the next generation key is tried instead (see `layout::GENERATIONS`). A new incarnation of
//! an id starts after its predecessor's generation (whichever form its name took), so it never takes
//! its predecessor's key, even once that object is gone (a lifecycle rule, an operator): the chain of
//! `previous` locations only moves forward, and a location, once indexed, never names other bytes. A
//! predecessor in another folder (another DB's, after SWAPDB; an earlier bucket or prefix) shares no
//! key with it, and the new incarnation starts at its folder's generation 0, where a read with the
//! index lost looks first.

use crate::format::captured::Captured;
use crate::format::reader::Whose;
use crate::format::{writer, Encoded};
use crate::layout;
use crate::ops::errors::FlowError;
use crate::ops::metrics::Buffered;
use crate::s3::{FailureKind, S3Settings, Store, StoreError};

/// The first generation an archive of `flow` may take in `settings`' bucket and prefix: the one after
/// its predecessor's when the predecessor lies in the same folder (whichever form its name took),
/// else 0: a predecessor elsewhere (another DB's folder after SWAPDB, an earlier bucket or prefix)
/// shares none of its keys.
pub fn first_generation(flow: &Captured, settings: &S3Settings) -> u32 {
    let folder = layout::object_folder(&settings.prefix, flow.db);
    let own = format!("s3://{}/{folder}", settings.bucket);
    flow.previous
        .as_ref()
        .and_then(|location| layout::location_generation(location, &flow.id))
        .filter(|(head, _)| *head == own)
        .map_or(0, |(_, generation)| generation + 1)
}

/// Stores `encoded`, written for `first_generation(flow)`, and returns its key and the object stored
/// there, once stored and verified. A later generation's key gets the object written for it
/// (`writer::regenerate`, proven to read back under the read cap `max_bytes`).
pub fn store_once(
    s3: &Store,
    settings: &S3Settings,
    flow: &Captured,
    mut encoded: Encoded,
    max_bytes: u64,
) -> Result<(String, Encoded), FlowError> {
    let first = first_generation(flow, settings);
    let (prefix, max_name) = (&settings.prefix, settings.object_name_max);
    let mut written_for = first;
    for (generation, key) in layout::stored_keys_from(prefix, flow.db, &flow.id, first, max_name) {
        if generation != written_for {
            let whose = Whose {
                id: &flow.id,
                db: flow.db,
                generation,
            };
            let _content = Buffered::hold(encoded.raw_bytes);
            encoded = writer::regenerate(&encoded, written_for, &whose, max_bytes)
                .map_err(FlowError::Unreadable)?;
            written_for = generation;
        }
        let existing = match s3.put_verified(&key, &encoded) {
            Err(e) if e.kind == FailureKind::Exists => s3.verify_existing(&key, &encoded),
            stored => return stored.map(|()| (key, encoded)).map_err(FlowError::Upload),
        };
        match existing {
            Ok(()) => return Ok((key, encoded)),
            Err(e) if e.kind == FailureKind::Verify => continue,
            Err(e) => return Err(FlowError::Upload(e)),
        }
    }
    let message = match layout::GENERATIONS - first {
        0 => format!(
            "its predecessor took the flow's last object key (generation {}); nothing was replaced",
            layout::GENERATIONS - 1
        ),
        left => format!(
            "every one of the flow's {left} object keys after its predecessor's holds other content; nothing was replaced"
        ),
    };
    Err(FlowError::Upload(StoreError {
        kind: FailureKind::Exists,
        message,
    }))
}
