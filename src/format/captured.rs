//! The flow as read from Valkey: what capture produces, the writer encodes and the commit removes.

use crate::format::event_log::EventLog;
use crate::layout::FlowKeys;

pub struct Captured {
    pub id: String,
    pub db: i32,
    pub keys: FlowKeys,
    pub events: EventLog,
    /// The stored snapshot, if the flow has one (most flows of the engine do not). Freed, like the
    /// events, once the object is encoded (`archive::upload`): the commit compares what the
    /// fingerprint holds of it.
    pub snapshot: Option<Vec<u8>>,
    /// `snapshot:seq`: how many events the snapshot folded in, if the key exists.
    pub seq: Option<i64>,
    pub labels: Vec<(String, String)>,
    pub status: String,
    /// The status ZSET score as stored (the last event's unix ms), if the layout has that index.
    pub status_score: Option<f64>,
    /// The location of an earlier incarnation of this id (the engine started the id again after it was
    /// archived): this archive records it as its predecessor, and the commit replaces its index entry.
    pub previous: Option<String>,
}
