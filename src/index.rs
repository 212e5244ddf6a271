//! The archive index: which flows are archived, and where. Read by FLOWARCHIVE.GET and before an
//! archive, written only by the commit; `scripts/flowarchive-index` moves entries between formats.
//!
//! Two formats (`flowarchive.index-format`, exact layout in docs/FORMAT.md):
//! - `hash` (default): the hash `<index>` (per slot on a cluster, see `layout`), id → the full
//!   `s3://bucket/key`. About 150-180 bytes a flow with UUID ids, mostly the location.
//! - `compact`: a location is `<head><object file>` where the head (`s3://bucket/<prefix>/[db<n>/]`)
//!   is shared by every flow of a DB and the file is derived from the id and the write-once
//!   generation (`layout::object_file`). So an entry stores only what cannot be derived: which head
//!   and which generation, one small integer (about 21 bytes a flow with UUID ids). Entries are
//!   spread over `<index>:u<b>` (canonical UUID ids, field = the 16 raw bytes) and `<index>:s<b>`
//!   (any other id, field = the id) with b from the id's sha256, few enough per hash that each stays
//!   in the server's small listpack encoding; the hash `<index>:meta` records the bucket count, the
//!   heads and the entry count. Every key starts with `<index>`, so on a cluster all sit in the
//!   flow's slot.
//!
//! A lookup reads the configured format first, then the other one if it holds entries in this DB (or
//! slot) at all: during a conversion every archived flow stays readable and the commit's "already
//! indexed" refusal sees both, so nothing is archived twice. Whether the other format holds entries
//! is a probe of one key's existence with the module's own rights (its hash, or its meta hash); the
//! entries themselves are read only after the caller's ACL allows each key.

use redis_module::{Context, KeyType};

use crate::digest::sha256;
use crate::layout::{self, FlowKeys, GENERATIONS};
use crate::ops::configs::{IndexFormat, INDEX_BUCKETS, INDEX_FORMAT};
use crate::ops::errors::{show_key, FlowError};
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::key::Key;
use crate::runtime::server::{expect_type, hash_get, hash_pairs, type_of};
use crate::slot;
use crate::sync::lock;

/// The configured format, read on the main thread when the index is used.
fn configured() -> IndexFormat {
    *lock(&INDEX_FORMAT)
}

/// One flow's entry as found: its location, and where it is stored (for the commit that replaces it
/// with a newer incarnation's).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub location: String,
    format: IndexFormat,
    /// The index name it was found under (`index-key`, or an earlier one).
    index: String,
    /// The hash holding the entry (`<index>`, or the compact bucket) and its field.
    hash: String,
    field: Vec<u8>,
    /// The compact index's meta hash, whose entry count a removal decrements.
    meta: Option<String>,
}

impl Entry {
    /// The keys removing this entry writes.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.hash.as_str()).chain(self.meta.as_deref())
    }
}

#[cfg(test)]
impl Entry {
    /// An entry in the hash format at `location`, for tests that judge without a server.
    pub fn at(location: &str) -> Entry {
        Entry {
            location: location.to_string(),
            format: IndexFormat::Hash,
            index: String::new(),
            hash: String::new(),
            field: Vec::new(),
            meta: None,
        }
    }
}

/// The location a flow is archived at, if any: the configured format first, then the other.
pub fn location(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
) -> Result<Option<String>, FlowError> {
    Ok(find(ctx, caller, keys, id)?.map(|e| e.location))
}

