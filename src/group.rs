//! Grouped calls: when many tasks need the same kind of statement at once,
//! one statement serves all of them.
//!
//! A group has a few lanes. A free lane takes every call queued at that
//! moment (up to a bound) and runs them as one; calls that arrive while
//! every lane is busy wait and form the next group. At low load each call
//! runs alone and at once (no timer delays it); under a burst the groups
//! grow by themselves, so the number of round trips and commits grows with
//! the number of lanes busy, not with the number of callers.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

type Call<I, O> = (I, oneshot::Sender<O>);

pub struct Group<I, O> {
    tx: mpsc::UnboundedSender<Call<I, O>>,
}

impl<I: Send + 'static, O: Send + 'static> Group<I, O> {
    /// Starts `lanes` tasks that run `run` over up to `max` calls at a time.
    /// `run` returns one output per input, in the same order; a lane whose
    /// `run` returns fewer leaves the remaining callers without an answer
    /// ([`Group::call`] returns `None` to them).
    pub fn start<F, Fut>(lanes: usize, max: usize, run: F) -> Group<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send,
    {
        let (tx, rx) = mpsc::unbounded_channel::<Call<I, O>>();
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..lanes.max(1) {
            let (rx, run) = (Arc::clone(&rx), Arc::clone(&run));
            tokio::spawn(async move {
                loop {
                    let calls = {
                        // The receiver is held while a lane waits for the
                        // first call of its group: that is what makes the
                        // next free lane, and only it, take the next call.
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut calls = vec![first];
                        while calls.len() < max {
                            match rx.try_recv() {
                                Ok(c) => calls.push(c),
                                Err(_) => break,
                            }
                        }
                        calls
                    };
                    let (inputs, replies): (Vec<I>, Vec<oneshot::Sender<O>>) =
                        calls.into_iter().unzip();
                    let outputs = run(inputs).await;
                    for (out, reply) in outputs.into_iter().zip(replies) {
                        // A caller that went away needs no answer.
                        let _ = reply.send(out);
                    }
                }
            });
        }
        Group { tx }
    }

    /// Runs `input` in the next group and returns its output; `None` when
    /// the group's tasks are gone (the runtime is shutting down) or gave
    /// no answer for it.
    pub async fn call(&self, input: I) -> Option<O> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((input, reply)).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn calls_that_arrive_while_the_lanes_are_busy_run_as_one_group() {
        let groups = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&groups);
        let group = Arc::new(Group::start(1, 64, move |xs: Vec<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                xs.into_iter().map(|x| x * 2).collect::<Vec<_>>()
            }
        }));
        // The first call occupies the only lane; the next twenty arrive
        // meanwhile and must share one group.
        let first = {
            let g = Arc::clone(&group);
            tokio::spawn(async move { g.call(0).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (1..=20)
            .map(|i| {
                let g = Arc::clone(&group);
                tokio::spawn(async move { g.call(i).await })
            })
            .collect();
        assert_eq!(first.await.ok().flatten(), Some(0));
        for (i, h) in rest.into_iter().enumerate() {
            assert_eq!(h.await.ok().flatten(), Some(2 * (i as u32 + 1)));
        }
        assert_eq!(groups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_group_never_exceeds_its_bound() {
        let largest = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&largest);
        let group = Arc::new(Group::start(1, 4, move |xs: Vec<u32>| {
            seen.fetch_max(xs.len(), Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                xs
            }
        }));
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let g = Arc::clone(&group);
                tokio::spawn(async move { g.call(i).await })
            })
            .collect();
        for (i, h) in calls.into_iter().enumerate() {
            assert_eq!(h.await.ok().flatten(), Some(i as u32));
        }
        assert_eq!(largest.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_caller_left_without_an_answer_learns_it() {
        let group = Group::start(1, 8, |_: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(group.call(1).await, None);
    }
}
