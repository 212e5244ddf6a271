//! The store stage: the object goes to S3 write-once.
//!
//! A key already holding exactly these bytes is an idempotent retry (an earlier attempt stored it and
//! did not commit: a crash, a failover, a pause). A key holding other content is never replaced (it may
//! be indexed by another server sharing the bucket, or be an uncommitted attempt of a flow that changed
//! since): the next generation key is tried instead (see `layout::GENERATIONS`). A new incarnation of
//! an id starts after its predecessor's generation (whichever form its name took, in whichever folder
//! it lies), so it never takes its predecessor's key, even once that object is gone (a lifecycle rule,
//! an operator): generations only grow along the chain of `previous` locations, even as it moves
//! between folders (another DB's after SWAPDB, an earlier bucket or prefix and back), so no key the
//! chain names is ever taken again.

use crate::format::captured::Captured;
use crate::format::reader::Whose;
use crate::format::{writer, Encoded};
use crate::layout;
use crate::ops::errors::FlowError;
use crate::ops::metrics::Buffered;
use crate::s3::{FailureKind, S3Settings, Store, StoreError};

/// The first generation an archive of `flow` may take: the one after its predecessor's, whichever form
/// the predecessor's name took and wherever it lies, else 0.
pub fn first_generation(flow: &Captured) -> u32 {
    flow.previous
        .as_ref()
        .and_then(|location| layout::location_generation(location, &flow.id))
        .map_or(0, |(_, generation)| generation + 1)
}

/// Stores `encoded`, written for generation `first` (`first_generation`), and returns its key and the
/// object stored there, once stored and verified. A later generation's key gets the object written for
/// it (`writer::regenerate`, proven to read back under the read cap `max_bytes`).
pub fn store_once(
    s3: &Store,
    settings: &S3Settings,
    flow: &Captured,
    (mut encoded, first): (Encoded, u32),
    max_bytes: u64,
) -> Result<(String, Encoded), FlowError> {
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
