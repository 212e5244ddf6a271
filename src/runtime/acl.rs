//! ACL checks on the caller's behalf.
//!
//! The commands declare no keys (the flow id is a routing-only key) and the module reads and writes
//! through its own calls, which the server does not check against the client's ACL. So every key the
//! module touches for a client is checked here against that client's user first: read access for
//! FLOWARCHIVE.GET, read and write for FLOW and SWEEP. Only the internal sweep timer acts with the
//! server's own rights.
//!
//! Keys are checked as the server checks one multi-key command. A user's permissions are its root
//! selector and any number of `( ... )` selectors, and a command runs only if one selector allows
//! both the command and all its keys: keys each allowed by some selector are not enough (a user
//! whose root allows `~a:*` and a selector `~b:*` may not `COPY a:x b:y`). One archive, or one read,
//! is such a command: inside `Caller::one_command` every key must be allowed by a selector that also
//! allows every key checked before it. The sweep's selection, which only picks candidates, checks
//! keys alone.
//!
//! The module API checks a key alone (`ACLCheckKeyPermissions`) or a whole command line against the
//! selectors one by one (`ACLCheckCommandPermissions`, which finds the keys by the command's key
//! specs). So the module registers a stand-in command, FLOWARCHIVE.ACLCHECK, whose arguments are the
//! keys to check grouped by access (`Access`): `READ <n> <key>...`, `REMOVE <n> <key>...`,
//! `ADD <n> <key>...`. Checking the stand-in with an archive's keys asks the server exactly "does one
//! selector allow this command with all these keys" (on Valkey 9.1, whose selectors grant databases
//! too: "in this DB"). A client calling the stand-in gets an error and nothing else.
//!
//! The stand-in counts for the command being run where a selector grants both or neither. It is in
//! the category `@flowarchive` with FLOW, GET and SWEEP, and module commands are in no other
//! category, so `+@all`, `allcommands` and `+@flowarchive` grant all four alike. Rules that name
//! single commands can set them apart:
//! - a user no selector grants the stand-in (commands granted one by one, or Redis 7.0, which has no
//!   module categories) is checked key by key if it has no `( ... )` selectors (its root is then its
//!   one selector, so key by key is the same check) and refused if it has some: it must be granted
//!   the stand-in where it is granted the commands;
//! - a selector that grants `@flowarchive` but takes one of its commands away (`-flowarchive.flow`)
//!   still grants the stand-in, so the keys it allows count for that command too (docs/SAFETY.md).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::raw::{c_int, c_void};
use std::sync::{Mutex, OnceLock};

use redis_module::{raw, AclPermissions, CallReply, Context, RedisString};

use crate::ops::errors::{show_key, FlowError};
use crate::runtime::server::{bytes, call, selected_db, string, strings};
use crate::sync::lock;

/// The stand-in command (see the module docs).
pub const STANDIN: &str = "flowarchive.aclcheck";

/// A client's call of the stand-in.
pub const STANDIN_CALLED: &str = "ERR FLOWARCHIVE.ACLCHECK is not for clients: flowarchive passes an archive's keys to the server's ACL check through it; it does nothing";

/// On whose behalf the module touches keys.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The module itself (the internal sweep timer): full rights.
    Server,
    /// A client's ACL user.
    User(User),
}

/// A client's ACL user, by name.
#[derive(Debug)]
pub struct User {
    name: String,
    /// Inside one command (`Caller::one_command`): the keys allowed so far, which every further key
    /// must join under one selector. `None` outside one: a key is checked alone.
    command: Option<Mutex<Together>>,
}

impl Clone for User {
    fn clone(&self) -> Self {
        User {
            name: self.name.clone(),
            command: self.command.as_ref().map(|c| Mutex::new(lock(c).clone())),
        }
    }
}

/// The keys of one command checked so far.
#[derive(Clone, Debug, Default)]
struct Together {
    keys: Vec<Checked>,
    /// No selector grants the stand-in and the user has no `( ... )` selectors: its root is its one
    /// selector, and keys are checked alone.
    root_only: bool,
}

/// A key checked in a command, with its server string for the stand-in's arguments once made: a
/// later check of the command with more keys makes strings only for the new ones.
#[derive(Clone, Debug)]
struct Checked {
    key: String,
    access: Access,
    arg: Arg,
}

