//! flowarchive: archives terminal workflow flows from Valkey to S3-compatible storage.
//!
//! Data flow: capture (read keys) → encode (JSONL + gzip + sha256) → store (S3, presigned) →
//! commit (verify unchanged, index, delete, replicate). This file only registers the module.

mod acl;
mod archive;
mod cache;
mod capture;
mod clock;
mod cluster;
mod commands;
mod commit;
mod configs;
mod decode;
mod encode;
mod errors;
mod fetch;
mod layout;
mod live;
mod log;
mod mainthread;
mod metrics;
mod pool;
mod select;
mod server;
mod store;
mod sweep;
mod watch;

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::raw::c_void;

use redis_module::alloc::RedisAlloc;
use std::sync::atomic::{AtomicI64, Ordering};

use redis_module::configuration::{ConfigurationContext, ConfigurationFlags};
use redis_module::{
    raw, redis_module, AclCategory, Context, ContextFlags, NotifyEvent, RedisString, Status,
};

/// The server's allocator inside the server (so memory shows in INFO memory), the system's in unit tests.
struct ModuleAlloc;

unsafe impl GlobalAlloc for ModuleAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if (*std::ptr::addr_of!(raw::RedisModule_Alloc)).is_some() {
            RedisAlloc.alloc(layout)
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if (*std::ptr::addr_of!(raw::RedisModule_Free)).is_some() {
            RedisAlloc.dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }
}

/// Valkey 9 refuses atomic slot migration unless a module declares it handles it.
const HANDLE_ATOMIC_SLOT_MIGRATION: i32 = 1 << 5;

fn on_key_event(ctx: &Context, _event: NotifyEvent, _name: &str, key: &[u8]) {
    watch::key_touched(server::selected_db(ctx), key);
}

/// The optional internal sweep timer (`flowarchive.sweep-interval`), for users without cron: sweeps
/// DB 0 on the primary once the interval has passed since the last timer sweep ended or started.
#[redis_module_macros::cron_event_handler]
fn on_cron(ctx: &Context, _hz: u64) {
    static LAST_TIMER_SWEEP_MS: AtomicI64 = AtomicI64::new(0);
    let interval = configs::sweep_interval_ms();
    let now = clock::now_ms();
    if interval <= 0
        || sweep::running()
        || now - LAST_TIMER_SWEEP_MS.load(Ordering::Relaxed) < interval
    {
        return;
    }
    if ctx.get_flags().contains(ContextFlags::SLAVE) {
        return;
    }
    LAST_TIMER_SWEEP_MS.store(now, Ordering::Relaxed);
    let opts = sweep::Options {
        limit: None,
        dry_run: false,
        caller: acl::Caller::Server,
    };
    if let Err(e) = sweep::start(ctx, 0, opts, || None) {
        log::warning(&format!("flowarchive: timer sweep not started: {e}"));
    }
}

#[redis_module_macros::flush_event_handler]
fn on_flush(_ctx: &Context, _sub: redis_module::server_events::FlushSubevent) {
    watch::everything_touched();
}

extern "C" fn on_swapdb(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut c_void,
) {
    watch::everything_touched();
}

fn on_cache_budget(_ctx: &ConfigurationContext, _name: &str, value: &'static AtomicI64) {
    fetch::resize_cache(value.load(Ordering::Relaxed).max(0) as usize);
}

/// MODULE UNLOAD: refused while anything is in flight (an archive between capture and commit would lose
/// its change watch); otherwise every module thread is joined first, so no module code runs once the
/// server unmaps the library.
fn deinit(_ctx: &Context) -> Status {
    if sweep::running() || !pool::all_idle() || !pool::shutdown_all() {
        log::warning(errors::UNLOAD_BUSY);
        return Status::Err;
    }
    mainthread::deinit();
    Status::Ok
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    if let Some(why) = configs::refused_load_args(args) {
        log::warning(&why);
        return Status::Err;
    }
    mainthread::init(ctx);
    // SAFETY: called once from OnLoad with the module's context.
    unsafe {
        if let Some(set_options) = raw::RedisModule_SetModuleOptions {
            set_options(ctx.ctx, HANDLE_ATOMIC_SLOT_MIGRATION);
        }
        if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
            let event = raw::RedisModuleEvent {
                id: raw::REDISMODULE_EVENT_SWAPDB,
                dataver: 1,
            };
            subscribe(ctx.ctx, event, Some(on_swapdb));
        }
    }
    Status::Ok
}

