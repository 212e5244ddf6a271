//! The module's errors and their texts. Texts start with `ERR` (or `NOPERM`), name the flow and say why,
//! are bounded in length, and never carry a credential or a presigned URL.

use std::borrow::Cow;

use redis_module::{KeyType, RedisError, RedisResult};

use crate::clock::human_ms;
use crate::kinds::kinds;
use crate::s3::{FailureKind, StoreError};
use crate::text;

pub const SWEEP_RUNNING: &str = "ERR a sweep is already running; see INFO flowarchive";
pub const EMPTY_ID: &str = "ERR flow id must not be empty";
pub const ID_NOT_UTF8: &str = "ERR flow id must be valid UTF-8";
pub const FLOW_BUSY: &str =
    "ERR flowarchive is busy: too many FLOWARCHIVE.FLOW calls waiting; retry later, nothing was deleted";
pub const NO_COMMAND_CATEGORIES: &str =
    "flowarchive: this server puts no module command in a module's own ACL category (it has no RedisModule_AddACLCategory): the FLOWARCHIVE commands and FLOWARCHIVE.ACLCHECK are not in @flowarchive; grant them by name (or with +@all)";
pub const UNLOAD_BUSY: &str =
    "flowarchive: MODULE UNLOAD refused: archives, reads or a sweep are in flight; retry once INFO flowarchive shows none";
// Reasons a commit cannot write now (FlowError::NotWritable):
pub const NOT_PRIMARY: &str = "this node is no longer a writable primary";
pub const WRITES_PAUSED: &str =
    "writes are paused on this server (CLIENT PAUSE or a failover) and stayed paused";
pub const READ_BUSY: &str =
    "ERR flowarchive is busy: too many long FLOWARCHIVE.GET reads waiting; retry later";
pub const NO_THREAD: &str = "ERR flowarchive cannot start a worker thread; nothing was deleted";
pub const PANIC: &str = "ERR flowarchive internal error; nothing was deleted (see the server log)";
// Reasons, inside a flow's `ERR flow <id>: <reason>; nothing was deleted`:
pub const NO_EVENT_LOOP: &str = "the server's event loop does not accept module work";
pub const MAIN_THREAD_PANIC: &str = "internal error on the main thread (see the server log)";
/// The server's answer to a command on a key of another type.
pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// Longest error text a command answers or logs: every message passes through `bounded`.
pub const MAX_MESSAGE: usize = 600;

/// How a flow id appears in messages: quoted, escaped (`\n`, `\u{e9}`: ASCII only, see
/// `ascii_errors`), cut to 120 characters of that form.
pub fn show_id(id: &str) -> String {
    let escaped: String = id.chars().flat_map(char::escape_default).collect();
    format!("\"{}\"", text::cut(&escaped, 123))
}

/// How a key name (which embeds the id) appears in messages: like an id.
pub fn show_key(key: &str) -> String {
    show_id(key)
}

/// An answer as it may leave the module. The redis-module crate writes an error reply's text one byte
/// per character (`c as u8`), so a character past ASCII (a flow id's `é`) would reach the client as a
/// broken byte, and clients fail to parse the reply: every error leaves as ASCII, other characters
/// escaped as `\u{…}`.
pub fn ascii_errors(answer: RedisResult) -> RedisResult {
    match answer {
        Err(RedisError::String(msg)) if !msg.is_ascii() => {
            let mut out = String::with_capacity(msg.len() + 16);
            for c in msg.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32));
                }
            }
            Err(RedisError::String(out))
        }
        other => other,
    }
}

/// Cuts a message to `MAX_MESSAGE` bytes, so no input makes a reply or a log line large.
pub fn bounded(msg: String) -> String {
    match text::cut(&msg, MAX_MESSAGE) {
        Cow::Borrowed(_) => msg,
        Cow::Owned(cut) => cut,
    }
}

