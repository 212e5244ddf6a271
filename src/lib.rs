//! flowarchive: archives terminal workflow flows from Valkey to S3-compatible storage.
//!
//! The rooms follow the data: `archive` (begin → capture → encode → store → commit), `read` (live keys,
//! else fetch → decode → cache), `sweep` (select → uploaders → progress), `s3` (presigned requests),
//! `runtime` (the module inside the server: main-thread steps, change watch, server calls, pools, ACL,
//! cluster guard) and `ops` (configs, INFO, errors, logs). The commands are declared where they are
//! handled (`commands`, with the crate's `#[command]`, registered by `redis_module!` below) and put in
//! their ACL category by `init` (`runtime::registration`); this file registers configs and events, and
//! guards load and unload.

mod archive;
mod capped;
mod clock;
mod commands;
mod digest;
mod format;
mod index;
mod kinds;
mod layout;
mod ops;
mod read;
mod runtime;
mod s3;
mod slot;
mod sweep;
mod sync;
mod text;

use redis_module::configuration::ConfigurationFlags;
use redis_module::{raw, redis_module, Context, RedisString, Status};

use crate::ops::{configs, errors, log};
use crate::read::fetch;
use crate::runtime::{acl, cluster, heap, mainthread, pool, registration, watch};
use std::time::Duration;

/// Valkey turns a replica's async (`swapdb`) diskless load into a blocking disk load unless every
/// module declares it handles it: the module treats the swap at its end as a change to every flow in
/// flight (`watch::init`).
const HANDLE_REPL_ASYNC_LOAD: i32 = 1 << 2;
/// Valkey 9 refuses atomic slot migration unless a module declares it handles it.
const HANDLE_ATOMIC_SLOT_MIGRATION: i32 = 1 << 5;

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    if let Some(why) = configs::refused_load_args(args) {
        log::warning(&why);
        return Status::Err;
    }
    if let Err(why) = registration::categorize(ctx).and_then(|()| runtime::acl::init(ctx)) {
        log::warning(&format!("flowarchive: {why}"));
        return Status::Err;
    }
    mainthread::init(ctx);
    watch::init(ctx);
    cluster::init(ctx);
    // SAFETY: called once from OnLoad with the module's context.
    unsafe {
        if let Some(set_options) = raw::RedisModule_SetModuleOptions {
            set_options(
                ctx.ctx,
                HANDLE_REPL_ASYNC_LOAD | HANDLE_ATOMIC_SLOT_MIGRATION,
            );
        }
    }
    configs::follow_changes(ctx);
    configs::loaded();
    // Said at once, not only when the first archive is refused.
    let risks = [
        runtime::server::eviction_risk(ctx),
        configs::Settings::current().usable().err(),
    ];
    for why in risks.into_iter().flatten() {
        log::warning(&format!("flowarchive: {why}"));
    }
    Status::Ok
}

/// How long MODULE UNLOAD waits for the module's threads to end jobs that have answered their clients.
const UNLOAD_SETTLE: Duration = Duration::from_millis(200);

/// MODULE UNLOAD: refused while anything is in flight (an archive between capture and commit would lose
/// its change watch); otherwise every module thread is joined first, so no module code runs once the
/// server unmaps the library. The server itself refuses it while a client waits on the module.
fn deinit(_ctx: &Context) -> Status {
    // A turn still due (a one-shot or a timer of the module's pending, a worker's step taken by an
    // earlier turn before it asked for one) would call into the unloaded library.
    if sweep::running()
        || !pool::settle(UNLOAD_SETTLE)
        || mainthread::turn_due()
        || !pool::shutdown_all()
    {
        log::warning(errors::UNLOAD_BUSY);
        return Status::Err;
    }
    mainthread::deinit();
    acl::deinit();
    Status::Ok
}

