//! A second module whose one command, `FOREIGN.HELLO`, is in the ACL category `@flowarchive`: the
//! module tests/configs.rs loads beside flowarchive to show that flowarchive refuses to share its
//! category (`+@flowarchive` would grant this command too).
//!
//! Loaded with no argument it adds the category itself, as a module that chose the same name would;
//! loaded with `join` it adds nothing and only puts its command in a category the server has already
//! (one an earlier load of flowarchive left behind).

use std::ffi::CString;
use std::os::raw::c_int;

use redis_module::alloc::RedisAlloc;
use redis_module::{raw, redis_module, Context, RedisResult, RedisString, RedisValue, Status};

const CATEGORY: &str = "flowarchive";

fn hello(_: &Context, _: Vec<RedisString>) -> RedisResult {
    Ok(RedisValue::SimpleStringStatic("hello"))
}

/// Adds the category (unless told to `join` an existing one) and puts `foreign.hello` in it.
fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let join = args.iter().any(|a| a.to_string_lossy() == "join");
    let category = CString::new(CATEGORY).unwrap();
    let name = CString::new("foreign.hello").unwrap();
    // SAFETY: OnLoad, with the module's live context; the C strings outlive every call.
    let done = unsafe {
        let (Some(add), Some(set), Some(get)) = (
            raw::RedisModule_AddACLCategory,
            raw::RedisModule_SetCommandACLCategories,
            raw::RedisModule_GetCommand,
        ) else {
            ctx.log_warning("foreign_category: this server has no module ACL categories");
            return Status::Err;
        };
        (join || add(ctx.ctx, category.as_ptr()) == raw::REDISMODULE_OK as c_int)
            && set(get(ctx.ctx, name.as_ptr()), category.as_ptr()) == raw::REDISMODULE_OK as c_int
    };
    if !done {
        ctx.log_warning("foreign_category: could not put FOREIGN.HELLO in @flowarchive");
        return Status::Err;
    }
    Status::Ok
}

redis_module! {
    name: "foreigncat",
    version: 1,
    allocator: (RedisAlloc, RedisAlloc),
    data_types: [],
    init: init,
    commands: [
        ["foreign.hello", hello, "readonly", 0, 0, 0, ""],
    ],
}
