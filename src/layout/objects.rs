//! Where an archive's object lives in the bucket: the object key of a flow's incarnation, the forms
//! a reader accepts, and a location split into its head and generation (docs/FORMAT.md).

use crate::digest::{hex, sha256};

/// S3 allows object keys up to 1024 bytes.
pub const MAX_OBJECT_KEY: usize = 1024;

/// The longest object name (a key's last segment) stores take by default: MinIO and SeaweedFS refuse
/// a segment of 256 bytes or more (`KeyTooLongError`), AWS only keys past 1024 bytes.
pub const OBJECT_NAME_MAX: usize = 255;

/// The length of the longest `_sha256` object name (`<64 hex>.g15.jsonl.gz`): no store limit below it
/// can be met.
pub const SHA_NAME_LEN: usize = 64 + ".g15.jsonl.gz".len();

/// Escapes a flow id for an object key: bytes outside `[A-Za-z0-9_-]` become `%XX` (uppercase hex of each
/// UTF-8 byte). `/` and `.` are escaped too, so an id never forms a path segment or `..`. Reversible.
pub fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<prefix>/flows/<escaped id>.jsonl.gz` for DB 0 (the key objects have always had), and
/// `<prefix>/db<n>/flows/<escaped id>.jsonl.gz` for DB n > 0, so the same id in two DBs is two objects.
/// Generation g > 0 (see `GENERATIONS`) ends in `.g<g>.jsonl.gz` instead.
/// An id whose escaped key would pass S3's 1024-byte limit is stored under
/// `<folder>/flows/_sha256/<hex of the id>.jsonl.gz`; its header still names the id. This is the key
/// the compact index rebuilds (`object_file`); `stored_key` also takes the store's name limit.
pub fn object_key(prefix: &str, db: i32, id: &str, generation: u32) -> String {
    let folder = object_folder(prefix, db);
    let file = object_file(&folder, id, generation);
    folder + &file
}

/// The key an archive is stored under: `object_key`, or its `_sha256` form when the object's name
/// (the key's last segment) would pass `max_name` bytes, the longest the store takes
/// (`object-name-max`).
pub fn stored_key(prefix: &str, db: i32, id: &str, generation: u32, max_name: usize) -> String {
    let folder = object_folder(prefix, db);
    let file = object_file(&folder, id, generation);
    let name = file.rsplit('/').next().unwrap_or(&file);
    if name.len() <= max_name {
        return folder + &file;
    }
    folder + &sha_file(id, generation)
}

/// The part of an object key before `flows/`: empty, `<prefix>/`, `db<n>/` or `<prefix>/db<n>/`.
pub fn object_folder(prefix: &str, db: i32) -> String {
    match (prefix.is_empty(), db) {
        (true, 0) => String::new(),
        (true, db) => format!("db{db}/"),
        (false, 0) => format!("{prefix}/"),
        (false, db) => format!("{prefix}/db{db}/"),
    }
}

fn suffix(generation: u32) -> String {
    match generation {
        0 => ".jsonl.gz".to_string(),
        g => format!(".g{g}.jsonl.gz"),
    }
}

/// The rest of an object key after `folder`: `flows/<escaped id>[.g<g>].jsonl.gz`, or the `_sha256`
/// name when the whole key would pass S3's limit. The compact index stores the folder once and
/// rebuilds each location with this (see `index`).
pub fn object_file(folder: &str, id: &str, generation: u32) -> String {
    // An escaped id never holds '.', so a generation suffix cannot meet another id's key.
    let file = format!("flows/{}{}", escape_id(id), suffix(generation));
    if folder.len() + file.len() <= MAX_OBJECT_KEY {
        return file;
    }
    sha_file(id, generation)
}

fn sha_file(id: &str, generation: u32) -> String {
    format!(
        "flows/_sha256/{}{}",
        hex(&sha256(id.as_bytes())),
        suffix(generation)
    )
}

/// How many object keys one flow may use. Objects are written once: when an attempt stored its object
/// but did not commit (a crash, a failover, a change) and the flow then changed, the next attempt
/// writes the next generation instead of replacing history another server may already index.
pub const GENERATIONS: u32 = 16;

/// The keys a flow's archives are stored under (`stored_key`), from generation `first` on, each with
/// its generation.
pub fn stored_keys_from<'a>(
    prefix: &'a str,
    db: i32,
    id: &'a str,
    first: u32,
    max_name: usize,
) -> impl Iterator<Item = (u32, String)> + 'a {
    (first..GENERATIONS).map(move |g| (g, stored_key(prefix, db, id, g, max_name)))
}

/// Every key an archive of the flow may have been stored under, whatever the name limit was: each
/// generation's `object_key` and its `_sha256` form, each with its generation.
pub fn readable_keys<'a>(
    prefix: &'a str,
    db: i32,
    id: &'a str,
) -> impl Iterator<Item = (u32, String)> + 'a {
    let folder = object_folder(prefix, db);
    (0..GENERATIONS).flat_map(move |g| {
        [
            (g, object_key(prefix, db, id, g)),
            (g, folder.clone() + &sha_file(id, g)),
        ]
    })
}

/// The object key folder of a head `s3://bucket/<folder>`.
pub fn location_folder(head: &str) -> Option<&str> {
    let (_, folder) = head.strip_prefix("s3://")?.split_once('/')?;
    (folder.is_empty() || folder.ends_with('/')).then_some(folder)
}

/// The head and generation of `location` when it is one of `id`'s object keys in either form a name
/// may take (`object_file`, or the `_sha256` form a store's name limit chose: `stored_key`); `None`
/// for anything else.
pub fn location_generation<'l>(location: &'l str, id: &str) -> Option<(&'l str, u32)> {
    split(location, id, true)
}

/// A location as `(head, generation)` with `location == head + object_file(folder, id, generation)`;
/// `None` for anything that is not one of the flow's object keys in that form (a `_sha256` name the
/// name limit chose is not: the compact index cannot rebuild it).
pub fn split_location<'l>(location: &'l str, id: &str) -> Option<(&'l str, u32)> {
    split(location, id, false)
}

/// `location` as its head and the generation of its object key: the `object_file` form, and the
/// `_sha256` form too if `any_name`.
fn split<'l>(location: &'l str, id: &str, any_name: bool) -> Option<(&'l str, u32)> {
    let (head, file) = location.split_at(location.rfind("flows/")?);
    let folder = location_folder(head)?;
    let named = |g| object_file(folder, id, g) == file || (any_name && sha_file(id, g) == file);
    let generation = (0..GENERATIONS).find(|&g| named(g))?;
    Some((head, generation))
}
