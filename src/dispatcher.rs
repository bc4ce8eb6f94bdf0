//! Per-volume lanes over a bounded worker pool.
//!
//! Requests for one volume run one at a time in arrival order (a detach
//! never overtakes the attach before it); requests for different volumes run
//! in parallel, at most `workers` at once. A lane exists only while it has
//! work, so idle volumes cost nothing; the total queued across lanes is
//! bounded by the channel prefetch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

type Lanes<J> = Arc<Mutex<HashMap<Uuid, mpsc::UnboundedSender<J>>>>;

pub struct Dispatcher<J> {
    lanes: Lanes<J>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl<J: Send + 'static> Dispatcher<J> {
    pub fn new(workers: usize) -> Self {
        Dispatcher {
            lanes: Arc::default(),
            permits: Arc::new(Semaphore::new(workers)),
            tracker: TaskTracker::new(),
        }
    }

    /// Queues `job` on the lane of `key`, starting the lane if it is idle.
    /// `run` processes one job; it is called with a worker permit held.
    pub fn dispatch<F, Fut>(&self, key: Uuid, job: J, run: F)
    where
        F: Fn(J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        // The map lock is a std mutex held only for map updates and a
        // non-blocking send; nothing is awaited under it.
        let mut lanes = lock(&self.lanes);
        let job = match lanes.get(&key) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // Unreachable while the lane is in the map (it removes
                // itself under this lock before dropping its receiver);
                // start a new lane rather than lose the job.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: `rx` is alive.
        let _ = tx.send(job);
        lanes.insert(key, tx);
        drop(lanes);
        let lanes = Arc::clone(&self.lanes);
        let permits = Arc::clone(&self.permits);
        self.tracker
            .spawn(async move { run_lane(key, rx, lanes, permits, run).await });
    }

    /// Operations queued or running.
    pub fn busy_lanes(&self) -> usize {
        lock(&self.lanes).len()
    }

    /// Stops accepting lanes and waits until every queued job has run.
    pub async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Something that a tracked task may spawn alongside the lanes (e.g. the
    /// handling of a rejected message), so `drain` waits for it too.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map means a lane panicked between two map updates, which
    // leaves the map itself consistent: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_lane<J, F, Fut>(
    key: Uuid,
    mut rx: mpsc::UnboundedReceiver<J>,
    lanes: Lanes<J>,
    permits: Arc<Semaphore>,
    run: F,
) where
    F: Fn(J) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let job = {
            let mut map = lock(&lanes);
            match rx.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    map.remove(&key);
                    return;
                }
            }
        };
        // Cannot fail: the semaphore is never closed.
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        run(job).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn keeps_order_per_key_and_bounds_concurrency() {
        let d = Dispatcher::new(3);
        let seen: Arc<Mutex<HashMap<Uuid, Vec<usize>>>> = Arc::default();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let keys: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        for i in 0..60 {
            let key = keys[i % keys.len()];
            let (seen, running, peak) = (seen.clone(), running.clone(), peak.clone());
            d.dispatch(key, (key, i), move |(k, n): (Uuid, usize)| {
                let (seen, running, peak) = (seen.clone(), running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    lock(&seen).entry(k).or_default().push(n);
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
        d.drain().await;
        let seen = lock(&seen);
        for k in &keys {
            let v = &seen[k];
            assert_eq!(v.len(), 10);
            assert!(v.windows(2).all(|w| w[0] < w[1]), "order kept: {v:?}");
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 2, "ran in parallel");
        assert_eq!(d.busy_lanes(), 0);
    }
}
