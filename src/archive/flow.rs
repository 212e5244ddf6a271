//! The flow as read from Valkey: what capture produces, encode writes and the commit removes.

use crate::layout::FlowKeys;

pub struct Captured {
    pub id: String,
    pub db: i32,
    pub keys: FlowKeys,
    pub events: Vec<Vec<u8>>,
    pub snapshot: Vec<u8>,
    pub seq: Option<i64>,
    pub labels: Vec<(String, String)>,
    pub status: String,
    /// The status ZSET score as stored (the last event's unix ms), if the layout has that index.
    pub status_score: Option<String>,
}
