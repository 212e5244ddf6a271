//! The module's own heap: the system allocator, counted.
//!
//! Module memory is kept out of the server's accounting on purpose. Allocated through the server
//! (`RedisModule_Alloc`), it counted toward `maxmemory`: archived reads a restricted user may run, a
//! sweep's buffers or the read cache made the server evict users' keys (and the archive index) or
//! refuse their writes with OOM. With the system allocator the server's `used_memory` holds only its
//! own data; what the module holds is bounded by its configs (`cache-bytes`, `read-max-bytes` per read
//! or capture, the pools' sizes) and shown in `INFO flowarchive` as `heap_bytes` (and its peak).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::ops::info::{named, Fields, INFO_FIELDS};

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes the module holds.
pub struct ModuleHeap;

// SAFETY: every call is passed to the system allocator unchanged; the counters are plain atomics.
unsafe impl GlobalAlloc for ModuleHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            held(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above (the system allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        held(-(layout.size() as isize));
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            held(layout.size() as isize);
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`, as `GlobalAlloc::realloc` requires.
        let out = unsafe { System.realloc(ptr, layout, new_size) };
        if !out.is_null() {
            held(new_size as isize - layout.size() as isize);
        }
        out
    }
}

fn held(delta: isize) {
    if delta >= 0 {
        let now = HELD.fetch_add(delta as usize, Ordering::Relaxed) + delta as usize;
        PEAK.fetch_max(now, Ordering::Relaxed);
    } else {
        HELD.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

fn fields() -> Vec<(String, i64)> {
    named([
        ("heap_bytes", HELD.load(Ordering::Relaxed) as i64),
        ("heap_bytes_peak", PEAK.load(Ordering::Relaxed) as i64),
    ])
}

#[linkme::distributed_slice(INFO_FIELDS)]
static HEAP_FIELDS: Fields = fields;
