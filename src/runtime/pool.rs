//! Bounded worker pools.
//!
//! Every thread the module runs work on comes from a `Pool`: at most `max_threads` threads, started
//! lazily and ended after a short idle spell, and at most `max_queued` jobs waiting for one. A job that
//! does not fit is handed back to the caller, who answers a clear "busy" error instead of starting a
//! thread per request. `shutdown` joins every thread of the pool, so that `MODULE UNLOAD` can prove no
//! module code still runs once the library is unmapped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::ops::log;
use crate::sync::lock;
use std::thread::JoinHandle;
use std::time::Duration;

pub type Job = Box<dyn FnOnce() + Send>;

/// How long a thread waits for work before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(2);

struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    running: usize,
    handles: Vec<JoinHandle<()>>,
    stopping: bool,
}

pub struct Pool {
    name: &'static str,
    max_threads: usize,
    max_queued: usize,
    state: Mutex<State>,
    wake: Condvar,
    registered: AtomicBool,
}

/// Every pool that has started a thread, for `all_idle` and `shutdown_all`.
static POOLS: Mutex<Vec<&'static Pool>> = Mutex::new(Vec::new());

/// True when no pool has a job queued or running. Called on the main thread (MODULE UNLOAD): a pool
/// whose state another thread holds right now (one of the upload pool's may be in the idle scheduling
/// class, and unscheduled) counts as busy rather than be waited for.
fn all_idle() -> bool {
    lock(&POOLS).iter().all(|p| p.busy_now() == Some(0))
}

/// Waits up to `within` for every pool to be idle; `false` if one is still busy then. MODULE UNLOAD
/// asks this: a job that has answered its client still ends on its thread after the client has read
/// the answer (and may send the unload), a few microseconds of work that a loaded machine may not
/// schedule at once. Work still in flight keeps its pool busy past `within`, and the unload is refused.
pub fn settle(within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if all_idle() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Joins the threads of every pool; `false` if one of them got work meanwhile.
pub fn shutdown_all() -> bool {
    lock(&POOLS).iter().all(|p| p.shutdown())
}

/// Puts the calling thread in the idle scheduling class (SCHED_IDLE): any other runnable thread, the
/// server's event loop above all, preempts it at once, so compression, hashing and uploads only use CPU
/// nobody else wants. Linux applies this per thread; no privilege is needed to lower one's own class.
pub fn enter_idle_class() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0) that only reads `param`, a valid
    // sched_param for the call; failure only leaves the class unchanged.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

impl Pool {
    pub const fn new(name: &'static str, max_threads: usize, max_queued: usize) -> Pool {
        Pool {
            name,
            max_threads,
            max_queued,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
                running: 0,
                handles: Vec::new(),
                stopping: false,
            }),
            wake: Condvar::new(),
            registered: AtomicBool::new(false),
        }
    }

    /// Runs `job` on a pool thread. Hands the job back when the queue is full, the pool is shutting
    /// down, or no thread can be started.
    pub fn submit(&'static self, job: Job) -> Result<(), Job> {
        let mut st = lock(&self.state);
        if st.stopping || st.queue.len() >= self.max_queued {
            return Err(job);
        }
        st.handles.retain(|h| !h.is_finished());
        st.queue.push_back(job);
        if st.idle > st.queue.len() - 1 {
            self.wake.notify_one();
            return Ok(());
        }
        if st.threads < self.max_threads {
            if !self.registered.swap(true, Ordering::SeqCst) {
                lock(&POOLS).push(self);
            }
            let spawned = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || self.work());
            match spawned {
                Ok(handle) => {
                    st.threads += 1;
                    st.handles.push(handle);
                }
                // No new thread: a running one takes the job later; with none at all, refuse it.
                Err(_) if st.threads == 0 => return st.queue.pop_back().map_or(Ok(()), Err),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn work(&'static self) {
        let mut st = lock(&self.state);
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                let _ = log::contained(self.name, job);
                st = lock(&self.state);
                st.running -= 1;
                continue;
            }
            if st.stopping {
                break;
            }
            st.idle += 1;
            let (next, timeout) = self
                .wake
                .wait_timeout(st, IDLE_EXIT)
                .unwrap_or_else(|p| p.into_inner());
            st = next;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                break;
            }
        }
        st.threads -= 1;
    }

    /// Jobs queued or running, if the pool's state is free to read now.
    fn busy_now(&self) -> Option<usize> {
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(st.queue.len() + st.running)
    }

    /// Ends and joins every thread, if no job is queued or running; `false` (nothing stopped) otherwise.
    /// The pool starts threads again on the next `submit`.
    pub fn shutdown(&self) -> bool {
        let handles = {
            let mut st = lock(&self.state);
            if !st.queue.is_empty() || st.running > 0 {
                return false;
            }
            st.stopping = true;
            std::mem::take(&mut st.handles)
        };
        self.wake.notify_all();
        for h in handles {
            let _ = h.join();
        }
        lock(&self.state).stopping = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;

    static POOL: Pool = Pool::new("test-pool", 2, 3);

    /// Waits until the pool's jobs have returned (a job's last effect comes just before that).
    fn settle() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while POOL.busy_now() != Some(0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn bounds_threads_and_queue_and_joins_on_shutdown() {
        static RAN: AtomicUsize = AtomicUsize::new(0);
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = std::sync::Arc::new(Mutex::new(release_rx));
        let mut accepted = 0;
        let mut refused = 0;
        for _ in 0..10 {
            let rx = release_rx.clone();
            let job: Job = Box::new(move || {
                let _ = lock(&rx).recv();
                RAN.fetch_add(1, Ordering::SeqCst);
            });
            match POOL.submit(job) {
                Ok(()) => accepted += 1,
                Err(_) => refused += 1,
            }
        }
        // Two threads take a job each (one of them may still be starting), three wait.
        assert!((3..=5).contains(&accepted), "accepted {accepted}");
        assert_eq!(accepted + refused, 10);
        assert!(lock(&POOL.state).threads <= 2);
        assert!(!POOL.shutdown(), "jobs are in flight");
        for _ in 0..accepted {
            release_tx.send(()).unwrap();
        }
        settle();
        assert_eq!(RAN.load(Ordering::SeqCst), accepted);
        assert!(POOL.shutdown());
        assert_eq!(lock(&POOL.state).threads, 0, "every thread joined");
        let (tx, rx) = channel();
        POOL.submit(Box::new(move || tx.send(7).unwrap()))
            .ok()
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
        settle();
        assert!(POOL.shutdown());
    }

    /// `settle` waits for a job that ends within its time, and not for one that does not.
    #[test]
    fn settle_waits_only_for_jobs_that_end_in_time() {
        static SETTLING: Pool = Pool::new("test-settle", 1, 1);
        let (release_tx, release_rx) = channel::<()>();
        SETTLING
            .submit(Box::new(move || {
                let _ = release_rx.recv();
            }))
            .ok()
            .unwrap();
        assert!(
            !super::settle(Duration::from_millis(50)),
            "a job still runs"
        );
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            release_tx.send(()).unwrap();
        });
        assert!(super::settle(Duration::from_secs(10)), "the job ended");
        ender.join().unwrap();
        assert!(SETTLING.shutdown());
    }
}