/// A flow's entry, if any: under the index's name in the configured format first, then the other
/// format, then under each earlier name (`flowarchive.index-read-keys`) in either format.
pub fn find(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
) -> Result<Option<Entry>, FlowError> {
    let first = configured();
    let second = match first {
        IndexFormat::Hash => IndexFormat::Compact,
        IndexFormat::Compact => IndexFormat::Hash,
    };
    if let Some(found) = lookup(ctx, caller, &keys.index, id, first)? {
        return Ok(Some(found));
    }
    let earlier = keys
        .earlier_indexes
        .iter()
        .flat_map(|i| [(i, first), (i, second)]);
    for (index, format) in std::iter::once((&keys.index, second)).chain(earlier) {
        if type_of(ctx, &presence_key(index, format)) == KeyType::Empty {
            continue;
        }
        if let Some(found) = lookup(ctx, caller, index, id, format)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The key that exists exactly while a format holds entries under the index name `index`.
/// Whether no index holds any entry for these keys' DB (or slot): no key of either format under the
/// index's name or an earlier one exists. The index was then lost (flushed, deleted, restored from an
/// older dump) or never written: a read may look for the flow in the bucket itself.
pub fn absent(ctx: &Context, keys: &FlowKeys) -> bool {
    std::iter::once(&keys.index)
        .chain(&keys.earlier_indexes)
        .flat_map(|index| [IndexFormat::Hash, IndexFormat::Compact].map(|f| presence_key(index, f)))
        .all(|key| type_of(ctx, &key) == KeyType::Empty)
}

fn presence_key(index: &str, format: IndexFormat) -> String {
    match format {
        IndexFormat::Hash => index.to_string(),
        IndexFormat::Compact => meta_key(index),
    }
}

fn lookup(
    ctx: &Context,
    caller: &Caller,
    index: &str,
    id: &str,
    format: IndexFormat,
) -> Result<Option<Entry>, FlowError> {
    let read = |key: &str| -> Result<bool, FlowError> {
        acl::check(ctx, caller, key, Access::Read)?;
        expect_type(ctx, key, &KeyType::Hash)
    };
    if format == IndexFormat::Hash {
        acl::check(ctx, caller, index, Access::Read)?;
        // Opened once for its type and the entry.
        let opened = Key::open(ctx, index);
        opened.holds(&KeyType::Hash)?;
        return Ok(opened.hash_get(id.as_bytes())?.map(|location| Entry {
            location: lossy(location),
            format,
            index: index.to_string(),
            hash: index.to_string(),
            field: id.as_bytes().to_vec(),
            meta: None,
        }));
    }
    let compact = Compact::of(index, id);
    if !read(&compact.meta)? {
        return Ok(None);
    }
    let Some(buckets) = compact.recorded_buckets(ctx)? else {
        return Ok(None);
    };
    let bucket = compact.bucket(buckets);
    if !read(&bucket)? {
        return Ok(None);
    }
    let Some(value) = hget(ctx, &bucket, &compact.field)? else {
        return Ok(None);
    };
    let (head, generation) = compact.parse_value(&lossy(value))?;
    let head = hget(ctx, &compact.meta, head_field(head).as_bytes())?
        .map(lossy)
        .ok_or_else(|| compact.damaged(&format!("has no head {}", head_field(head))))?;
    let folder = layout::location_folder(&head)
        .ok_or_else(|| compact.damaged("holds a head that is no s3:// URL"))?;
    let file = layout::object_file(folder, id, generation);
    Ok(Some(Entry {
        location: head + &file,
        format,
        index: index.to_string(),
        hash: bucket,
        field: compact.field,
        meta: Some(compact.meta),
    }))
}

/// Removes `entry` through `write` (the commit's replicated write), as a conversion moves an entry
/// out: a compact entry also leaves the meta hash's count, and the meta hash goes with the last one.
pub fn remove(
    ctx: &Context,
    entry: &Entry,
    mut write: impl FnMut(&str, &[&[u8]]) -> Result<i64, FlowError>,
) -> Result<(), FlowError> {
    write("HDEL", &[entry.hash.as_bytes(), &entry.field])?;
    if let Some(meta) = &entry.meta {
        let left = write("HINCRBY", &[meta.as_bytes(), b"entries", b"-1"])?;
        if left <= 0 && type_of(ctx, meta) != KeyType::Empty {
            write("DEL", &[meta.as_bytes()])?;
        }
    }
    Ok(())
}

/// The format a commit records `location` in: the configured one, or the hash where the compact
/// format cannot rebuild it (an object stored under its `_sha256` name because the store's name
/// limit is below the object's name; `layout::stored_key`).
fn target(location: &str, id: &str) -> IndexFormat {
    match configured() {
        IndexFormat::Compact if layout::split_location(location, id).is_none() => IndexFormat::Hash,
        format => format,
    }
}

/// Whether `entry` is stored where the commit of `location` writes, under the index's name in that
/// format (so recording over it replaces it).
pub fn written_in_place(entry: &Entry, keys: &FlowKeys, location: &str, id: &str) -> bool {
    entry.format == target(location, id) && entry.index == keys.index
}

/// The keys an entry is written to, where they are known without reading the index: in the hash
/// format (the compact format reads its meta hash to find its bucket: `written_keys`).
pub fn written_keys_unread(keys: &FlowKeys) -> Option<Vec<String>> {
    (configured() == IndexFormat::Hash).then(|| vec![keys.index.clone()])
}

/// The object an index entry is written for, as far as the keys it is written to depend on it.
#[derive(Clone, Copy)]
pub enum Object<'l> {
    /// Stored at this location (the commit): written exactly where `record` writes it.
    At(&'l str),
    /// To be stored under this name limit (the `object-name-max` of the settings its upload uses):
    /// a name that may pass it may be stored under its `_sha256` name, recorded in the hash format.
    Named(usize),
}

/// The keys an entry of `id` for `object` is written to in the configured format: the commit checks
/// the caller's ACL, their types and (on a cluster) their slot before writing. The compact bucket
/// depends on the meta hash, which is read only once the caller may write it.
pub fn written_keys(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
    object: Object,
) -> Result<Vec<String>, FlowError> {
    if let Some(unread) = written_keys_unread(keys) {
        return Ok(unread);
    }
    // An object stored under its `_sha256` name is recorded in the hash format alone (`target`); one
    // whose name may pass the upload's limit may be, so the hash is checked with the compact keys.
    let hash_too = match object {
        Object::At(location) if target(location, id) == IndexFormat::Hash => {
            return Ok(vec![keys.index.clone()])
        }
        Object::At(_) => false,
        Object::Named(max_name) => layout::escape_id(id).len() + ".g15.jsonl.gz".len() > max_name,
    };
    let compact = Compact::of(&keys.index, id);
    acl::check(ctx, caller, &compact.meta, Access::Add)?;
    expect_type(ctx, &compact.meta, &KeyType::Hash)?;
    let buckets = compact.recorded_buckets(ctx)?.unwrap_or_else(new_buckets);
    let bucket = compact.bucket(buckets);
    let mut written = vec![compact.meta, bucket];
    if hash_too {
        written.push(keys.index.clone());
    }
    Ok(written)
}

/// Records `location` for `id` in the configured format through `write` (the commit's replicated
/// write); `replacing` when that format holds an entry of `id` already (an earlier incarnation's), which
/// this one overwrites in place. Everything that could fail is checked before the first write.
pub fn record(
    ctx: &Context,
    keys: &FlowKeys,
    id: &str,
    location: &str,
    replacing: bool,
    mut write: impl FnMut(&str, &[&[u8]]) -> Result<i64, FlowError>,
) -> Result<(), FlowError> {
    if target(location, id) == IndexFormat::Hash {
        write(
            "HSET",
            &[keys.index.as_bytes(), id.as_bytes(), location.as_bytes()],
        )?;
        return Ok(());
    }
    let compact = Compact::of(&keys.index, id);
    let (head, generation) = layout::split_location(location, id).ok_or_else(|| {
        FlowError::Internal(format!(
            "location {} cannot be stored in the compact index",
            show_key(location)
        ))
    })?;
    let recorded = compact.recorded_buckets(ctx)?;
    let heads = compact.heads(ctx);
    let known = heads.iter().find(|(_, h)| h == head).map(|(n, _)| *n);
    let number = known.unwrap_or_else(|| heads.iter().map(|(n, _)| n + 1).max().unwrap_or(0));
    let buckets = recorded.unwrap_or_else(new_buckets);
    let meta = compact.meta.as_bytes();
    if recorded.is_none() {
        write("HSET", &[meta, b"buckets", buckets.to_string().as_bytes()])?;
    }
    if known.is_none() {
        write(
            "HSET",
            &[meta, head_field(number).as_bytes(), head.as_bytes()],
        )?;
    }
    let value = (u64::from(generation) + u64::from(GENERATIONS) * number).to_string();
    let bucket = compact.bucket(buckets);
    write(
        "HSET",
        &[bucket.as_bytes(), &compact.field, value.as_bytes()],
    )?;
    if !replacing {
        write("HINCRBY", &[meta, b"entries", b"1"])?;
    }
    Ok(())
}

/// Buckets of a new compact index: `index-buckets` in a DB, spread over the slots on a cluster.
fn new_buckets() -> u64 {
    let total = INDEX_BUCKETS.get().max(1) as u64;
    if slot::enabled() {
        total.div_ceil(slot::SLOTS as u64)
    } else {
        total
    }
}

fn hget(ctx: &Context, key: &str, field: &[u8]) -> Result<Option<Vec<u8>>, FlowError> {
    Ok(hash_get(ctx, key, field)?)
}

fn lossy(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

fn head_field(number: u64) -> String {
    format!("h{number}")
}

/// The compact index's meta hash (bucket count, heads, entry count) under the index name `index`.
fn meta_key(index: &str) -> String {
    format!("{index}:meta")
}

/// A flow id's compact entry: its field, and the meta and bucket keys (by bucket count).
struct Compact {
    meta: String,
    /// `<index>:u` or `<index>:s`, completed by the bucket number.
    stem: String,
    field: Vec<u8>,
    /// The first 8 bytes of the id's sha256: spreads any ids (UUIDv7 ids share their leading time).
    hash: u64,
}

impl Compact {
    fn of(index: &str, id: &str) -> Compact {
        let (kind, field) = match uuid_bytes(id) {
            Some(raw) => ('u', raw.to_vec()),
            None => ('s', id.as_bytes().to_vec()),
        };
        let digest = sha256(id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Compact {
            meta: meta_key(index),
            stem: format!("{index}:{kind}"),
            field,
            hash: u64::from_be_bytes(first),
        }
    }

    fn bucket(&self, buckets: u64) -> String {
        format!("{}{}", self.stem, self.hash % buckets.max(1))
    }

    fn damaged(&self, what: &str) -> FlowError {
        FlowError::Unreadable(format!(
            "the compact index {} {what}; see docs/FORMAT.md",
            show_key(&self.meta)
        ))
    }

    /// The bucket count the meta hash records, `None` without one.
    fn recorded_buckets(&self, ctx: &Context) -> Result<Option<u64>, FlowError> {
        let Some(raw) = hget(ctx, &self.meta, b"buckets")? else {
            return Ok(None);
        };
        match lossy(raw).parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(self.damaged("records no valid bucket count")),
        }
    }

    /// Every head the meta hash records, by number (the meta hash is a few fields: no byte budget).
    fn heads(&self, ctx: &Context) -> Vec<(u64, String)> {
        hash_pairs(ctx, &self.meta, u64::MAX)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(field, head)| {
                let number = std::str::from_utf8(&field).ok()?.strip_prefix('h')?;
                Some((number.parse().ok()?, lossy(head)))
            })
            .collect()
    }

    /// An entry's value: `generation + 16 × head number`.
    fn parse_value(&self, value: &str) -> Result<(u64, u32), FlowError> {
        let v: u64 = value
            .parse()
            .map_err(|_| self.damaged("holds an entry that is not a number"))?;
        let per = u64::from(GENERATIONS);
        Ok((v / per, (v % per) as u32))
    }
}

/// The 16 bytes of a canonical (lowercase, hyphenated) UUID; `None` for any other id, which the
/// compact index keeps as it is (another spelling of the same UUID is another flow id).
fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    let b = id.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let digits: Vec<u8> = b
        .iter()
        .enumerate()
        .filter(|(i, _)| ![8, 13, 18, 23].contains(i))
        .map(|(_, &c)| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = pair[0] << 4 | pair[1];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uuids_are_16_bytes_and_other_ids_stay_as_they_are() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let raw = uuid_bytes(id).unwrap();
        assert_eq!(raw[0], 0x0f);
        assert_eq!(raw[15], 0x0e);
        let c = Compact::of("archived:flows", id);
        assert_eq!(c.field, raw.to_vec());
        assert!(c.bucket(4096).starts_with("archived:flows:u"));
        for other in [
            "0F8FAD5B-D9CB-469F-A165-70867728950E", // another spelling: another flow id
            "0f8fad5bd9cb469fa16570867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "abc:step:tok",
            "{tag}:x",
            "0123456789abcdef", // 16 bytes: in the `s` buckets, never confused with raw UUID bytes
        ] {
            assert_eq!(uuid_bytes(other), None, "{other}");
            let c = Compact::of("archived:flows", other);
            assert_eq!(c.field, other.as_bytes());
            assert!(c.bucket(7).starts_with("archived:flows:s"), "{other}");
        }
    }

    #[test]
    fn bucket_keys_keep_the_slot_of_the_index_and_spread_ids() {
        let slot_key = slot::slot_index_key("archived:flows", slot::key_slot(b"abc"));
        let c = Compact::of(&slot_key, "abc");
        assert_eq!(
            slot::key_slot(c.bucket(3).as_bytes()),
            slot::key_slot(b"abc")
        );
        assert_eq!(slot::key_slot(c.meta.as_bytes()), slot::key_slot(b"abc"));
        let mut counts = vec![0usize; 64];
        for i in 0..6400 {
            let id = format!("0190d0c2-{i:04x}-7000-8000-000000000000");
            let b = Compact::of("i", &id).hash % 64;
            counts[b as usize] += 1;
        }
        // UUIDv7-like ids sharing leading bytes still spread evenly (mean 100).
        assert!(
            counts.iter().all(|&n| (50..=150).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn locations_split_into_head_and_generation_and_rebuild_exactly() {
        let long = "é".repeat(512);
        for (prefix, db, id, generation) in [
            ("", 0, "abc", 0),
            ("p/q", 3, "a:b/c{d}", 5),
            ("prod", 0, "0f8fad5b-d9cb-469f-a165-70867728950e", 15),
            ("flows", 0, "flows", 1),
            ("p", 7, long.as_str(), 2),
        ] {
            let location = format!(
                "s3://bkt/{}",
                layout::object_key(prefix, db, id, generation)
            );
            let (head, g) =
                layout::split_location(&location, id).unwrap_or_else(|| panic!("{location}"));
            assert_eq!(g, generation);
            let folder = layout::location_folder(head).unwrap();
            assert_eq!(
                head.to_string() + &layout::object_file(folder, id, g),
                location
            );
        }
        for foreign in [
            "s3://bkt/flows/other.jsonl.gz",
            "s3://bkt/flows/abc.g16.jsonl.gz",
            "https://bkt/flows/abc.jsonl.gz",
            "s3://bkt",
            "",
        ] {
            assert_eq!(layout::split_location(foreign, "abc"), None, "{foreign}");
        }
    }
}
