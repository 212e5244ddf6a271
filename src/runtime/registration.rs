//! The commands' registration on every supported server, including one without per-command ACL
//! categories.
//!
//! The commands are declared with the redis-module crate's `#[command]` (src/commands.rs), and the
//! crate registers them all in one step that first takes `RM_CreateCommand`, `RM_GetCommand`,
//! `RM_SetCommandInfo` and `RM_SetCommandACLCategories` from the module API and refuses the whole
//! load if one is missing, whether or not a command names a category. Redis 7.0 has no
//! `RM_SetCommandACLCategories` (added in 7.2; module-defined categories in 7.4, Valkey 8): a module
//! command there is in no ACL category at all, and the crate would not load commands the server can
//! run, key specs and all.
//!
//! So the module fills that one API slot itself before the server fills the API: a load-time
//! constructor (run when the library is mapped, before `RedisModule_OnLoad`) puts `not_on_this_server`
//! there. The module's init then asks the server for each API by name, and the server writes only the
//! ones it has (`RM_GetApi`: a name it does not know leaves the slot as it is). On Valkey 8 and 9 and
//! Redis 7.2 and later the server's function replaces the placeholder, which is never called; on Redis
//! 7.0 it stays, sets nothing and answers OK: the commands get their flags and key specs and no
//! category, as before, and `lacking` tells `init` to say so in the log.
//!
//! The placeholder is only ever called by the crate's registration: no other code of the module calls
//! `RM_SetCommandACLCategories` or asks whether the server has it.

use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::raw;

/// Set when the placeholder was asked for a category: the server has no per-command categories.
static ASKED: AtomicBool = AtomicBool::new(false);

/// `RM_SetCommandACLCategories` on a server without it: nothing to set, so nothing is set.
extern "C" fn not_on_this_server(
    _command: *mut raw::RedisModuleCommand,
    _: *const c_char,
) -> c_int {
    ASKED.store(true, Ordering::Relaxed);
    raw::REDISMODULE_OK as c_int
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

/// Whether the commands were registered without their ACL category, the server having none for
/// module commands (Redis 7.0).
pub fn lacking() -> bool {
    ASKED.load(Ordering::Relaxed)
}
