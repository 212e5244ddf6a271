//! What each string config must be: its check, run when it is set (a bad value is refused with the
//! reason and the old value stays), and the load arguments refused outright.

use redis_module::configuration::EnumConfigurationValue;
use redis_module::{RedisError, RedisString};

use crate::layout::{self, StateSource};
use crate::s3::credentials::Source;
use crate::s3::{self, Checksum, Sse, VerifyMode};

use super::values::read_secret_file;
use super::SECRET_KEY_FILE;

/// Why the module must not load with these arguments, if it must not: a `secret-key` argument would
/// be shown by MODULE LIST and written in clear by CONFIG REWRITE, and a `secret-key-file` argument
/// whose file could not be read leaves the module without its secret (the server loads a module even
/// when one of its configs is refused).
pub fn refused_load_args(args: &[RedisString]) -> Option<String> {
    if args.iter().any(|a| a.as_slice() == b"secret-key") {
        return Some(
            "flowarchive: the secret-key load argument is refused (MODULE LIST and CONFIG REWRITE \
             would show it): pass the secret with secret-key-file <path>, the AWS_* environment, or \
             CONFIG SET flowarchive.secret-key at runtime"
                .into(),
        );
    }
    let path = args
        .iter()
        .skip_while(|a| a.as_slice() != b"secret-key-file")
        .nth(1)?
        .try_as_str()
        .ok()?
        .trim();
    if path.is_empty() || !SECRET_KEY_FILE.secret().is_empty() {
        return None;
    }
    let why = read_secret_file(path).err()?;
    Some(format!("flowarchive: not loaded: {why}"))
}

pub(super) fn any(_: &str) -> Result<(), String> {
    Ok(())
}

pub(super) fn endpoint(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    let url = url::Url::parse(v).map_err(|e| format!("endpoint is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("endpoint must be an http:// or https:// URL with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("endpoint must not carry a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "endpoint must not carry credentials (user:password@); use access-key and secret-key-file"
                .into(),
        );
    }
    Ok(())
}

pub(super) fn region(v: &str) -> Result<(), String> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
        return Err("region must be non-empty letters, digits and '-'".into());
    }
    Ok(())
}

pub fn bucket(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || ((3..=63).contains(&v.len())
            && v.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err("bucket must be 3-63 characters of a-z, 0-9, '-' and '.'".into())
    }
}

pub fn object_prefix(v: &str) -> Result<(), String> {
    if v.starts_with('/') || v.ends_with('/') || v.contains("//") {
        return Err("prefix must not start or end with '/' nor contain '//'".into());
    }
    if v.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("prefix must not contain '.' or '..' segments".into());
    }
    if v.bytes().any(|c| c.is_ascii_control()) || v.len() > 512 {
        return Err("prefix must be at most 512 printable characters".into());
    }
    Ok(())
}

/// A place archives may be read from: a bucket and an object key prefix (possibly empty).
#[derive(Debug, PartialEq)]
pub struct Root {
    pub bucket: String,
    pub prefix: String,
}

/// Parses `flowarchive.read-allow`: space-separated `s3://bucket[/prefix]` roots.
pub fn parse_roots(value: &str) -> Result<Vec<Root>, String> {
    value
        .split_whitespace()
        .map(|root| {
            let rest = root.strip_prefix("s3://").ok_or_else(|| {
                format!("read-allow root {root:?} must look like s3://bucket[/prefix]")
            })?;
            let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if name.is_empty() {
                return Err(format!("read-allow root {root:?} names no bucket"));
            }
            bucket(name).map_err(|e| format!("read-allow root {root:?}: {e}"))?;
            object_prefix(prefix).map_err(|e| format!("read-allow root {root:?}: {e}"))?;
            Ok(Root {
                bucket: name.to_string(),
                prefix: prefix.to_string(),
            })
        })
        .collect()
}

/// The CONFIG SET check of `flowarchive.read-allow`.
pub fn check_read_allow(value: &str) -> Result<(), String> {
    parse_roots(value).map(|_| ())
}

/// `credentials`: `auto` or one source of the chain.
pub(super) fn credentials(v: &str) -> Result<(), String> {
    Source::parse_pin(v).map(|_| ())
}

/// `tls-ca-file`: read now, so a file that cannot serve is refused with the reason.
pub(super) fn tls_ca_file(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    s3::tls::read_ca_file(v).map(|_| ())
}

pub(super) fn sse(v: &str) -> Result<(), String> {
    Sse::parse(v).map(|_| ())
}

pub(super) fn sse_kms_key_id(v: &str) -> Result<(), String> {
    if v.len() > 2048 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "sse-kms-key-id must be a KMS key id, ARN or alias (printable, no spaces)".into(),
        );
    }
    Ok(())
}