redis_module! {
    name: "flowarchive",
    version: 1,
    allocator: (heap::ModuleHeap, heap::ModuleHeap),
    data_types: [],
    init: init,
    deinit: deinit,
    configurations: [
        i64: [
            ["request-timeout-ms", &configs::REQUEST_TIMEOUT_MS.value, configs::REQUEST_TIMEOUT_MS.default, configs::REQUEST_TIMEOUT_MS.min, configs::REQUEST_TIMEOUT_MS.max, ConfigurationFlags::DEFAULT, None],
            ["concurrency", &configs::CONCURRENCY.value, configs::CONCURRENCY.default, configs::CONCURRENCY.min, configs::CONCURRENCY.max, ConfigurationFlags::DEFAULT, None],
            ["batch-size", &configs::BATCH_SIZE.value, configs::BATCH_SIZE.default, configs::BATCH_SIZE.min, configs::BATCH_SIZE.max, ConfigurationFlags::DEFAULT, None],
            ["step-budget-us", &configs::STEP_BUDGET_US.value, configs::STEP_BUDGET_US.default, configs::STEP_BUDGET_US.min, configs::STEP_BUDGET_US.max, ConfigurationFlags::DEFAULT, None],
            ["upload-bytes-per-sec", &configs::UPLOAD_BYTES_PER_SEC.value, configs::UPLOAD_BYTES_PER_SEC.default, configs::UPLOAD_BYTES_PER_SEC.min, configs::UPLOAD_BYTES_PER_SEC.max, ConfigurationFlags::MEMORY, None],
            ["cache-bytes", &configs::CACHE_BYTES.value, configs::CACHE_BYTES.default, configs::CACHE_BYTES.min, configs::CACHE_BYTES.max, ConfigurationFlags::MEMORY, Some(Box::new(fetch::on_cache_budget))],
            ["object-name-max", &configs::OBJECT_NAME_MAX.value, configs::OBJECT_NAME_MAX.default, configs::OBJECT_NAME_MAX.min, configs::OBJECT_NAME_MAX.max, ConfigurationFlags::DEFAULT, None],
            ["read-max-bytes", &configs::READ_MAX_BYTES.value, configs::READ_MAX_BYTES.default, configs::READ_MAX_BYTES.min, configs::READ_MAX_BYTES.max, ConfigurationFlags::MEMORY, None],
            ["buffer-max-bytes", &configs::BUFFER_MAX_BYTES.value, configs::BUFFER_MAX_BYTES.default, configs::BUFFER_MAX_BYTES.min, configs::BUFFER_MAX_BYTES.max, ConfigurationFlags::MEMORY, None],
            ["retry-attempts", &configs::RETRY_ATTEMPTS.value, configs::RETRY_ATTEMPTS.default, configs::RETRY_ATTEMPTS.min, configs::RETRY_ATTEMPTS.max, ConfigurationFlags::DEFAULT, None],
            ["index-buckets", &configs::INDEX_BUCKETS.value, configs::INDEX_BUCKETS.default, configs::INDEX_BUCKETS.min, configs::INDEX_BUCKETS.max, ConfigurationFlags::DEFAULT, None],
            ["retry-max-ms", &configs::RETRY_MAX_MS.value, configs::RETRY_MAX_MS.default, configs::RETRY_MAX_MS.min, configs::RETRY_MAX_MS.max, ConfigurationFlags::DEFAULT, None],
        ],
        string: [
            ["endpoint", &configs::ENDPOINT, configs::ENDPOINT.default, ConfigurationFlags::DEFAULT, None],
            ["region", &configs::REGION, configs::REGION.default, ConfigurationFlags::DEFAULT, None],
            ["bucket", &configs::BUCKET, configs::BUCKET.default, ConfigurationFlags::DEFAULT, None],
            ["prefix", &configs::PREFIX, configs::PREFIX.default, ConfigurationFlags::DEFAULT, None],
            ["read-allow", &configs::READ_ALLOW, configs::READ_ALLOW.default, ConfigurationFlags::DEFAULT, None],
            ["access-key", &configs::ACCESS_KEY, configs::ACCESS_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["secret-key", &configs::SECRET_KEY, "", ConfigurationFlags::SENSITIVE, None],
            ["secret-key-file", &configs::SECRET_KEY_FILE, "", ConfigurationFlags::DEFAULT, None],
            ["retention", &configs::RETENTION, configs::RETENTION.default, ConfigurationFlags::DEFAULT, None],
            ["key-prefix", &configs::KEY_PREFIX, configs::KEY_PREFIX.default, ConfigurationFlags::DEFAULT, None],
            ["index-key", &configs::INDEX_KEY, configs::INDEX_KEY.default, ConfigurationFlags::DEFAULT, Some(Box::new(configs::on_index_key))],
            ["index-read-keys", &configs::INDEX_READ_KEYS, configs::INDEX_READ_KEYS.default, ConfigurationFlags::DEFAULT, None],
            ["events-key", &configs::EVENTS_KEY, configs::EVENTS_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["snapshot-key", &configs::SNAPSHOT_KEY, configs::SNAPSHOT_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["seq-key", &configs::SEQ_KEY, configs::SEQ_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["labels-key", &configs::LABELS_KEY, configs::LABELS_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["status-key", &configs::STATUS_KEY, configs::STATUS_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["status-set-key", &configs::STATUS_SET_KEY, configs::STATUS_SET_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["label-set-key", &configs::LABEL_SET_KEY, configs::LABEL_SET_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["label-values-key", &configs::LABEL_VALUES_KEY, configs::LABEL_VALUES_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["flow-member", &configs::FLOW_MEMBER, configs::FLOW_MEMBER.default, ConfigurationFlags::DEFAULT, None],
            ["lease-key", &configs::LEASE_KEY, configs::LEASE_KEY.default, ConfigurationFlags::DEFAULT, None],
            ["sweep-interval", &configs::SWEEP_INTERVAL, configs::SWEEP_INTERVAL.default, ConfigurationFlags::DEFAULT, None],
            ["terminal-statuses", &configs::TERMINAL_STATUSES, configs::TERMINAL_STATUSES.default, ConfigurationFlags::DEFAULT, None],
            ["credentials", &configs::CREDENTIALS, configs::CREDENTIALS.default, ConfigurationFlags::DEFAULT, None],
            ["tls-ca-file", &configs::TLS_CA_FILE, configs::TLS_CA_FILE.default, ConfigurationFlags::DEFAULT, None],
            ["sse", &configs::SSE, configs::SSE.default, ConfigurationFlags::DEFAULT, None],
            ["sse-kms-key-id", &configs::SSE_KMS_KEY_ID, configs::SSE_KMS_KEY_ID.default, ConfigurationFlags::DEFAULT, None],
            ["storage-class", &configs::STORAGE_CLASS, configs::STORAGE_CLASS.default, ConfigurationFlags::DEFAULT, None],
            ["checksum", &configs::CHECKSUM, configs::CHECKSUM.default, ConfigurationFlags::DEFAULT, None],
        ],
        bool: [
            ["path-style", &configs::PATH_STYLE, false, ConfigurationFlags::DEFAULT, None],
        ],
        enum: [
            ["verify", &configs::VERIFY, configs::VerifyMode::Auto, ConfigurationFlags::DEFAULT, None],
            ["index-format", &configs::INDEX_FORMAT, configs::IndexFormat::Hash, ConfigurationFlags::DEFAULT, None],
            ["state", &configs::STATE, layout::StateSource::Fold, ConfigurationFlags::DEFAULT, None],
        ],
        module_args_as_configuration: true,
    ]
}
