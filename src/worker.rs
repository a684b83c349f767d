//! The data plane's threads (thread per core). Each worker thread runs a
//! current-thread runtime that serves the connections handed to it, with its own Redis
//! connection for reserve and settle and its own pool of upstream connections, so a
//! request never changes threads between accept and settle: every wake-up (client,
//! Redis, provider) lands on the thread that is already running the request.
//! Background work (the usage flusher, model refresh, revocation reloads, accept) runs
//! on the main runtime.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker number: 1..=N on the data plane's threads, 0 anywhere else.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

pub(crate) fn set_index(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// How many data-plane threads `server.worker_threads` asks for (0: one per core).
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

/// One value per worker thread plus one for every other thread (index 0).
pub struct PerWorker<T> {
    shared: T,
    workers: Vec<T>,
}

impl<T> PerWorker<T> {
    pub fn new(workers: usize, mut make: impl FnMut() -> T) -> PerWorker<T> {
        PerWorker {
            shared: make(),
            workers: (0..workers).map(|_| make()).collect(),
        }
    }

    /// This thread's value.
    pub fn get(&self) -> &T {
        match index().checked_sub(1) {
            Some(i) => self.workers.get(i).unwrap_or(&self.shared),
            None => &self.shared,
        }
    }

    /// The value of worker `i` (1..=N), or the shared one.
    pub fn of(&self, i: usize) -> &T {
        match i.checked_sub(1) {
            Some(i) => self.workers.get(i).unwrap_or(&self.shared),
            None => &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_thread_gets_its_own_value_and_other_threads_the_shared_one() {
        let mut n = 0;
        let per = PerWorker::new(2, || {
            n += 1;
            n
        });
        assert_eq!(*per.get(), 1, "not a worker thread");
        let seen = std::thread::scope(|s| {
            let a = s.spawn(|| {
                set_index(1);
                *per.get()
            });
            let b = s.spawn(|| {
                set_index(2);
                *per.get()
            });
            let c = s.spawn(|| {
                set_index(7);
                *per.get()
            });
            (a.join().ok(), b.join().ok(), c.join().ok())
        });
        assert_eq!(seen, (Some(2), Some(3), Some(1)));
        assert_eq!(*per.of(2), 3);
    }
}