impl Checked {
    fn new(key: &str, access: Access) -> Checked {
        Checked {
            key: key.to_string(),
            access,
            arg: Arg::default(),
        }
    }
}

/// The stand-in's other arguments as server strings, each made when first needed, by place: its name
/// at 0, the keywords of `Access::ALL` next, then the groups' key counts (the count `n` at
/// `COUNTS + n`).
#[derive(Debug, Default)]
struct Fixed(Vec<Arg>);

/// The stand-in's fixed arguments, shared by every check: a few strings made once each and kept until
/// the module unloads (`deinit`), instead of seven made and freed per command. Used on the main thread
/// only; the server reads a check's arguments and never changes them.
static FIXED: Mutex<Fixed> = Mutex::new(Fixed(Vec::new()));

/// Frees the stand-in's fixed arguments at MODULE UNLOAD (no check runs then).
pub fn deinit() {
    lock(&FIXED).0.clear();
}

/// Where the counts' strings begin in `Fixed`.
const COUNTS: usize = 1 + Access::ALL.len();

impl Fixed {
    /// The string at `place`, made of `bytes()` if not made yet.
    fn string<'b>(
        &mut self,
        place: usize,
        bytes: impl FnOnce() -> Cow<'b, [u8]>,
    ) -> *mut raw::RedisModuleString {
        if self.0.len() <= place {
            self.0.resize_with(place + 1, Arg::default);
        }
        self.0[place].ptr(bytes)
    }
}

/// A server string made with no context, when first needed: it outlives the call that makes it. A
/// copy makes its own.
#[derive(Debug, Default)]
struct Arg(Option<RedisString>);

impl Arg {
    /// The string, made of `bytes()` if not made yet.
    fn ptr<'b>(&mut self, bytes: impl FnOnce() -> Cow<'b, [u8]>) -> *mut raw::RedisModuleString {
        let made = self
            .0
            .get_or_insert_with(|| RedisString::create_from_slice(std::ptr::null_mut(), &bytes()));
        made.inner
    }
}

impl Clone for Arg {
    fn clone(&self) -> Self {
        Arg(None)
    }
}

// SAFETY: the string is made with no context, so it belongs to no client or call, and only this value
// uses it: a key's in the checks of one command, in one main-thread step (`Caller::one_command` is
// held by the step's own code), a fixed one (`FIXED`) in checks on the main thread only, read-only.
// Dropping it elsewhere only releases memory through the server's thread-safe allocator.
unsafe impl Send for Arg {}

impl Caller {
    /// The user of the client running the current command.
    pub fn of(ctx: &Context) -> Caller {
        Caller::User(User {
            name: ctx.get_current_user().to_string_lossy(),
            command: None,
        })
    }

    /// The caller inside one command: every key checked through the value returned must join the keys
    /// checked through it before. A caller already inside one stays in it.
    pub fn one_command(&self) -> Cow<'_, Caller> {
        match self {
            Caller::User(User {
                name,
                command: None,
            }) => Cow::Owned(Caller::User(User {
                name: name.clone(),
                command: Some(Mutex::default()),
            })),
            _ => Cow::Borrowed(self),
        }
    }
}

/// What the module does to a key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Access {
    /// Reads it.
    Read,
    /// Reads it and removes data from it (own keys, status and label indexes).
    Remove,
    /// Reads it and adds an entry (the archive index).
    Add,
}

impl Access {
    const ALL: [Access; 3] = [Access::Read, Access::Remove, Access::Add];

    /// Whether a selector allowing a key with this access allows it with `other` too: the same
    /// access, or reading a key it may read and write (its key spec asks read and write rights).
    fn implies(self, other: Access) -> bool {
        self == other || other == Access::Read
    }

    /// What the server's ACL asks of a key with this access, alone (`ACLCheckKeyPermissions`); the
    /// stand-in's key spec for the access asks the same of its group (`commands::aclcheck`: read;
    /// write for delete and insert).
    fn permissions(self) -> AclPermissions {
        match self {
            Access::Read => AclPermissions::ACCESS,
            Access::Remove => AclPermissions::ACCESS | AclPermissions::DELETE,
            Access::Add => AclPermissions::ACCESS | AclPermissions::INSERT,
        }
    }

    /// Its place in `ALL`.
    fn index(self) -> usize {
        Access::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }

    /// The keyword that introduces keys with this access in the stand-in's arguments.
    fn keyword(self) -> &'static str {
        match self {
            Access::Read => "READ",
            Access::Remove => "REMOVE",
            Access::Add => "ADD",
        }
    }
}

