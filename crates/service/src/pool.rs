//! A fixed pool of worker threads for CPU-bound generation, off the async runtime.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs on `workers` threads; a job whose result nobody waits for any more is skipped.
pub struct WorkerPool {
    jobs: mpsc::Sender<Job>,
    workers: usize,
    busy: Arc<AtomicUsize>,
}

impl WorkerPool {
    pub fn new(workers: usize) -> Self {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for id in 0..workers {
            let receiver = Arc::clone(&receiver);
            thread::Builder::new()
                .name(format!("weightinit-worker-{id}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match receiver.lock().expect("worker queue poisoned").recv() {
                            Ok(job) => job,
                            Err(_) => return, // the pool is gone
                        };
                        job();
                    }
                })
                .expect("spawn worker thread");
        }
        Self {
            jobs: sender,
            workers,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Queues `work`; its result arrives on the returned receiver. Dropping the receiver
    /// before the job starts cancels it.
    pub fn run<T, F>(&self, work: F) -> oneshot::Receiver<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (result, receiver) = oneshot::channel();
        let busy = Arc::clone(&self.busy);
        let job: Job = Box::new(move || {
            if result.is_closed() {
                return;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            // A panicking job loses its result, not the worker.
            let value = catch_unwind(AssertUnwindSafe(work));
            // Not busy any more by the time the result can be seen.
            busy.fetch_sub(1, Ordering::Relaxed);
            if let Ok(value) = value {
                let _ = result.send(value);
            }
        });
        self.jobs.send(job).expect("workers outlive the pool");
        receiver
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Workers running a job right now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_panics() {
        let pool = WorkerPool::new(2);
        let failed = pool.run(|| -> u32 { panic!("boom") });
        assert!(failed.await.is_err());
        let results: Vec<_> = (0..10u32).map(|i| pool.run(move || i * i)).collect();
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.await.unwrap(), (i * i) as u32);
        }
        assert_eq!(pool.busy(), 0);
    }
}
