//! What a read may read, carried with it off the main thread: its caller and the flow's keys it reads
//! for the answer, to be allowed together, as the keys of one command.
//!
//! A live read in steps checks them again in every step that reads the keys (`live`). An archived
//! read checks them in the DB that an index entry or an earlier incarnation's location names, where
//! that is not the DB read from: SWAPDB moves index entries with their DB, anyone who may write the
//! index can plant one, and each object records its predecessor's entry as the index held it then.

use redis_module::Context;

use crate::ops::errors::FlowError;
use crate::runtime::acl::{self, Access, Caller};

pub struct Rights {
    caller: Caller,
    keys: Vec<String>,
}

impl Rights {
    pub fn new<'k>(caller: Caller, keys: impl IntoIterator<Item = &'k str>) -> Rights {
        let keys = keys.into_iter().map(str::to_string).collect();
        Rights { caller, keys }
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(String::as_str)
    }

    /// Refuses with `NOPERM` unless the caller may still read the keys, as the keys of one command.
    pub fn check(&self, ctx: &Context) -> Result<(), FlowError> {
        acl::check_all(ctx, &self.caller.one_command(), self.keys(), Access::Read)
    }

    /// Refuses with `NOPERM` unless the caller may read the keys in `db`, as one command there.
    pub fn check_in(&self, ctx: &Context, db: i32) -> Result<(), FlowError> {
        acl::check_all_in(ctx, &self.caller, db, self.keys(), Access::Read)
    }
}