/// Refuses with `NOPERM` unless `caller` may do `access` to `key`, and, inside one command, to it
/// together with the keys checked before it.
pub fn check(ctx: &Context, caller: &Caller, key: &str, access: Access) -> Result<(), FlowError> {
    check_keys(ctx, caller, [(key, access)])
}

/// `check` for each of `keys`.
pub fn check_all<'k>(
    ctx: &Context,
    caller: &Caller,
    keys: impl IntoIterator<Item = &'k str>,
    access: Access,
) -> Result<(), FlowError> {
    check_keys(ctx, caller, keys.into_iter().map(|k| (k, access)))
}

/// Whether the caller may touch `keys` with `access` in `db` as one command, as if its client had
/// selected `db` (Valkey 9.1 grants databases per selector): the stand-in with those keys asked of the
/// server in that DB. A user the stand-in is not granted to is refused. On a server without per-DB
/// rights a key's rights are the same in every DB, so `check_all` in the context's DB answers it.
pub fn check_all_in<'k>(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    keys: impl IntoIterator<Item = &'k str>,
    access: Access,
) -> Result<(), FlowError> {
    let Caller::User(user) = caller else {
        return Ok(());
    };
    let keys: Vec<(&str, Access)> = keys.into_iter().map(|k| (k, access)).collect();
    let args = standin_args(&keys)?;
    match may_run_in(ctx, &user.name, &args, db) {
        Some(false) => Err(FlowError::NoPerm(format!(
            "this user has no permissions to read the flow's keys in database {db}"
        ))),
        Some(true) => Ok(()),
        None => check_keys(ctx, caller, keys),
    }
}

/// Of `keys`, each one `held` does not hold with the same or a wider access, once. A few are compared
/// with the held keys directly, which allocates nothing (a short flow's command checks a handful at a
/// time); many are looked up by name, so that a command of many keys (a flow of many labels) costs
/// each key one lookup, not a pass over all the others, and ordered, so that a lookup compares names
/// only up to where they differ (a label index is named after its value, which may be megabytes long).
fn unheld<'k>(held: &[Checked], keys: &[(&'k str, Access)]) -> Vec<(&'k str, Access)> {
    const FEW: usize = 16;
    let mut new: Vec<(&str, Access)> = Vec::with_capacity(keys.len());
    if keys.len() <= FEW {
        for &(key, access) in keys {
            let covers = |k: &str, a: Access| k == key && a.implies(access);
            let known = held.iter().any(|c| covers(&c.key, c.access))
                || new.iter().any(|&(k, a)| covers(k, a));
            if !known {
                new.push((key, access));
            }
        }
        return new;
    }
    let mut by_name: BTreeMap<&str, Vec<Access>> = BTreeMap::new();
    for c in held {
        by_name.entry(&c.key).or_default().push(c.access);
    }
    for &(key, access) in keys {
        let accesses = by_name.entry(key).or_default();
        if !accesses.iter().any(|a| a.implies(access)) {
            accesses.push(access);
            new.push((key, access));
        }
    }
    new
}

/// `check` for each of `keys`, each with its access; inside one command, the server is asked once
/// whether they join the keys checked before them. A key that joins them is allowed alone too (the
/// selector that allows them all allows it), so each key alone is asked only outside one command,
/// once keys are checked alone (`Together::root_only`), or to name the key refused when the keys do
/// not join; a key already held with the same or a wider access in the same command is not asked
/// again (a command's checks run in one main-thread step, where no ACL changes).
pub fn check_keys<'k>(
    ctx: &Context,
    caller: &Caller,
    keys: impl IntoIterator<Item = (&'k str, Access)>,
) -> Result<(), FlowError> {
    let Caller::User(user) = caller else {
        return Ok(());
    };
    let keys: Vec<(&str, Access)> = keys.into_iter().collect();
    let Some(command) = &user.command else {
        return each_alone(ctx, &user.name, &keys);
    };
    let mut together = lock(command);
    if together.root_only {
        return each_alone(ctx, &user.name, &keys);
    }
    let before = together.keys.len();
    let new = unheld(&together.keys, &keys);
    together.keys.extend(
        new.into_iter()
            .map(|(key, access)| Checked::new(key, access)),
    );
    if together.keys.len() == before {
        return Ok(());
    }
    match joins(ctx, &user.name, &mut together, before) {
        Ok(()) if together.root_only => each_alone(ctx, &user.name, &keys),
        Ok(()) => Ok(()),
        Err(refused) => {
            let new: Vec<(&str, Access)> = together.keys[before..]
                .iter()
                .map(|k| (k.key.as_str(), k.access))
                .collect();
            let alone = each_alone(ctx, &user.name, &new);
            together.keys.truncate(before);
            alone.and(Err(refused))
        }
    }
}