kinds! {
    /// How an archive failed, apart from S3 (whose kinds `FailureKind` names).
    pub enum FlowKind {
        NotFound => "not_found",
        NotTerminal => "not_terminal",
        TooRecent => "too_recent",
        WrongType => "wrong_type",
        Unreadable => "unreadable",
        Conflict => "conflict",
        Leased => "leased",
        Busy => "busy",
        Full => "buffers_full",
        Changed => "changed",
        NoPerm => "noperm",
        NotWritable => "not_writable",
        Cluster => "cluster",
        SlotMoved => "slot_moved",
        Unsafe => "unsafe",
        Unindexed => "unindexed",
        Internal => "internal",
    }
}

#[derive(Debug, Clone)]
pub enum FlowError {
    NotFound,
    NotTerminal(String),
    TooRecent {
        idle_ms: i64,
        retention_ms: i64,
    },
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    Unreadable(String),
    Conflict(String),
    /// The engine's own archiver holds the flow (its lease key, named here, exists).
    Leased(String),
    Busy,
    /// Copying the flow would take what the module holds of flows in flight past
    /// `buffer-max-bytes` (named here) while other flows hold some: it stays live, for later.
    Full(u64),
    Changed,
    /// The caller's ACL user may not touch a key, or not together with the flow's other keys: why,
    /// naming the key (`runtime::acl`).
    NoPerm(String),
    /// The node cannot take the commit's writes now (a replica, or writes paused for a failover).
    NotWritable(&'static str),
    /// On a cluster: a layout or id that cannot place the flow in its id's slot.
    Cluster(String),
    /// On a cluster: the flow's slot is not (or no longer) archivable here: it moved, is moving, or
    /// this node no longer serves it. The flow stays live for its owner's next sweep.
    Moved(String),
    Upload(StoreError),
    /// The server's settings or the layout would let the archive index, or data it does not archive,
    /// be lost (an eviction policy that can take the index, an index with a TTL, key templates that
    /// can meet): nothing is archived until they change.
    Unsafe(String),
    /// Committed (archived at this location, keys deleted) but the index entry was not there when read
    /// back at once: the commit's guard rules this out, so it means a server or module fault.
    Unindexed(String),
    Internal(String),
}

/// A failure of the server around a flow rather than of the flow's data: a command it answered with an
/// error, a DB it could not select, an API it lacks, its event loop refusing module work. A flow that
/// meets one stays live (`FlowError::Internal`); a sweep that meets one outside any flow stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerError {
    /// A command answered with an error: the server's reply.
    Refused(String),
    /// The job's DB could not be selected.
    NoDb(i32),
    /// A key read element by element holds another type.
    WrongType,
    /// The server lacks a module API the module needs.
    NoApi(&'static str),
    /// An answer of another shape than the command's, or a read the layout cannot make.
    Unexpected(&'static str),
    /// The node cannot take writes (`NOT_PRIMARY`, `WRITES_PAUSED`).
    NotWritable(&'static str),
    /// The event loop does not accept module work (shutting down, or the module unloading).
    NoEventLoop,
    /// A job on the main thread panicked.
    MainThreadPanic,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Refused(reply) => f.write_str(reply),
            ServerError::NoDb(db) => write!(f, "cannot select DB {db}"),
            ServerError::WrongType => f.write_str(WRONGTYPE),
            ServerError::NoApi(name) => write!(f, "the server has no {name}"),
            ServerError::Unexpected(what) | ServerError::NotWritable(what) => f.write_str(what),
            ServerError::NoEventLoop => f.write_str(NO_EVENT_LOOP),
            ServerError::MainThreadPanic => f.write_str(MAIN_THREAD_PANIC),
        }
    }
}

impl From<ServerError> for FlowError {
    fn from(e: ServerError) -> Self {
        FlowError::Internal(e.to_string())
    }
}

/// Whether `key`, found holding a value of type `found`, holds one: `false` when it is empty, an
/// error naming the key when it holds another type than `expected`.
pub fn holds(key: &str, found: &KeyType, expected: &KeyType) -> Result<bool, FlowError> {
    match found {
        KeyType::Empty => Ok(false),
        t if t == expected => Ok(true),
        t => Err(FlowError::WrongType {
            key: key.to_string(),
            found: type_name(t),
            expected: type_name(expected),
        }),
    }
}

fn type_name(t: &KeyType) -> &'static str {
    match t {
        KeyType::Empty => "nothing",
        KeyType::String => "string",
        KeyType::List => "list",
        KeyType::Hash => "hash",
        KeyType::Set => "set",
        KeyType::ZSet => "sorted set",
        KeyType::Module => "module value",
        KeyType::Stream => "stream",
    }
}

