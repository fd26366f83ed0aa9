//! The background cleaner thread that drains the victim repository.

use crate::backing::Backing;
use crate::stack::CacheStack;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Entries drained per pass before checking for a stop request.
const BATCH: usize = 64;

/// Wake-up signal from spilling I/O threads to cleaners.
pub(crate) struct Wake {
    /// Set by a spill; an atomic so a spill that finds it already set costs
    /// one load and no lock.
    pending: AtomicBool,
    /// Only for the condvar hand-off.
    lock: Mutex<()>,
    cv: Condvar,
}

impl Wake {
    pub(crate) fn new() -> Wake {
        Wake {
            pending: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Something entered the victim repository.
    pub(crate) fn notify(&self) {
        // Already pending (the common case while spills keep coming): a
        // load, not a read-modify-write of a line the cleaner also writes.
        if self.pending.load(Ordering::Acquire) {
            return;
        }
        if !self.pending.swap(true, Ordering::AcqRel) {
            // Taking the lock orders this notify after a cleaner's check of
            // `pending`, so the wake-up can't fall between its check and wait.
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// Sleeps until notified, stopped, or `timeout` passes.
    fn wait(&self, timeout: Duration, stop: &AtomicBool) {
        let mut g = self.lock.lock();
        if !self.pending.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            self.cv.wait_for(&mut g, timeout);
        }
        self.pending.store(false, Ordering::Release);
    }

    fn stop(&self, stop: &AtomicBool) {
        {
            let _g = self.lock.lock();
            stop.store(true, Ordering::Release);
        }
        self.cv.notify_all();
    }
}

/// A running cleaner thread. Dropping the handle stops the thread and
/// waits for it to finish its current pass.
pub struct CleanerHandle {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl CleanerHandle {
    /// Whether the thread is running (false only if it could not be spawned).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for CleanerHandle {
    fn drop(&mut self) {
        self.wake.stop(&self.stop);
        if let Some(t) = self.thread.take() {
            // A panic in the cleaner (only possible from the backing's own
            // code) has already been reported by the panic hook; there is
            // nothing more to do with it here.
            let _ = t.join();
        }
    }
}

impl<B: Backing> CacheStack<B> {
    /// Background cleaner thread; woken when the victim repo gets entries, also every `interval`. Stops when the handle is dropped (joins). Errors are counted in stats and retried, never panic.
    ///
    /// The thread keeps the stack alive until the handle is dropped. If the
    /// OS refuses to spawn a thread, the error is counted in
    /// `stats().victim.errors` and the handle reports `is_running() == false`.
    pub fn spawn_cleaner(self: &Arc<Self>, interval: Duration) -> CleanerHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let stack = Arc::clone(self);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("canopy-cleaner".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    // Errors were counted inside; the failed entries were
                    // requeued and are retried on the next pass.
                    if let Ok(n) = stack.clean_victims(BATCH) {
                        if n == BATCH {
                            // Probably more waiting: go again without sleeping.
                            continue;
                        }
                    }
                    stack.wake.wait(interval, &thread_stop);
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(_) => {
                self.victim_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        CleanerHandle {
            stop,
            wake: Arc::clone(&self.wake),
            thread,
        }
    }
}