/// Whether `user` may run `argv` in `db`, as the server checks it there (`ACLCheckPermissions`, Valkey
/// 9.1); `None` on a server without per-DB rights.
fn may_run_in(ctx: &Context, user: &str, argv: &[Cow<[u8]>], db: i32) -> Option<bool> {
    CHECK_IN_DB.get().copied().flatten()?;
    let Some(handle) = UserHandle::of(ctx, user) else {
        return Some(false);
    };
    let strings: Vec<RedisString> = argv.iter().map(|a| string(ctx, a)).collect();
    let mut argv: Vec<*mut raw::RedisModuleString> = strings.iter().map(|s| s.inner).collect();
    handle.runs_in(&mut argv, db)
}

/// Refuses with `NOPERM`, naming the first of `keys` the user may not touch alone, if any.
fn each_alone(ctx: &Context, user: &str, keys: &[(&str, Access)]) -> Result<(), FlowError> {
    let handle = UserHandle::of(ctx, user);
    for (key, access) in keys {
        if !handle.as_ref().is_some_and(|h| h.may(ctx, key, *access)) {
            return Err(FlowError::NoPerm(format!(
                "this user has no permissions to access the {} key",
                show_key(key)
            )));
        }
    }
    Ok(())
}

/// How the server answers a command for a user in a DB (`UserHandle::run_in`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ran {
    Allowed,
    /// Refused for the DB: no selector that grants the command may use it.
    RefusedDb,
    /// Refused for another reason (the command, a key).
    Refused,
}

/// The reason `ACLCheckPermissions` gives for a refusal for the DB (`VALKEYMODULE_ACL_LOG_DB`).
const ACL_DENIED_DB: c_int = 4;

/// The server's handle of an ACL user, freed when dropped.
struct UserHandle(*mut raw::RedisModuleUser);

impl UserHandle {
    /// `None` when no such user exists or it is disabled.
    fn of(ctx: &Context, user: &str) -> Option<UserHandle> {
        let name = string(ctx, user.as_bytes());
        // SAFETY: main thread; the name is a live server string; the handle is freed on drop.
        let handle = unsafe { raw::RedisModule_GetModuleUserFromUserName.map(|f| f(name.inner)) }?;
        (!handle.is_null()).then_some(UserHandle(handle))
    }

    /// Whether the user may do `access` to `key`, the key alone.
    fn may(&self, ctx: &Context, key: &str, access: Access) -> bool {
        let key = string(ctx, key.as_bytes());
        // SAFETY: a live user handle and server string, on the main thread.
        let rc = unsafe {
            raw::RedisModule_ACLCheckKeyPermissions
                .map(|f| f(self.0, key.inner, access.permissions().bits()))
        };
        rc == Some(raw::REDISMODULE_OK as c_int)
    }
}

impl UserHandle {
    /// Whether the user may run the command `argv` (server strings that outlive the call) in `db`, as
    /// the server checks it there (`ACLCheckPermissions`, Valkey 9.1); `None` on a server without
    /// per-DB rights.
    fn runs_in(&self, argv: &mut [*mut raw::RedisModuleString], db: i32) -> Option<bool> {
        self.run_in(argv, db).map(|ran| ran == Ran::Allowed)
    }

    /// How the server answers the command `argv` in `db` for the user (`runs_in`), telling a refusal
    /// for the DB from any other.
    fn run_in(&self, argv: &mut [*mut raw::RedisModuleString], db: i32) -> Option<Ran> {
        let check_in_db = CHECK_IN_DB.get().copied().flatten()?;
        let mut reason: c_int = 0;
        // SAFETY: main thread (every caller holds a context); a live user handle, and `argv` points
        // at server strings the caller keeps alive across the call.
        let rc = unsafe {
            check_in_db(
                self.0,
                argv.as_mut_ptr(),
                argv.len() as c_int,
                db,
                &mut reason,
            )
        };
        Some(match (rc == raw::REDISMODULE_OK as c_int, reason) {
            (true, _) => Ran::Allowed,
            (false, ACL_DENIED_DB) => Ran::RefusedDb,
            (false, _) => Ran::Refused,
        })
    }
}

