//! A history checker in the spirit of Jepsen's Kafka workload, for tests that produce through
//! faults and read everything back: given the writes the cluster acknowledged (partition,
//! offset, value) and what a reader found in each partition (offset, value, in the order read),
//! it reports every anomaly — an acknowledged write lost, read at another offset or read more
//! than once; two values at one offset; offsets going backwards within a partition; a value
//! (acknowledged or not) read twice.
//!
//! Values must be unique across the test (a write that was sent but not acknowledged may be
//! read once, or not at all: its outcome is unknown).

use std::collections::{BTreeMap, HashMap};

/// One acknowledged write: the partition, the offset the broker answered, the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub partition: i32,
    pub offset: i64,
    pub value: String,
}

/// What a reader found: per partition, (offset, value) in the order read.
pub type Reads = BTreeMap<i32, Vec<(i64, String)>>;

/// Checks `reads` against `acked`; `Err` lists every anomaly found (one per line).
pub fn check(acked: &[Acked], reads: &Reads) -> Result<(), String> {
    let mut problems = Vec::new();
    // Per partition: offsets strictly increasing (order consistent, no offset twice), and what
    // is at each offset.
    let mut at: HashMap<(i32, i64), &str> = HashMap::new();
    let mut seen_values: HashMap<&str, (i32, i64)> = HashMap::new();
    for (p, records) in reads {
        for w in records.windows(2) {
            if w[1].0 <= w[0].0 {
                problems.push(format!(
                    "partition {p}: offset {} read after offset {} (order or duplicate)",
                    w[1].0, w[0].0
                ));
            }
        }
        for (o, v) in records {
            if let Some(other) = at.insert((*p, *o), v) {
                if other != v {
                    problems.push(format!(
                        "partition {p} offset {o}: two values, {other:?} and {v:?}"
                    ));
                }
            }
            if let Some(first) = seen_values.insert(v, (*p, *o)) {
                problems.push(format!(
                    "value {v:?} read twice: at {}/{} and {p}/{o}",
                    first.0, first.1
                ));
            }
        }
    }
    // Every acknowledged write is read, at the offset it was acknowledged with.
    for a in acked {
        match at.get(&(a.partition, a.offset)) {
            Some(v) if *v == a.value => {}
            Some(v) => problems.push(format!(
                "acknowledged {:?} at {}/{} but {v:?} is there",
                a.value, a.partition, a.offset
            )),
            None => problems.push(format!(
                "acknowledged {:?} at {}/{} is lost{}",
                a.value,
                a.partition,
                a.offset,
                match seen_values.get(a.value.as_str()) {
                    Some((p, o)) => format!(" (read at {p}/{o} instead)"),
                    None => String::new(),
                }
            )),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(p: i32, o: i64, v: &str) -> Acked {
        Acked {
            partition: p,
            offset: o,
            value: v.to_string(),
        }
    }

    fn reads(rs: &[(i32, i64, &str)]) -> Reads {
        let mut out = Reads::new();
        for (p, o, v) in rs {
            out.entry(*p).or_default().push((*o, v.to_string()));
        }
        out
    }

    #[test]
    fn a_clean_history_passes_and_unacknowledged_writes_may_appear_once() {
        let a = [acked(0, 0, "a"), acked(0, 2, "c")];
        let r = reads(&[(0, 0, "a"), (0, 1, "maybe"), (0, 2, "c")]);
        assert_eq!(check(&a, &r), Ok(()));
    }

    #[test]
    fn every_anomaly_is_reported() {
        let a = [acked(0, 0, "a"), acked(0, 1, "b"), acked(1, 5, "x")];
        let r = reads(&[(0, 0, "a"), (0, 0, "z"), (0, 3, "b"), (0, 2, "a")]);
        let e = check(&a, &r).unwrap_err();
        assert!(e.contains("two values"), "{e}");
        assert!(e.contains("read twice"), "{e}");
        assert!(e.contains("order or duplicate"), "{e}");
        assert!(
            e.contains("\"b\" at 0/1 is lost (read at 0/3 instead)"),
            "{e}"
        );
        assert!(e.contains("\"x\" at 1/5 is lost"), "{e}");
    }
}
