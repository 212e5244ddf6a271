//! The archive index: which flows are archived, and where (`index-key`: flow id → `s3://bucket/key`).
//! Read by FLOWARCHIVE.GET and before an archive, written only by the commit.

use redis_module::{Context, KeyType};

use crate::layout::FlowKeys;
use crate::ops::errors::FlowError;
use crate::runtime::server::{bytes, call, expect_type};

/// The location a flow is archived at, if any.
pub fn location(ctx: &Context, keys: &FlowKeys, id: &str) -> Result<Option<String>, FlowError> {
    expect_type(ctx, &keys.index, &KeyType::Hash)?;
    let reply = call(ctx, "HGET", &[keys.index.as_bytes(), id.as_bytes()])?;
    Ok(bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned()))
}
