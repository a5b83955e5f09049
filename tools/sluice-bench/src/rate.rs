//! Open-loop pacing. At a fixed rate every send has a scheduled time; latency is measured from
//! that time, not from when the send actually happened, so a stalled broker shows up as latency
//! instead of silently lowering the offered load (no coordinated omission).

use std::time::{Duration, Instant};

/// Hands out evenly spaced send slots: `start`, `start + interval`, … A sender that falls behind
/// gets slots in the past (and sends immediately); the backlog is never forgiven.
#[derive(Debug, Clone)]
pub struct Pacer {
    next: Instant,
    interval: Duration,
}

impl Pacer {
    /// `sends_per_sec` slots per second starting at `start`.
    pub fn new(start: Instant, sends_per_sec: f64) -> Pacer {
        assert!(sends_per_sec > 0.0 && sends_per_sec.is_finite());
        Pacer {
            next: start,
            interval: Duration::from_secs_f64(1.0 / sends_per_sec),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The next scheduled slot; advances the schedule by one interval.
    pub fn next_slot(&mut self) -> Instant {
        let slot = self.next;
        self.next += self.interval;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_evenly_spaced_and_never_skipped() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 1000.0);
        assert_eq!(p.next_slot(), t0);
        assert_eq!(p.next_slot(), t0 + Duration::from_millis(1));
        for _ in 0..998 {
            p.next_slot();
        }
        // 1000 slots span exactly one second, however late the caller is.
        assert_eq!(p.next_slot(), t0 + Duration::from_secs(1));
    }
}
