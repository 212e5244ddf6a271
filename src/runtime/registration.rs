//! The commands' ACL category, `@flowarchive`: added at load (or taken over, when an earlier load of
//! the module left it) and set on every command of the module, on every supported server.
//!
//! The commands are declared with the redis-module crate's `#[command]` (src/commands.rs) with their
//! flags, key specs and docs, and the crate registers them all before `init`. They declare no category
//! there: the crate would set it while it registers them, so the category would have to exist first,
//! and only `redis_module!`'s own `acl_categories` step adds one before that, refusing the load when
//! `RM_AddACLCategory` fails. It fails when the server has the category already, and a server never
//! drops a category a module added (Valkey 8 and 9, Redis 7.4: only a failed load takes back the
//! categories it added; `MODULE UNLOAD` removes the commands and leaves the category), so after
//! `MODULE UNLOAD flowarchive` the next `MODULE LOAD` in the same server would fail.
//!
//! So `categorize`, the first thing `init` does, adds the category itself. If the server has it
//! already and no command is in it (left by an earlier load: the unload took its commands away), it
//! is taken as the module's own; if commands of another module are in it, `+@flowarchive` would grant
//! them too, and the module does not load. Then every command of the module (`flowarchive.*`) is put
//! in it. `runtime::acl` relies on all four, the ACL stand-in included, being in this one category and
//! in no other. After a load that set command categories the server recomputes every ACL user's
//! command rights from its rules, so a user given `+@flowarchive` before an unload has the reloaded
//! commands too.
//!
//! A server without `RM_AddACLCategory` (Redis 7.0; Redis and Valkey 7.2, which can put a module
//! command only in a category of their own) cannot have `@flowarchive`: the commands are in no ACL
//! category there, and the load says so in the log.
//!
//! The crate also takes `RM_SetCommandACLCategories` from the module API before it registers any
//! command, and refuses the whole load without it, though it calls it only for a command that declares
//! a category (none does). Redis 7.0 has no such API (added in 7.2). So a load-time constructor (run
//! when the library is mapped, before `RedisModule_OnLoad`) puts `not_on_this_server` in that slot. The
//! module's init then asks the server for each API by name, and the server writes only the ones it has
//! (`RM_GetApi`: a name it does not know leaves the slot as it is): on Redis 7.2 and later and Valkey
//! the server's function replaces the placeholder; on Redis 7.0 it stays and nothing calls it.

use std::ffi::CString;
use std::os::raw::{c_char, c_int};

use redis_module::{raw, Context};

use crate::ops::{errors, log};
use crate::runtime::server::{call, strings};

/// The module's ACL category, every command of the module's and no other command's.
const CATEGORY: &str = "flowarchive";

/// The commands of the module: each is named `flowarchive.<command>`.
const COMMANDS: &str = "flowarchive.*";