impl Drop for UserHandle {
    fn drop(&mut self) {
        // SAFETY: a handle GetModuleUserFromUserName returned, freed once.
        unsafe {
            if let Some(free) = raw::RedisModule_FreeModuleUser {
                free(self.0);
            }
        }
    }
}

/// Whether the keys of `together` from `new` on, each allowed alone, join the ones before them under
/// one selector that grants the stand-in.
fn joins(ctx: &Context, user: &str, together: &mut Together, new: usize) -> Result<(), FlowError> {
    let all = together.keys.len();
    if standin_allows(ctx, user, together, all)? {
        return Ok(());
    }
    let without_keys = standin_ran(ctx, user, together, 0)?;
    if without_keys == Ran::Allowed {
        // The keys before `new` were allowed together: name the first that cannot join them. A
        // selector that allows some keys allows fewer, so the first `n` keys stop being allowed
        // together at one place, found by halving (a flow of many labels is not asked once per key).
        let (mut allowed, mut refused) = (new, all);
        while refused - allowed > 1 {
            let n = allowed + (refused - allowed) / 2;
            match standin_allows(ctx, user, together, n)? {
                true => allowed = n,
                false => refused = n,
            }
        }
        return Err(FlowError::NoPerm(format!(
            "no single ACL selector of this user allows FLOWARCHIVE commands on the {} key together with the other keys this flow needs (the server, too, runs a command only if one selector allows it with all its keys)",
            show_key(&together.keys[refused - 1].key)
        )));
    }
    if without_keys == Ran::RefusedDb {
        // The stand-in is granted but not in this DB: neither are the keys (the server refuses the
        // client every key command here, though it may keep the DB selected after losing it).
        return Err(FlowError::NoPerm(format!(
            "this user has no permissions to access database {}",
            selected_db(ctx)
        )));
    }
    if has_selectors(ctx, user) {
        return Err(FlowError::NoPerm(format!(
            "this user has ACL selectors and none grants {STANDIN} here, as which flowarchive checks a flow's keys together: grant it (or @flowarchive) where the FLOWARCHIVE commands are granted"
        )));
    }
    together.root_only = true;
    Ok(())
}

/// One piece of the stand-in's arguments (`standin_layout`).
enum Piece {
    Name,
    Keyword(Access),
    /// The number of keys in a group.
    Count(usize),
    /// The key at this place in the keys checked.
    Key(usize),
}

impl Piece {
    /// Its bytes, a key's taken from `keys`.
    fn bytes<'k>(&self, keys: &[(&'k str, Access)]) -> Cow<'k, [u8]> {
        match *self {
            Piece::Name => Cow::Borrowed(STANDIN.as_bytes()),
            Piece::Keyword(access) => Cow::Borrowed(access.keyword().as_bytes()),
            Piece::Count(n) => Cow::Owned(n.to_string().into_bytes()),
            Piece::Key(i) => Cow::Borrowed(keys[i].0.as_bytes()),
        }
    }
}

/// The stand-in's arguments for `keys`, as bytes.
fn standin_args<'k>(keys: &[(&'k str, Access)]) -> Result<Vec<Cow<'k, [u8]>>, FlowError> {
    standin_layout(keys, |piece| piece.bytes(keys))
}

/// The stand-in's arguments for `keys`, each made by `make`: its name, then per access
/// `<KEYWORD> <n> <key>...` (groups with no key left out). The server finds each group by the first
/// argument equal to its keyword (compared as C strings, ignoring ASCII case), searching from the
/// first argument: a key that could be taken for a keyword would move a group, so it is refused.
fn standin_layout<T>(
    keys: &[(&str, Access)],
    mut make: impl FnMut(Piece) -> T,
) -> Result<Vec<T>, FlowError> {
    if let Some((key, _)) = keys.iter().find(|(k, _)| {
        let c_string = k.as_bytes().split(|&b| b == 0).next().unwrap_or_default();
        Access::ALL
            .iter()
            .any(|a| c_string.eq_ignore_ascii_case(a.keyword().as_bytes()))
    }) {
        return Err(FlowError::NoPerm(format!(
            "the {} key cannot be checked together with the others: its name is a keyword of {STANDIN}",
            show_key(key)
        )));
    }
    let mut args = Vec::with_capacity(keys.len() + 7);
    args.push(make(Piece::Name));
    for access in Access::ALL {
        let group = (0..keys.len()).filter(|&i| keys[i].1 == access);
        let n = group.clone().count();
        if n == 0 {
            continue;
        }
        args.push(make(Piece::Keyword(access)));
        args.push(make(Piece::Count(n)));
        args.extend(group.map(|i| make(Piece::Key(i))));
    }
    Ok(args)
}

