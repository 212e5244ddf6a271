//! A key opened for reading, for every read a step makes of it.
//!
//! Each open costs the server a name string, a lookup and a handle: about 1,200 instructions with the
//! close. The capture and the commit read most keys for their type and then for their value, so each
//! such key is opened once for both (`Key::open`), and read where the server holds it: no reply is
//! built, as one through `RM_Call` would be.
//!
//! A handle is valid while nothing writes the key: one is dropped before its step writes (every read
//! here comes before the commit's first write).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::os::raw::{c_int, c_long, c_void};

use redis_module::{raw, Context, KeyType, RedisString};

use crate::ops::errors::{holds, FlowError, ServerError};
use crate::runtime::server::string;

/// A key opened for reading: its handle (NULL for a missing key) and its type, closed when dropped.
pub struct Key<'a> {
    ctx: &'a Context,
    name: &'a str,
    handle: *mut raw::RedisModuleKey,
    /// The server's code of its type (`KeyType` is not `Copy`).
    kind: c_int,
}

impl Drop for Key<'_> {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            raw::close_key(self.handle);
        }
    }
}

impl<'a> Key<'a> {
    /// Opens `name` in the context's DB for reading.
    pub fn open(ctx: &'a Context, name: &'a str) -> Key<'a> {
        let handle = raw::open_key(
            ctx.ctx,
            string(ctx, name.as_bytes()).inner,
            raw::KeyMode::READ,
        );
        // SAFETY: `handle` is a key this context just opened (NULL for a missing key, which KeyType
        // accepts).
        let kind = unsafe { raw::RedisModule_KeyType.map_or(0, |t| t(handle)) };
        Key {
            ctx,
            name,
            handle,
            kind,
        }
    }

    pub fn kind(&self) -> KeyType {
        KeyType::from(self.kind)
    }

    /// Its type, and what `value_of` reads of it where it holds `expected`.
    pub fn read_as<T>(
        &self,
        expected: KeyType,
        value_of: impl FnOnce(&Key) -> Option<T>,
    ) -> (KeyType, Option<T>) {
        let kind = self.kind();
        let value = (kind == expected).then(|| value_of(self)).flatten();
        (kind, value)
    }

    /// Whether it holds a value of type `expected`: `false` when empty, an error naming the key when it
    /// holds another type.
    pub fn holds(&self, expected: &KeyType) -> Result<bool, FlowError> {
        holds(self.name, &self.kind(), expected)
    }

    /// Whether it holds a value of type `expected`: `false` when empty, the server's `WRONGTYPE`
    /// error, as a command on it would answer, when it holds another type.
    fn typed(&self, expected: KeyType) -> Result<bool, ServerError> {
        match self.kind() {
            KeyType::Empty => Ok(false),
            t if t == expected => Ok(true),
            _ => Err(ServerError::WrongType),
        }
    }

    /// The length of its value of type `expected` (as `LLEN`, `HLEN`...), 0 when empty.
    pub fn len(&self, expected: KeyType) -> Result<usize, ServerError> {
        if !self.typed(expected)? {
            return Ok(0);
        }
        // SAFETY: a key this context opened, holding a value.
        Ok(unsafe { raw::RedisModule_ValueLength.map_or(0, |f| f(self.handle)) })
    }

    /// Its string value's bytes, where the server holds them; `None` when it holds no string.
    pub fn string(&self) -> Option<&[u8]> {
        if self.kind() != KeyType::String {
            return None;
        }
        let mut len = 0;
        let dma = raw::string_dma(self.handle, &mut len, raw::KeyMode::READ);
        // SAFETY: the server's bytes of the value, valid while the key is open and unwritten, which
        // the borrow of `self` ensures here.
        (!dma.is_null()).then(|| unsafe { std::slice::from_raw_parts(dma.cast::<u8>(), len) })
    }

    /// The value of `field` in its hash (as `HGET`).
    pub fn hash_get(&self, field: &[u8]) -> Result<Option<Vec<u8>>, ServerError> {
        if !self.typed(KeyType::Hash)? {
            return Ok(None);
        }
        let field = string(self.ctx, field);
        let mut value: *mut raw::RedisModuleString = std::ptr::null_mut();
        // SAFETY: a hash key opened for reading; one field (a server string) with its out-pointer,
        // then the NULL that ends the list. A value found is a new string this code owns.
        let rc = unsafe {
            let get = raw::RedisModule_HashGet.ok_or(ServerError::NoApi("RedisModule_HashGet"))?;
            get(
                self.handle,
                raw::REDISMODULE_HASH_NONE as c_int,
                field.inner,
                std::ptr::addr_of_mut!(value),
                std::ptr::null_mut::<c_void>(),
            )
        };
        if rc != raw::REDISMODULE_OK as c_int || value.is_null() {
            return Ok(None);
        }
        let value = RedisString::from_redis_module_string(self.ctx.ctx, value);
        Ok(Some(value.as_slice().to_vec()))
    }

    /// The score of `member` in its sorted set (as `ZSCORE`, without formatting it).
    pub fn zset_score(&self, member: &[u8]) -> Result<Option<f64>, ServerError> {
        if !self.typed(KeyType::ZSet)? {
            return Ok(None);
        }
        let member = string(self.ctx, member);
        let mut score = 0f64;
        // SAFETY: a sorted-set key opened for reading; the member a server string; `score` is
        // written only when the member is found.
        let rc = unsafe {
            raw::RedisModule_ZsetScore.map_or(raw::REDISMODULE_ERR as c_int, |f| {
                f(self.handle, member.inner, std::ptr::addr_of_mut!(score))
            })
        };
        Ok((rc == raw::REDISMODULE_OK as c_int).then_some(score))
    }

    /// Whether it has a TTL (as `PTTL` answering 0 or more).
    pub fn has_ttl(&self) -> bool {
        if self.handle.is_null() {
            return false;
        }
        // SAFETY: a key this context opened, holding a value.
        let ttl = unsafe {
            raw::RedisModule_GetExpire.map_or(raw::REDISMODULE_NO_EXPIRE as i64, |f| f(self.handle))
        };
        ttl != raw::REDISMODULE_NO_EXPIRE as i64
    }

    /// Hands the elements `from..to` of its list to `f` one at a time (fewer if the list is shorter),
    /// until `f` breaks. Each element is copied alone (`RM_ListGet`, sequential in O(1) per element
    /// like `LRANGE`), never a whole range at once: an `LRANGE` reply holds every element of the range
    /// before the first is looked at, so a caller refusing at a byte cap would have the server build
    /// the whole range (1024 elements of up to 512 MB) in memory first.
    pub fn list_each(
        &self,
        from: usize,
        to: usize,
        mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), ServerError> {
        if from >= to || !self.typed(KeyType::List)? {
            return Ok(());
        }
        // SAFETY: reading a function pointer the module API filled in at load, before any command
        // ran, and never writes again: no write races this read.
        let Some(list_get) = (unsafe { raw::RedisModule_ListGet }) else {
            return Err(ServerError::NoApi("RedisModule_ListGet"));
        };
        for index in from..to {
            let Ok(index) = c_long::try_from(index) else {
                break;
            };
            // SAFETY: a list key opened for reading, open while `self` lives; the element returned
            // is a new string this code owns (freed by `RedisString`'s drop), NULL past the end.
            let element = unsafe { list_get(self.handle, index) };
            if element.is_null() {
                break;
            }
            let element = RedisString::from_redis_module_string(self.ctx.ctx, element);
            if f(element.as_slice()).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Every (field, value) of its hash (`RM_ScanKey`: no reply is built for it, as `HGETALL` through
    /// `RM_Call` would), each field once, in field order. Empty when it holds no hash; `None` once the
    /// fields and values read pass `budget` bytes (the scan stops there, so a hash far larger than the
    /// budget is never read whole).
    pub fn hash_pairs(&self, budget: u64) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut pairs = HashPairs::default();
        let within = self.hash_pairs_on(
            &mut HashScan::new(),
            &mut pairs,
            |_| true,
            |after, _| after <= budget,
        );
        within.then(|| pairs.into_vec())
    }

    /// Reads on `scan` of its hash into `pairs`: whole calls of the scan (see `hash_scan`) while
    /// `go_on` allows the bytes `pairs` holds, so a read may stop between two calls and go on in a later
    /// step. Each pair not taken before is copied once `admit` allows the bytes the pairs would then
    /// hold and the pair's own; `false` once it does not (the scan stops there).
    pub fn hash_pairs_on(
        &self,
        scan: &mut HashScan,
        pairs: &mut HashPairs,
        go_on: impl Fn(u64) -> bool,
        mut admit: impl FnMut(u64, u64) -> bool,
    ) -> bool {
        let mut within = true;
        while within && !scan.done() && go_on(pairs.bytes) {
            self.hash_scan(scan, &mut |field, value| {
                within = pairs.take(field, value, &mut admit);
                match within {
                    true => ControlFlow::Continue(()),
                    false => ControlFlow::Break(()),
                }
            });
        }
        within
    }

    /// One call of `RM_ScanKey` on its hash, going on from where `scan` stopped: one bucket of the
    /// server's table (a hash small enough for a listpack: all of it), each (field, value) handed to
    /// `take` until it breaks. A field may come twice over a whole scan (the table resized between
    /// calls, or a probe chain wrapping around), never not at all while the hash is unchanged. The scan
    /// ends when the key holds no hash.
    fn hash_scan(&self, scan: &mut HashScan, take: &mut TakePair) {
        scan.done =
            scan.done || self.kind() != KeyType::Hash || !scan.cursor.scan(self.handle, take);
    }
}

/// What takes each (field, value) a scan hands over, until it breaks.
type TakePair<'t> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 't;

/// A hash's pairs as read, each field once (the first time the scan hands it), with their bytes.
#[derive(Default)]
pub struct HashPairs {
    pairs: BTreeMap<Vec<u8>, Vec<u8>>,
    bytes: u64,
}

impl HashPairs {
    /// Takes a pair not taken before, unless `admit` refuses the bytes the pairs would then hold and
    /// the pair's own.
    fn take(&mut self, field: &[u8], value: &[u8], admit: impl FnOnce(u64, u64) -> bool) -> bool {
        if self.pairs.contains_key(field) {
            return true;
        }
        let pair = (field.len() + value.len()) as u64;
        let bytes = self.bytes + pair;
        if !admit(bytes, pair) {
            return false;
        }
        self.bytes = bytes;
        self.pairs.insert(field.to_vec(), value.to_vec());
        true
    }

    /// The bytes of the fields and values taken.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The pairs in field order.
    pub fn into_vec(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.pairs.into_iter().collect()
    }
}

/// Pairs read before, to read on from (each field once, the first kept).
impl FromIterator<(Vec<u8>, Vec<u8>)> for HashPairs {
    fn from_iter<I: IntoIterator<Item = (Vec<u8>, Vec<u8>)>>(pairs: I) -> HashPairs {
        let mut read = HashPairs::default();
        for (field, value) in pairs {
            if !read.pairs.contains_key(&field) {
                read.bytes += (field.len() + value.len()) as u64;
                read.pairs.insert(field, value);
            }
        }
        read
    }
}

/// A scan of one hash that may go on in a later step, with the key opened again: the server's cursor,
/// and whether the scan has ended.
pub struct HashScan {
    cursor: Cursor,
    done: bool,
}

// SAFETY: the cursor is the server's allocation of two integers (where the scan is, whether it has
// ended), touched only by `RM_ScanKey` through `&mut HashScan` on the main thread; between steps no
// thread reads or writes it, and it is destroyed once, when dropped (`RM_ScanCursorDestroy` only
// frees it, which any thread may do: a capture that fails may end on a worker).
unsafe impl Send for HashScan {}
// SAFETY: as above: a shared `&HashScan` reads only `done`.
unsafe impl Sync for HashScan {}

impl HashScan {
    pub fn new() -> HashScan {
        HashScan {
            cursor: Cursor::new(),
            done: false,
        }
    }

    /// Whether the scan has handed over every field of the hash.
    pub fn done(&self) -> bool {
        self.done
    }
}

impl Default for HashScan {
    fn default() -> HashScan {
        HashScan::new()
    }
}

/// A scan cursor of one key, destroyed when dropped.
struct Cursor(*mut raw::RedisModuleScanCursor);

impl Cursor {
    fn new() -> Cursor {
        // SAFETY: creating a cursor has no precondition.
        Cursor(unsafe { raw::RedisModule_ScanCursorCreate.map_or(std::ptr::null_mut(), |f| f()) })
    }

    /// One call of `RM_ScanKey` on the key `handle`, handing each (field, value) to `take` until it
    /// breaks; whether the scan has more.
    fn scan(&self, handle: *mut raw::RedisModuleKey, take: &mut TakePair) -> bool {
        struct State<'t> {
            take: &'t mut TakePair<'t>,
            taking: bool,
        }
        unsafe extern "C" fn each(
            _key: *mut raw::RedisModuleKey,
            field: *mut raw::RedisModuleString,
            value: *mut raw::RedisModuleString,
            data: *mut c_void,
        ) {
            // SAFETY: `data` is the `State` below, alive for the `RM_ScanKey` call that calls this.
            let state = unsafe { &mut *data.cast::<State>() };
            // SAFETY: the field and value are the server's live strings for this call.
            let (field, value) = unsafe { (bytes_of(field), bytes_of(value)) };
            if state.taking {
                state.taking = (state.take)(field, value).is_continue();
            }
        }
        if self.0.is_null() || handle.is_null() {
            return false;
        }
        let mut state = State { take, taking: true };
        // SAFETY: a hash key opened for reading and a live cursor; `state` outlives the call.
        let more = unsafe {
            raw::RedisModule_ScanKey.map_or(0, |scan| {
                scan(
                    handle,
                    self.0,
                    Some(each),
                    std::ptr::addr_of_mut!(state).cast::<c_void>(),
                )
            })
        };
        more != 0
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a cursor `new` created, destroyed once.
            unsafe { raw::RedisModule_ScanCursorDestroy.map(|f| f(self.0)) };
        }
    }
}

/// The bytes of a server string, valid while the string is.
///
/// # Safety
/// `s` must be a live server string.
unsafe fn bytes_of<'s>(s: *mut raw::RedisModuleString) -> &'s [u8] {
    let mut len = 0;
    // SAFETY: the caller's promise; the pointer and length describe the string's bytes.
    unsafe {
        let ptr = raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |f| f(s, &mut len));
        match ptr.is_null() {
            true => &[],
            false => std::slice::from_raw_parts(ptr.cast::<u8>(), len),
        }
    }
}
