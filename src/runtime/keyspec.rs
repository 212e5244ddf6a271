//! Key specs of the module's commands, declared through `RM_SetCommandInfo` after the command is
//! created: the flow id of `FLOWARCHIVE.FLOW` and `GET` as a routing-only key (cluster routing), and the
//! ACL stand-in's keyword-led key groups. One place builds the raw structs and makes the call.
//!
//! Why not the redis-module crate's `#[command]` declarations: its registration needs
//! `RM_SetCommandACLCategories`, which Redis 7.0 lacks, and fails the whole load there.

use std::ffi::{c_int, CStr, CString};

use redis_module::{raw, Context};

const COMMAND_INFO_VERSION: raw::RedisModuleCommandInfoVersion =
    raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };

/// A key spec with every field zero: the start of each spec declared here (`declare` ends the array
/// with one).
pub fn blank() -> raw::RedisModuleCommandKeySpec {
    // SAFETY: all zeros is a valid key spec: its fields are integers, null pointers and unions of
    // those.
    unsafe { std::mem::zeroed() }
}

/// Declares `specs` and `summary` as the key specs of the command `name`, created before. Whether the
/// server took them.
pub fn declare(
    ctx: &Context,
    name: &str,
    specs: &[raw::RedisModuleCommandKeySpec],
    summary: Option<&CStr>,
) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // The server reads specs up to a zeroed one.
    let mut specs: Vec<raw::RedisModuleCommandKeySpec> = specs.to_vec();
    specs.push(blank());
    // SAFETY: OnLoad, after the command was created; `specs` ends with a zeroed entry; it, `name` and
    // `summary` outlive the call, and the server copies what it keeps. All zeros is a valid command
    // info, filled below.
    unsafe {
        let (Some(get), Some(set)) = (raw::RedisModule_GetCommand, raw::RedisModule_SetCommandInfo)
        else {
            return false;
        };
        let command = get(ctx.ctx, name.as_ptr());
        if command.is_null() {
            return false;
        }
        let mut info: raw::RedisModuleCommandInfo = std::mem::zeroed();
        info.version = &COMMAND_INFO_VERSION;
        info.summary = summary.map_or(std::ptr::null(), CStr::as_ptr);
        info.key_specs = specs.as_mut_ptr();
        set(command, std::ptr::addr_of_mut!(info)) == raw::REDISMODULE_OK as c_int
    }
}