/// `ValkeyModule_ACLCheckPermissions` (Valkey 9.1): `ACLCheckCommandPermissions` in a given DB.
type CheckInDb = unsafe extern "C" fn(
    *mut raw::RedisModuleUser,
    *mut *mut raw::RedisModuleString,
    c_int,
    c_int,
    *mut c_int,
) -> c_int;

/// Valkey 9.1 grants databases per selector (`db=`), and its `ACLCheckCommandPermissions`, which
/// takes no DB, passes only selectors that allow every DB; `ACLCheckPermissions` takes the DB. Found
/// at load where the server has it; the servers without it have no DB permissions.
static CHECK_IN_DB: OnceLock<Option<CheckInDb>> = OnceLock::new();

fn check_in_db() -> Option<CheckInDb> {
    let name = CString::new("ValkeyModule_ACLCheckPermissions").ok()?;
    let mut found: *mut c_void = std::ptr::null_mut();
    // SAFETY: OnLoad; GetApi writes the function's address (or nothing) to `found`. The address is
    // that of the server's function with the signature `CheckInDb` (its Valkey name, so no other
    // server's API of another shape can answer).
    unsafe {
        let get_api = raw::RedisModule_GetApi?;
        let rc = get_api(name.as_ptr(), std::ptr::addr_of_mut!(found).cast());
        if rc != raw::REDISMODULE_OK as c_int || found.is_null() {
            return None;
        }
        Some(std::mem::transmute::<*mut c_void, CheckInDb>(found))
    }
}

/// The stand-in's arguments for the first `n` keys of `together`, as the server strings made for them.
fn standin_argv(
    together: &mut Together,
    n: usize,
) -> Result<Vec<*mut raw::RedisModuleString>, FlowError> {
    let keys = &mut together.keys;
    let mut fixed = lock(&FIXED);
    let keys = &mut keys[..n];
    let strings: Vec<_> = keys
        .iter_mut()
        .map(|k| k.arg.ptr(|| Cow::Borrowed(k.key.as_bytes())))
        .collect();
    let layout: Vec<(&str, Access)> = keys.iter().map(|k| (k.key.as_str(), k.access)).collect();
    standin_layout(&layout, |piece| {
        let place = match piece {
            Piece::Key(i) => return strings[i],
            Piece::Name => 0,
            Piece::Keyword(access) => 1 + access.index(),
            Piece::Count(n) => COUNTS + n,
        };
        fixed.string(place, || piece.bytes(&layout))
    })
}

/// Whether one selector of `user` grants the stand-in, in the DB of `ctx`, with every one of the
/// first `n` keys of `together` (with none: whether one grants the stand-in there at all).
fn standin_allows(
    ctx: &Context,
    user: &str,
    together: &mut Together,
    n: usize,
) -> Result<bool, FlowError> {
    Ok(standin_ran(ctx, user, together, n)? == Ran::Allowed)
}

/// How the server answers the stand-in with the first `n` keys of `together` for `user` in the
/// selected DB.
fn standin_ran(
    ctx: &Context,
    user: &str,
    together: &mut Together,
    n: usize,
) -> Result<Ran, FlowError> {
    let mut argv = standin_argv(together, n)?;
    let argc = argv.len() as c_int;
    let db = selected_db(ctx);
    let Some(handle) = UserHandle::of(ctx, user) else {
        return Ok(Ran::Refused);
    };
    // Every argument is created from bytes, so the server reads each as the string it parses keywords
    // and counts from.
    let ran = handle.run_in(&mut argv, db).unwrap_or_else(|| {
        // SAFETY: main thread (every caller holds a context); the user handle lives until the end of
        // this function and `argv` points at strings that outlive the call.
        let rc = unsafe {
            raw::RedisModule_ACLCheckCommandPermissions
                .map(|check| check(handle.0, argv.as_mut_ptr(), argc))
        };
        match rc == Some(raw::REDISMODULE_OK as c_int) {
            true => Ran::Allowed,
            false => Ran::Refused,
        }
    });
    Ok(ran)
}

