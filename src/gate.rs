//! The consumption gate: closed when every request would fail the same way
//! because volumed itself is misconfigured (the backend refuses its
//! credentials). Closing it stops the request consumer, so messages wait in
//! the queue instead of each being tried and eventually dead-lettered; the
//! consumer re-checks the backend periodically and reopens the gate.

use std::time::Duration;

use tokio::sync::watch;

pub struct Gate {
    closed: watch::Sender<Option<String>>,
    consuming: watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            closed: watch::channel(None).0,
            consuming: watch::channel(false).0,
        }
    }
}

impl Gate {
    /// Closes the gate and waits (at most 10 s) until the consumer has
    /// stopped, so that a message given back afterwards is not delivered
    /// to this daemon again.
    pub async fn close(&self, reason: String) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(reason);
                true
            } else {
                false
            }
        });
        let mut consuming = self.consuming.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), consuming.wait_for(|c| !*c)).await;
    }

    pub fn open(&self) {
        self.closed.send_replace(None);
    }

    /// Why the gate is closed, if it is.
    pub fn reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Option<String>> {
        self.closed.subscribe()
    }

    /// Whether the request consumer is registered with the broker.
    pub fn is_consuming(&self) -> bool {
        *self.consuming.borrow()
    }

    /// Follows [`Gate::is_consuming`].
    pub fn watch_consuming(&self) -> watch::Receiver<bool> {
        self.consuming.subscribe()
    }

    /// Reported by the consumer.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.send_replace(on);
    }
}
