//! The module's one way to take a mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also after a holder panicked: every critical section in the module leaves its data valid
/// at each step (a panic is contained and the data stays consistent), so the poison flag carries no
/// information and refusing the lock would only turn one contained panic into many.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