/// Whether `user` has `( ... )` selectors besides its root (`ACL GETUSER`; an answer that cannot be
/// read counts as yes).
fn has_selectors(ctx: &Context, user: &str) -> bool {
    let Ok(CallReply::Array(fields)) = call(ctx, "ACL", &[b"GETUSER", user.as_bytes()]) else {
        return true;
    };
    let mut fields = fields.iter();
    while let Some(field) = fields.next() {
        let value = fields.next();
        if field.ok().as_ref().and_then(bytes).as_deref() == Some(b"selectors".as_slice()) {
            return !matches!(value, Some(Ok(CallReply::Array(selectors))) if selectors.len() == 0);
        }
    }
    true
}

/// At load: finds `ACLCheckPermissions` and proves that the server finds, by the stand-in's key specs
/// (declared with the command, `commands::aclcheck`: one per access, its keyword, then `<n>` keys),
/// exactly the keys `standin_args` lays out. A stand-in whose keys the server did not find would pass
/// every check with no key checked, so without that the module does not load.
pub fn init(ctx: &Context) -> Result<(), String> {
    CHECK_IN_DB.get_or_init(check_in_db);
    let mismatch = || {
        format!("the server finds other keys in {STANDIN}'s arguments than flowarchive lays out; ACL checks would be wrong, so the module does not load")
    };
    let sample = |keys: &[(&str, Access)]| -> Result<(), String> {
        let args = standin_args(keys).map_err(|_| mismatch())?;
        let mut getkeys: Vec<&[u8]> = vec![b"GETKEYS"];
        getkeys.extend(args.iter().map(|a| a.as_ref()));
        let found = strings(&call(ctx, "COMMAND", &getkeys).map_err(|e| e.to_string())?);
        // The server lists keys spec by spec: the groups in keyword order.
        let expected: Vec<Vec<u8>> = Access::ALL
            .iter()
            .flat_map(|access| keys.iter().filter(move |(_, a)| a == access))
            .map(|(k, _)| k.as_bytes().to_vec())
            .collect();
        if found != expected {
            return Err(mismatch());
        }
        Ok(())
    };
    sample(&[
        ("r", Access::Read),
        ("d1", Access::Remove),
        ("d2", Access::Remove),
        ("a", Access::Add),
    ])?;
    sample(&[("d", Access::Remove), ("a", Access::Add)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(args: Vec<Cow<[u8]>>) -> Vec<String> {
        args.into_iter()
            .map(|a| String::from_utf8(a.into_owned()).unwrap())
            .collect()
    }

    /// Whether few keys are compared directly or many looked up by name, the keys a command has not
    /// yet checked are the same: each once, unless held with the same or a wider access.
    #[test]
    fn unheld_keys_are_the_same_compared_or_looked_up() {
        let accesses = [Access::Read, Access::Remove, Access::Add];
        let names: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
        let all: Vec<(&str, Access)> = (0..60)
            .map(|i| (names[i * 5 % 7].as_str(), accesses[i * 3 % 4 % 3]))
            .collect();
        for (held_len, len) in [(0, 5), (3, 16), (3, 17), (10, 40), (40, 16), (0, 60)] {
            let held: Vec<Checked> = (all.iter().take(held_len))
                .map(|&(k, a)| Checked::new(k, a))
                .collect();
            let keys = &all[held_len..(held_len + len).min(all.len())];
            let mut want: Vec<(&str, Access)> = Vec::new();
            for &(key, access) in keys {
                let holds = |k: &str, a: Access| k == key && a.implies(access);
                if !held.iter().any(|c| holds(&c.key, c.access))
                    && !want.iter().any(|&(k, a)| holds(k, a))
                {
                    want.push((key, access));
                }
            }
            assert_eq!(unheld(&held, keys), want, "{held_len} held, {len} new");
        }
    }

    #[test]
    fn keys_are_grouped_by_access_in_keyword_order() {
        let keys = [
            ("idx", Access::Add),
            ("ev", Access::Remove),
            ("lease", Access::Read),
            ("snap", Access::Remove),
        ];
        let args = standin_args(&keys).unwrap();
        assert_eq!(
            text(args),
            [STANDIN, "READ", "1", "lease", "REMOVE", "2", "ev", "snap", "ADD", "1", "idx"]
        );
    }

    #[test]
    fn groups_without_keys_are_left_out() {
        assert_eq!(text(standin_args(&[]).unwrap()), [STANDIN]);
        let both = [("a", Access::Read), ("b", Access::Read)];
        let read = standin_args(&both).unwrap();
        assert_eq!(text(read), [STANDIN, "READ", "2", "a", "b"]);
    }

    /// Server strings without a server: each a box of the bytes it was made from.
    fn fake_strings() {
        unsafe extern "C" fn create(
            _: *mut raw::RedisModuleCtx,
            ptr: *const std::os::raw::c_char,
            len: usize,
        ) -> *mut raw::RedisModuleString {
            // SAFETY: the caller passes `len` bytes at `ptr`.
            let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }.to_vec();
            Box::into_raw(Box::new(bytes)).cast()
        }
        unsafe extern "C" fn free(_: *mut raw::RedisModuleCtx, s: *mut raw::RedisModuleString) {
            // SAFETY: a box `create` made, freed once.
            drop(unsafe { Box::from_raw(s.cast::<Vec<u8>>()) });
        }
        static FAKED: std::sync::Once = std::sync::Once::new();
        // SAFETY: set once, before any string is made; no other unit test makes server strings.
        FAKED.call_once(|| unsafe {
            raw::RedisModule_CreateString = Some(create);
            raw::RedisModule_FreeString = Some(free);
        });
    }

    /// The stand-in's arguments for the first `n` keys of `together`, as the strings made for them say.
    fn argv(together: &mut Together, n: usize) -> Vec<String> {
        let argv = standin_argv(together, n).unwrap();
        argv.into_iter()
            // SAFETY: each a live string `fake_strings` made.
            .map(|s| String::from_utf8(unsafe { (*s.cast::<Vec<u8>>()).clone() }).unwrap())
            .collect()
    }

    fn check(together: &mut Together, keys: &[(&str, Access)]) {
        together
            .keys
            .extend(keys.iter().map(|(k, a)| Checked::new(k, *a)));
    }

    /// The strings made once per command lay out exactly what `standin_args` does, for every prefix
    /// (the refusal's search for the key to name), after keys added by several checks, after keys
    /// refused and forgotten (a key checked later must not take a refused key's string), with counts
    /// of one, ten and more in one command, and in a copy of the command's keys.
    #[test]
    fn the_strings_made_once_per_command_lay_out_the_keys_checked() {
        fake_strings();
        let mut together = Together::default();
        let same = |together: &mut Together| {
            for n in 0..=together.keys.len() {
                let keys: Vec<(&str, Access)> = together.keys[..n]
                    .iter()
                    .map(|k| (k.key.as_str(), k.access))
                    .collect();
                let bytes = text(standin_args(&keys).unwrap());
                assert_eq!(argv(together, n), bytes, "{n} keys");
            }
        };
        check(&mut together, &[("a", Access::Remove), ("b", Access::Read)]);
        same(&mut together);
        // Refused, forgotten, and a key checked in their place.
        check(&mut together, &[("c", Access::Read), ("d", Access::Remove)]);
        same(&mut together);
        together.keys.truncate(2);
        check(&mut together, &[("e", Access::Read)]);
        same(&mut together);
        assert_eq!(
            argv(&mut together, 3),
            [STANDIN, "READ", "2", "b", "e", "REMOVE", "1", "a"]
        );
        // Groups of 1, 10, 11 and 101 keys.
        let many: Vec<String> = (0..110).map(|i| format!("k{i}")).collect();
        let many: Vec<(&str, Access)> = many
            .iter()
            .map(|k| (k.as_str(), Access::Remove))
            .chain([("x", Access::Add)])
            .collect();
        check(&mut together, &many);
        same(&mut together);
        let mut copy = together.clone();
        same(&mut copy);
    }

    #[test]
    fn a_key_the_server_could_take_for_a_keyword_is_refused() {
        for key in ["add", "Remove", "READ", "read\0tail"] {
            let e = standin_args(&[("x", Access::Remove), (key, Access::Read)])
                .unwrap_err()
                .message("f");
            assert!(e.starts_with("NOPERM") && e.contains("keyword"), "{e}");
        }
        assert!(standin_args(&[("add:1", Access::Add), ("readme", Access::Read)]).is_ok());
    }
}
