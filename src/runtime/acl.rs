//! ACL checks on the caller's behalf.
//!
//! The commands declare no keys and the module reads and writes through its own calls, which the
//! server does not check against the client's ACL. So every key the module touches for a client is
//! checked here against that client's user first: read access for FLOWARCHIVE.GET, read and write for
//! FLOW and SWEEP. Only the internal sweep timer acts with the server's own rights.

use redis_module::{AclPermissions, Context};

use crate::ops::errors::FlowError;
use crate::runtime::server::string;

/// On whose behalf the module touches keys.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The module itself (the internal sweep timer): full rights.
    Server,
    /// A client's ACL user.
    User(String),
}

impl Caller {
    /// The user of the client running the current command.
    pub fn of(ctx: &Context) -> Caller {
        Caller::User(ctx.get_current_user().to_string_lossy())
    }
}

/// What the module does to a key.
#[derive(Clone, Copy)]
pub enum Access {
    /// Reads it.
    Read,
    /// Reads it and removes data from it (own keys, status and label indexes).
    Remove,
    /// Reads it and adds an entry (the archive index).
    Add,
}

impl Access {
    fn permissions(self) -> AclPermissions {
        match self {
            Access::Read => AclPermissions::ACCESS,
            Access::Remove => AclPermissions::ACCESS | AclPermissions::DELETE,
            Access::Add => AclPermissions::ACCESS | AclPermissions::INSERT,
        }
    }
}

/// Refuses with `NOPERM` unless `caller` may do `access` to `key`.
pub fn check(ctx: &Context, caller: &Caller, key: &str, access: Access) -> Result<(), FlowError> {
    let Caller::User(user) = caller else {
        return Ok(());
    };
    let allowed = ctx.acl_check_key_permission(
        &string(ctx, user.as_bytes()),
        &string(ctx, key.as_bytes()),
        &access.permissions(),
    );
    allowed.map_err(|_| FlowError::NoPerm(key.to_string()))
}

/// `check` for each of `keys`.
pub fn check_all<'k>(
    ctx: &Context,
    caller: &Caller,
    keys: impl IntoIterator<Item = &'k str>,
    access: Access,
) -> Result<(), FlowError> {
    keys.into_iter()
        .try_for_each(|k| check(ctx, caller, k, access))
}