redis_module! {
    name: "flowarchive",
    version: 1,
    allocator: (ModuleAlloc, ModuleAlloc),
    data_types: [],
    acl_categories: ["flowarchive",],
    init: init,
    deinit: deinit,
    commands: [
        ["flowarchive.flow", commands::flow, "write deny-oom deny-script", 0, 0, 0, "", "flowarchive"],
        ["flowarchive.get", commands::get, "readonly", 0, 0, 0, "", "flowarchive"],
        ["flowarchive.sweep", commands::sweep, "write deny-oom deny-script", 0, 0, 0, "", "flowarchive"],
    ],
    event_handlers: [
        [@GENERIC @STRING @LIST @SET @HASH @ZSET @EXPIRED @EVICTED @STREAM @MODULE: on_key_event],
    ],
    configurations: [
        i64: [
            ["request-timeout-ms", &configs::REQUEST_TIMEOUT_MS, 30_000, 100, 3_600_000, ConfigurationFlags::DEFAULT, None],
            ["concurrency", &configs::CONCURRENCY, 4, 1, configs::CONCURRENCY_MAX, ConfigurationFlags::DEFAULT, None],
            ["batch-size", &configs::BATCH_SIZE, 100, 1, 100_000, ConfigurationFlags::DEFAULT, None],
            ["upload-bytes-per-sec", &configs::UPLOAD_BYTES_PER_SEC, 0, 0, 1 << 40, ConfigurationFlags::MEMORY, None],
            ["cache-bytes", &configs::CACHE_BYTES, 64 << 20, 0, 1 << 40, ConfigurationFlags::MEMORY, Some(Box::new(on_cache_budget))],
            ["read-max-bytes", &configs::READ_MAX_BYTES, 256 << 20, 64 << 10, 1 << 40, ConfigurationFlags::MEMORY, None],
        ],
        string: [
            ["endpoint", &configs::ENDPOINT, "", ConfigurationFlags::DEFAULT, None],
            ["region", &configs::REGION, "us-east-1", ConfigurationFlags::DEFAULT, None],
            ["bucket", &configs::BUCKET, "", ConfigurationFlags::DEFAULT, None],
            ["prefix", &configs::PREFIX, "", ConfigurationFlags::DEFAULT, None],
            ["read-allow", &configs::READ_ALLOW, "", ConfigurationFlags::DEFAULT, None],
            ["access-key", &configs::ACCESS_KEY, "", ConfigurationFlags::DEFAULT, None],
            ["secret-key", &configs::SECRET_KEY, "", ConfigurationFlags::SENSITIVE, None],
            ["secret-key-file", &configs::SECRET_KEY_FILE, "", ConfigurationFlags::DEFAULT, None],
            ["retention", &configs::RETENTION, "30d", ConfigurationFlags::DEFAULT, None],
            ["key-prefix", &configs::KEY_PREFIX, "argyll", ConfigurationFlags::DEFAULT, None],
            ["index-key", &configs::INDEX_KEY, "archived:flows", ConfigurationFlags::DEFAULT, None],
            ["events-key", &configs::EVENTS_KEY, "$prefix:flow:$id:events", ConfigurationFlags::DEFAULT, None],
            ["snapshot-key", &configs::SNAPSHOT_KEY, "$prefix:flow:$id:snapshot:val", ConfigurationFlags::DEFAULT, None],
            ["seq-key", &configs::SEQ_KEY, "$prefix:flow:$id:snapshot:seq", ConfigurationFlags::DEFAULT, None],
            ["labels-key", &configs::LABELS_KEY, "$prefix:flow:$id:idx:labels", ConfigurationFlags::DEFAULT, None],
            ["status-key", &configs::STATUS_KEY, "$prefix:idx:status", ConfigurationFlags::DEFAULT, None],
            ["status-set-key", &configs::STATUS_SET_KEY, "$prefix:idx:status:$status", ConfigurationFlags::DEFAULT, None],
            ["label-set-key", &configs::LABEL_SET_KEY, "$prefix:idx:label:$label:$value", ConfigurationFlags::DEFAULT, None],
            ["label-values-key", &configs::LABEL_VALUES_KEY, "$prefix:idx:label:$label", ConfigurationFlags::DEFAULT, None],
            ["flow-member", &configs::FLOW_MEMBER, "flow:$id", ConfigurationFlags::DEFAULT, None],
            ["sweep-interval", &configs::SWEEP_INTERVAL, "0s", ConfigurationFlags::DEFAULT, None],
            ["terminal-statuses", &configs::TERMINAL_STATUSES, "completed,failed", ConfigurationFlags::DEFAULT, None],
        ],
        bool: [
            ["path-style", &configs::PATH_STYLE, false, ConfigurationFlags::DEFAULT, None],
        ],
        enum: [
            ["verify", &configs::VERIFY, configs::VerifyMode::Head, ConfigurationFlags::DEFAULT, None],
        ],
        module_args_as_configuration: true,
    ]
}
