//! Test hooks that make the daemon fail at a named step, so crash-recovery
//! tests are deterministic instead of racing a `kill` against a timer.
//!
//! Configured by `VOLUMED_FAILPOINTS`, read once: `name=action[;name=action]`
//! where action is `abort` (die at once, like SIGKILL: no destructor, no
//! flush), `sleep:<ms>`, `fail:<n>` (the next n checks of [`fails`] say
//! yes) or `panic@<key>` (panic when [`hit_for`] is called with that key).
//! Unset in production; an unknown name is harmless.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug)]
enum Action {
    Abort,
    Sleep(Duration),
    Fail(AtomicU32),
    PanicOn(String),
}

impl PartialEq for Action {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Action::Abort, Action::Abort) => true,
            (Action::Sleep(a), Action::Sleep(b)) => a == b,
            (Action::Fail(a), Action::Fail(b)) => {
                a.load(Ordering::Relaxed) == b.load(Ordering::Relaxed)
            }
            (Action::PanicOn(a), Action::PanicOn(b)) => a == b,
            _ => false,
        }
    }
}

fn table() -> &'static HashMap<String, Action> {
    static TABLE: OnceLock<HashMap<String, Action>> = OnceLock::new();
    TABLE.get_or_init(|| parse(&std::env::var("VOLUMED_FAILPOINTS").unwrap_or_default()))
}

fn parse(spec: &str) -> HashMap<String, Action> {
    spec.split(';')
        .filter_map(|item| {
            let (name, action) = item.trim().split_once('=')?;
            let action = match action.trim() {
                "abort" => Action::Abort,
                s if s.starts_with("fail:") => Action::Fail(AtomicU32::new(s[5..].parse().ok()?)),
                s if s.starts_with("panic@") => Action::PanicOn(s[6..].to_owned()),
                s => Action::Sleep(Duration::from_millis(
                    s.strip_prefix("sleep:")?.parse().ok()?,
                )),
            };
            Some((name.trim().to_owned(), action))
        })
        .collect()
}

/// Runs the action configured for `name`, if any.
pub async fn hit(name: &str) {
    match table().get(name) {
        None => {}
        Some(Action::Abort) => {
            tracing::warn!(failpoint = name, "failpoint: aborting the process");
            std::process::abort();
        }
        Some(Action::Sleep(d)) => tokio::time::sleep(*d).await,
        Some(_) => {}
    }
}

/// True the next n times when `name` is configured `fail:<n>`.
pub fn fails(name: &str) -> bool {
    match table().get(name) {
        Some(Action::Fail(left)) => left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok(),
        _ => false,
    }
}

/// Panics when `name` is configured `panic@<key>` with this key (a test's
/// stand-in for a bug that crashes the worker on one message).
pub fn hit_for(name: &str, key: &str) {
    if let Some(Action::PanicOn(k)) = table().get(name) {
        if k == key {
            panic!("failpoint {name}: panic for {key}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec() {
        let t = parse("after_commit=abort; before_ack=sleep:25;bad;x=explode;f=fail:2;p=panic@k");
        assert_eq!(t.get("after_commit"), Some(&Action::Abort));
        assert_eq!(
            t.get("before_ack"),
            Some(&Action::Sleep(Duration::from_millis(25)))
        );
        assert_eq!(t.get("f"), Some(&Action::Fail(AtomicU32::new(2))));
        assert_eq!(t.get("p"), Some(&Action::PanicOn("k".into())));
        assert_eq!(t.len(), 4);
    }
}
