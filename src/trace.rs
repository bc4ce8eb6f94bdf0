//! W3C trace context (`traceparent`) carried from a request to its event.
//!
//! A request may carry a `traceparent` AMQP header. volumed keeps its trace
//! id: the operation's log lines carry it as `trace.id`, and the completion
//! event is published with a `traceparent` header of the same trace id and
//! a new parent id (the operation is a span of its own). A request without
//! one, or with one that does not parse, starts a new trace, as the W3C
//! recommendation says a receiver should; an invalid header is never a
//! reason to refuse a request.

use std::fmt;

/// The AMQP header name, the same as the HTTP one.
pub const HEADER: &str = "traceparent";

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`. Later versions are read by
    /// their first four fields, as the recommendation asks; all-zero ids
    /// and version `ff` are invalid.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let s = s.trim();
        let mut parts = s.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        let lower_hex = |p: &str, len: usize| {
            p.len() == len
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" {
            return None;
        }
        if version == "00" && rest.is_some() {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> TraceParent {
        TraceParent {
            trace_id: nonzero(rand::random()),
            parent_id: nonzero(rand::random()),
            flags: 1,
        }
    }

    /// The same trace with a new parent id: what volumed puts on the event.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: nonzero(rand::random()),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// Zero ids are invalid; a random draw of zero becomes one.
fn nonzero<T: PartialEq + From<u8>>(v: T) -> T {
    if v == T::from(0) {
        T::from(1)
    } else {
        v
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(s).expect("valid");
        assert_eq!(t.to_string(), s);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.parent_id, t.parent_id);
    }

    #[test]
    fn refuses_what_the_recommendation_calls_invalid() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version with extra fields is read by its first four.
        assert!(TraceParent::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
    }
}