impl FlowError {
    /// The metric / log name of this failure.
    pub fn kind(&self) -> &'static str {
        let kind = match self {
            FlowError::NotFound => FlowKind::NotFound,
            FlowError::NotTerminal(_) => FlowKind::NotTerminal,
            FlowError::TooRecent { .. } => FlowKind::TooRecent,
            FlowError::WrongType { .. } => FlowKind::WrongType,
            FlowError::Unreadable(_) => FlowKind::Unreadable,
            FlowError::Conflict(_) => FlowKind::Conflict,
            FlowError::Leased(_) => FlowKind::Leased,
            FlowError::Busy => FlowKind::Busy,
            FlowError::Full(_) => FlowKind::Full,
            FlowError::Changed => FlowKind::Changed,
            FlowError::NoPerm(_) => FlowKind::NoPerm,
            FlowError::NotWritable(_) => FlowKind::NotWritable,
            FlowError::Cluster(_) => FlowKind::Cluster,
            FlowError::Moved(_) => FlowKind::SlotMoved,
            FlowError::Upload(e) => return e.kind.name(),
            FlowError::Unsafe(_) => FlowKind::Unsafe,
            FlowError::Unindexed(_) => FlowKind::Unindexed,
            FlowError::Internal(_) => FlowKind::Internal,
        };
        kind.name()
    }

    /// Every name `kind` can answer, for INFO.
    pub fn kind_names() -> impl Iterator<Item = &'static str> {
        let flow = FlowKind::ALL.iter().map(|k| k.name());
        flow.chain(FailureKind::ALL.iter().map(|k| k.name()))
    }

    /// The error text for flow `id`: one line, at most `MAX_MESSAGE` bytes.
    pub fn message(&self, id: &str) -> String {
        bounded(self.full_message(id))
    }

    /// The text for a read (FLOWARCHIVE.GET): the same reasons, without what an archive says of its
    /// deletes.
    pub fn read_message(&self, id: &str) -> String {
        let shown = show_id(id);
        bounded(match self {
            FlowError::NoPerm(why) => format!("NOPERM flow {shown}: {why}"),
            FlowError::Cluster(why) => {
                format!("ERR flow {shown} cannot be placed in its slot on this cluster: {why}")
            }
            FlowError::Unsafe(why) => format!("ERR flow {shown} cannot be read: {why}"),
            FlowError::Changed => {
                format!("ERR flow {shown} changed during every read attempt; retry")
            }
            FlowError::Full(max) => format!(
                "ERR flow {shown} cannot be read now: the module holds as much of other flows as flowarchive.buffer-max-bytes ({max} bytes) allows; retry"
            ),
            FlowError::Internal(why) => format!("ERR flow {shown}: {why}"),
            other => other.full_message(id),
        })
    }

    fn full_message(&self, id: &str) -> String {
        let id = show_id(id);
        match self {
            FlowError::NotFound => format!("ERR flow {id} not found"),
            FlowError::NotTerminal(status) => {
                format!("ERR flow {id} is not terminal (status {status:?})")
            }
            FlowError::TooRecent { idle_ms, retention_ms } => format!(
                "ERR flow {id} is not idle long enough (idle {}, retention {}); FORCE skips this check",
                human_ms(*idle_ms),
                human_ms(*retention_ms)
            ),
            FlowError::WrongType { key, found, expected } => format!(
                "ERR flow {id}: key {} holds a {found}, expected a {expected}",
                show_key(key)
            ),
            FlowError::Unreadable(why) => format!("ERR flow {id} cannot be read: {why}"),
            FlowError::Conflict(location) => format!(
                "ERR flow {id} was archived at {location} by another archive meanwhile; nothing was deleted"
            ),
            FlowError::Leased(lease) => format!(
                "ERR flow {id} is being archived by the engine's own archiver (its lease {} exists); it is left to it",
                show_key(lease)
            ),
            FlowError::Busy => format!("ERR flow {id} is already being archived"),
            FlowError::Full(max) => format!(
                "ERR flow {id} was not archived now: the module holds as much of other flows in flight as flowarchive.buffer-max-bytes ({max} bytes) allows; it stays live, nothing was deleted"
            ),
            FlowError::Changed => {
                format!("ERR flow {id} changed while it was being archived; nothing was deleted")
            }
            FlowError::NoPerm(why) => format!("NOPERM flow {id}: {why}; nothing was deleted"),
            FlowError::NotWritable(why) => {
                format!("ERR flow {id} was not archived: {why}; nothing was deleted")
            }
            FlowError::Cluster(why) => {
                format!("ERR flow {id} cannot be placed in its slot on this cluster: {why}; nothing was deleted")
            }
            FlowError::Moved(why) => {
                format!("ERR flow {id} was not archived: {why}; it stays live, nothing was deleted")
            }
            FlowError::Upload(why) => {
                format!("ERR flow {id} was not archived, nothing was deleted: {why}")
            }
            FlowError::Unsafe(why) => {
                format!("ERR flow {id} was not archived: {why}; nothing was deleted")
            }
            FlowError::Unindexed(location) => format!(
                "ERR flow {id} was archived at {location} and its keys deleted, but its index entry could not be read back; scripts/flowarchive-index --rebuild restores it from the bucket"
            ),
            FlowError::Internal(why) => format!("ERR flow {id}: {why}; nothing was deleted"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_say_nothing_of_deletes() {
        for e in [
            FlowError::NoPerm("the \"k\" key".into()),
            FlowError::Cluster("why".into()),
            FlowError::Unsafe("why".into()),
            FlowError::Changed,
            FlowError::Internal("why".into()),
        ] {
            let read = e.read_message("f");
            assert!(
                !read.contains("deleted") && !read.contains("archived"),
                "{read}"
            );
            assert!(e.message("f").contains("nothing was deleted"));
        }
    }

    #[test]
    fn messages_are_single_line_and_bounded() {
        let id = format!("a\r\nb{}", "x".repeat(1024));
        let msg = FlowError::Changed.message(&id);
        assert!(msg.starts_with("ERR flow \"a\\r\\nb"), "{msg}");
        assert!(!msg.contains('\n') && !msg.contains('\r'));
        assert!(msg.len() < 300);
        let huge = "k".repeat(1 << 20);
        for e in [
            FlowError::Unreadable(huge.clone()),
            FlowError::Conflict(huge.clone()),
            FlowError::NoPerm(huge.clone()),
            FlowError::Internal(huge.clone()),
        ] {
            let msg = e.message(&huge);
            assert!(msg.len() <= MAX_MESSAGE, "{} bytes", msg.len());
            assert!(msg.ends_with("...") || !msg.contains(&huge));
        }
        let msg = FlowError::TooRecent {
            idle_ms: 5000,
            retention_ms: 30 * 86_400_000,
        }
        .message("abc");
        assert_eq!(
            msg,
            "ERR flow \"abc\" is not idle long enough (idle 5s, retention 30d); FORCE skips this check"
        );
    }
}