/// `storage-class`: the classes whose objects FLOWARCHIVE.GET can read at once.
pub(super) fn storage_class(v: &str) -> Result<(), String> {
    const READABLE: [&str; 7] = [
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
        "REDUCED_REDUNDANCY",
        "EXPRESS_ONEZONE",
    ];
    match v {
        "" => Ok(()),
        v if READABLE.contains(&v) => Ok(()),
        "GLACIER" | "DEEP_ARCHIVE" => Err(format!(
            "storage-class {v} is refused: its objects need a restore before FLOWARCHIVE.GET can read them"
        )),
        _ => Err(format!(
            "storage-class must be empty or one of {}",
            READABLE.join(", ")
        )),
    }
}

pub(super) fn checksum(v: &str) -> Result<(), String> {
    Checksum::parse(v).map(|_| ())
}

/// Declares an enum config once: the enum, its conversions for the server (the choices numbered 0, 1,
/// ... in the order listed), the names `CONFIG GET` shows, and the refusal of any other value, all
/// from one list. The `impl` form gives an enum declared elsewhere (a room below this one) the same
/// conversions; its list must name every variant (the numbering is an exhaustive match).
macro_rules! choice_config {
    (
        $(#[$meta:meta])* $vis:vis enum $name:ident ($config:literal) {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        choice_config! { impl $name ($config) { $($variant => $text,)+ } }
    };
    (impl $name:ident ($config:literal) { $($variant:ident => $text:literal,)+ }) => {
        impl From<$name> for i32 {
            fn from(v: $name) -> i32 {
                // The position of each choice in the list.
                enum Position {
                    $($variant,)+
                }
                match v {
                    $($name::$variant => Position::$variant as i32,)+
                }
            }
        }

        impl TryFrom<i32> for $name {
            type Error = RedisError;
            fn try_from(v: i32) -> Result<Self, RedisError> {
                [$($name::$variant,)+]
                    .into_iter()
                    .find(|c| i32::from(*c) == v)
                    .ok_or_else(|| RedisError::String(choices_refused($config, &[$($text,)+])))
            }
        }

        impl EnumConfigurationValue for $name {
            fn get_options(&self) -> (Vec<String>, Vec<i32>) {
                (
                    vec![$($text.into(),)+],
                    vec![$(i32::from($name::$variant),)+],
                )
            }
        }
    };
}

/// The refusal of a value that is none of a choice config's `names`: `<config> must be a, b or c`.
pub(super) fn choices_refused(config: &str, names: &[&str]) -> String {
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("{config} must be {} or {last}", rest.join(", "))
        }
        _ => format!("{config} must be {}", names.join(", ")),
    }
}

choice_config! {
    impl VerifyMode ("verify") { Head => "head", PutResponse => "put-response", Auto => "auto", }
}

choice_config! {
    /// How the archive index stores its entries (`flowarchive.index-format`, see `index`).
    pub enum IndexFormat ("index-format") {
        /// One hash, id -> `s3://bucket/key` (per slot on a cluster): the design's index.
        Hash => "hash",
        /// Many small hashes, id -> generation and folder number (docs/FORMAT.md).
        Compact => "compact",
    }
}

choice_config! { impl StateSource ("state") { Fold => "fold", Snapshot => "snapshot", } }

pub(super) fn statuses(v: &str) -> Result<(), String> {
    if v.split([',', ' ']).any(|s| !s.is_empty()) {
        Ok(())
    } else {
        Err("terminal-statuses needs at least one status".into())
    }
}

/// Parses `30d`, `12h`, `15m`, `90s`, `500ms` into milliseconds.
pub fn parse_duration_ms(v: &str) -> Result<i64, String> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("'{v}' is not a duration like 30d, 12h, 15m, 90s or 500ms"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{v}' needs a unit: ms, s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|ms| *ms <= 100 * 365 * 86_400_000)
        .ok_or_else(|| format!("'{v}' is too long (at most 100 years)"))
}

pub(super) fn duration(v: &str) -> Result<(), String> {
    parse_duration_ms(v).map(|_| ())
}

pub(super) fn key_prefix(v: &str) -> Result<(), String> {
    if v.contains('$') {
        return Err("key-prefix must not contain '$'".into());
    }
    if v.len() > layout::MAX_TEMPLATE {
        return Err(format!(
            "key-prefix is longer than {} bytes",
            layout::MAX_TEMPLATE
        ));
    }
    Ok(())
}

macro_rules! template_check {
    ($name:ident, [$($allowed:literal),*], [$($required:literal),*], $optional:literal) => {
        pub(super) fn $name(v: &str) -> Result<(), String> {
            if v.is_empty() {
                return if $optional { Ok(()) } else { Err("must not be empty".into()) };
            }
            layout::validate(v, &[$($allowed),*], &[$($required),*])
        }
    };
}

template_check!(flow_key, ["prefix", "id"], ["id"], false);
template_check!(opt_flow_key, ["prefix", "id"], ["id"], true);
template_check!(member, ["prefix", "id"], ["id"], false);
template_check!(index_name, ["prefix", "id"], [], false);
template_check!(opt_shared_key, ["prefix"], [], true);
template_check!(status_set, ["prefix", "status"], ["status"], true);
template_check!(
    label_set,
    ["prefix", "label", "value"],
    ["label", "value"],
    true
);
template_check!(label_values, ["prefix", "label"], ["label"], true);
