//! `INFO flowarchive`. Each owner of counters (the archive stages, the read path, the sweep) lists its
//! own fields once, where it keeps them, and registers that list here; this handler knows no owner.
//! Every field is a plain number, so an INFO-scraping exporter turns them into gauges and counters as
//! named.

use linkme::distributed_slice;
use redis_module::{InfoContext, RedisResult};

/// A list of `(name, value)` fields of the `flowarchive` section.
pub type Fields = fn() -> Vec<(String, i64)>;

/// Every owner's field list (`#[distributed_slice(INFO_FIELDS)] static X: Fields = fields;`).
#[distributed_slice]
pub static INFO_FIELDS: [Fields];

/// Named fields, for an owner's list.
pub fn named<const N: usize>(fields: [(&str, i64); N]) -> Vec<(String, i64)> {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[redis_module_macros::info_command_handler]
pub fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    let mut section = ctx.builder().add_section("stats");
    for fields in INFO_FIELDS {
        for (name, value) in fields() {
            section = section.field(&name, value)?;
        }
    }
    section.build_section()?.build_info()?;
    Ok(())
}

/// The S3 client's fields, registered here: `s3` sits below `ops` and does not import it.
#[distributed_slice(INFO_FIELDS)]
static S3_FIELDS: Fields = crate::s3::info_fields;
