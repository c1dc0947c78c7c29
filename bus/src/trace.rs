//! W3C trace context (`traceparent`), carried in headers so that a trace spans endpoints.

use rand::Rng;

/// A `traceparent` for a message caused by one that carried `parent` (or a new trace when
/// there is no valid parent): same trace id, new span id, flags kept.
pub(crate) fn child_of(parent: Option<&str>) -> String {
    let mut rng = rand::rng();
    let span: u64 = rng.random_range(1..=u64::MAX);
    match parent.and_then(parse) {
        Some((trace, flags)) => format!("00-{trace}-{span:016x}-{flags}"),
        None => {
            let trace: u128 = rng.random_range(1..=u128::MAX);
            format!("00-{trace:032x}-{span:016x}-01")
        }
    }
}

/// The trace id of a `traceparent`, if it is valid.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    parse(traceparent).map(|(trace, _)| trace)
}

fn parse(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = version == "00"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parts.next().is_none();
    valid.then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_keep_the_trace_and_get_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_of(Some(parent));
        assert_eq!(trace_id(&child), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_ne!(child, parent);
        assert!(child.ends_with("-01"));
    }

    #[test]
    fn invalid_parents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-0000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let t = child_of(Some(bad));
            assert!(trace_id(&t).is_some(), "{t}");
        }
    }
}
