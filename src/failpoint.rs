//! Test hooks that make the daemon fail at a named step, so crash-recovery
//! tests are deterministic instead of racing a `kill` against a timer.
//!
//! Configured by `VOLUMED_FAILPOINTS`, read once: `name=action[;name=action]`
//! where action is `abort` (die at once, like SIGKILL: no destructor, no
//! flush) or `sleep:<ms>`. Unset in production; an unknown name is harmless.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
enum Action {
    Abort,
    Sleep(Duration),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec() {
        let t = parse("after_commit=abort; before_ack=sleep:25;bad;x=explode");
        assert_eq!(t.get("after_commit"), Some(&Action::Abort));
        assert_eq!(
            t.get("before_ack"),
            Some(&Action::Sleep(Duration::from_millis(25)))
        );
        assert_eq!(t.len(), 2);
    }
}
