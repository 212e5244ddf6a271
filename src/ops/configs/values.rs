//! The kinds of config value: an integer with its default and bounds, a validated string, the secret
//! and its file.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use redis_module::configuration::{ConfigurationContext, ConfigurationValue};
use redis_module::{RedisError, RedisString};

use crate::sync::lock;

use super::{changed, SECRET_KEY};

/// An integer config: its value and its default and bounds, named once for registration and code.
pub struct Int {
    pub value: AtomicI64,
    pub default: i64,
    pub min: i64,
    pub max: i64,
}

impl Int {
    pub const fn new(default: i64, min: i64, max: i64) -> Self {
        Int {
            value: AtomicI64::new(default),
            default,
            min,
            max,
        }
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A string config with its default and a validator.
pub struct Checked {
    value: Mutex<String>,
    pub default: &'static str,
    check: fn(&str) -> Result<(), String>,
}

impl Checked {
    pub const fn new(default: &'static str, check: fn(&str) -> Result<(), String>) -> Self {
        Checked {
            value: Mutex::new(String::new()),
            default,
            check,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, String> {
        lock(&self.value)
    }

    pub fn get(&self) -> String {
        self.lock().clone()
    }
}

impl ConfigurationValue<RedisString> for Checked {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), self.lock().as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let text = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?;
        let text = text.trim();
        (self.check)(text).map_err(RedisError::String)?;
        *self.lock() = text.to_string();
        changed();
        Ok(())
    }
}

/// A secret: settable, never shown back (CONFIG GET answers an empty string). Empty means not set, so a
/// `flowarchive.secret-key ""` line in a config file (as CONFIG REWRITE used to write) changes nothing.
pub struct Secret(pub(super) Mutex<String>);

impl Secret {
    fn lock(&self) -> MutexGuard<'_, String> {
        lock(&self.0)
    }

    pub fn get(&self) -> String {
        self.lock().clone()
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

impl ConfigurationValue<RedisString> for Secret {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), b"")
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let text = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?;
        *self.lock() = text.to_string();
        changed();
        Ok(())
    }
}

/// Largest secret-key-file read: a secret key is a few dozen bytes.
pub(super) const MAX_SECRET_FILE: u64 = 4096;

/// `secret-key-file`: a path, shown by CONFIG GET and kept by CONFIG REWRITE, and the secret read from
/// it, kept in memory only. The file is read when the config is set (at load or by CONFIG SET); a file
/// that cannot be read or holds no secret is refused and the old path and secret stay. Of secret-key and
/// secret-key-file, the one set last is used.
pub struct SecretFile(pub(super) Mutex<(String, String)>);

impl SecretFile {
    fn lock(&self) -> MutexGuard<'_, (String, String)> {
        lock(&self.0)
    }

    /// The secret read from the file; empty when no file is set.
    pub fn secret(&self) -> String {
        self.lock().1.clone()
    }
}

impl ConfigurationValue<RedisString> for SecretFile {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), self.lock().0.as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let path = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?
            .trim();
        if path.is_empty() {
            *self.lock() = Default::default();
            changed();
            return Ok(());
        }
        let secret = read_secret_file(path).map_err(RedisError::String)?;
        *self.lock() = (path.to_string(), secret);
        // The server skips a CONFIG SET of secret-key to "" (CONFIG GET already answers ""), so setting
        // a file is how a runtime secret-key is dropped.
        SECRET_KEY.clear();
        changed();
        Ok(())
    }
}

/// The secret in `path`, trimmed. Errors name the path (cut short), never the content.
pub(super) fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let shown: String = path.chars().take(200).collect();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("secret-key-file {shown:?} cannot be read: {e}"))?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "secret-key-file {shown:?} is larger than {MAX_SECRET_FILE} bytes"
        ));
    }
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret-key-file {shown:?} is empty"));
    }
    Ok(secret.to_string())
}