/// At load (OnLoad, after the crate registered the commands): adds `@flowarchive`, or takes over the
/// one an earlier load left, and puts every command of the module in it; on a server without module
/// categories, only says so in the log. An error refuses the load.
pub fn categorize(ctx: &Context) -> Result<(), String> {
    // SAFETY: copies of the API slots, which the server filled in OnLoad's `RedisModule_Init`, before
    // this, on this thread; nothing writes them after. Every server with RM_AddACLCategory (Redis 7.4,
    // Valkey 8) has RM_SetCommandACLCategories (7.2), so that slot holds the server's function then,
    // not the placeholder.
    let slots = unsafe {
        (
            raw::RedisModule_AddACLCategory,
            raw::RedisModule_SetCommandACLCategories,
            raw::RedisModule_GetCommand,
        )
    };
    let (Some(add), Some(set), Some(get_command)) = slots else {
        log::warning(errors::NO_COMMAND_CATEGORIES);
        return Ok(());
    };
    let category = c_string(CATEGORY)?;
    // SAFETY: OnLoad, with the module's live context; the name is a C string that outlives the call.
    let added = unsafe { add(ctx.ctx, category.as_ptr()) } == raw::REDISMODULE_OK as c_int;
    if !added {
        take_over(ctx)?;
    }
    let listed = call(
        ctx,
        "COMMAND",
        &[b"LIST", b"FILTERBY", b"PATTERN", COMMANDS.as_bytes()],
    )
    .map_err(|e| format!("cannot list its commands: {e}"))?;
    for name in strings(&listed) {
        let name = c_string(&String::from_utf8_lossy(&name))?;
        // SAFETY: OnLoad, with the module's live context; both strings outlive the calls. GetCommand
        // answers null for a command that is not this module's (a server's or another module's
        // `flowarchive.*`), which is left alone; a command it answers is this module's, and
        // SetCommandACLCategories only reads the category string.
        let rc = unsafe {
            let command = get_command(ctx.ctx, name.as_ptr());
            if command.is_null() {
                continue;
            }
            set(command, category.as_ptr())
        };
        if rc != raw::REDISMODULE_OK as c_int {
            return Err(format!(
                "the server would not put {} in the ACL category {CATEGORY}",
                name.to_string_lossy().to_uppercase()
            ));
        }
    }
    Ok(())
}

/// The server has the category already. An earlier load of the module left it (the server keeps a
/// module's category after `MODULE UNLOAD`), or another module added it: it is taken over if no
/// command is in it (this module's commands are in none yet).
fn take_over(ctx: &Context) -> Result<(), String> {
    if call(ctx, "ACL", &[b"CAT", CATEGORY.as_bytes()]).is_err() {
        return Err(format!(
            "the server would not add the ACL category {CATEGORY} (it holds at most 64 categories)"
        ));
    }
    let holders = call(
        ctx,
        "COMMAND",
        &[b"LIST", b"FILTERBY", b"ACLCAT", CATEGORY.as_bytes()],
    )
    .map_err(|e| format!("cannot list the commands of the ACL category {CATEGORY}: {e}"))?;
    let holders: Vec<String> = strings(&holders)
        .iter()
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    if !holders.is_empty() {
        return Err(format!(
            "the ACL category {CATEGORY} exists and holds commands of another module ({}): +@{CATEGORY} would grant them with the FLOWARCHIVE commands",
            holders.join(" ")
        ));
    }
    log::notice(&format!(
        "flowarchive: the ACL category {CATEGORY} is left from an earlier load; the commands are in it again"
    ));
    Ok(())
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"))
}

/// `RM_SetCommandACLCategories` on a server without it: never called (see the module docs), and it
/// sets nothing if it is.
extern "C" fn not_on_this_server(
    _command: *mut raw::RedisModuleCommand,
    _: *const c_char,
) -> c_int {
    raw::REDISMODULE_ERR as c_int
}

/// Run by the dynamic loader when it maps the library, before `RedisModule_OnLoad`. It allocates
/// nothing (the module's allocator is the server's, not there yet) and only writes one pointer.
extern "C" fn before_load() {
    // SAFETY: the slot is the C global `RedisModule_SetCommandACLCategories` of this library (an
    // `Option` of the function type, whose `None` is the null the C side starts with). Nothing else
    // reads or writes it while the loader runs this: the server calls into the module only after
    // `dlopen` returns. The value written has the slot's exact type, and the function lives as long as
    // the library.
    unsafe {
        let slot = std::ptr::addr_of_mut!(raw::RedisModule_SetCommandACLCategories);
        if slot.read().is_none() {
            slot.write(Some(not_on_this_server));
        }
    }
}

/// The entry the dynamic loader calls (ELF `.init_array`; Mach-O `__mod_init_func`).
#[used]
#[cfg_attr(target_os = "macos", link_section = "__DATA,__mod_init_func")]
#[cfg_attr(not(target_os = "macos"), link_section = ".init_array")]
static BEFORE_LOAD: extern "C" fn() = before_load;
