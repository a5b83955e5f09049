//! Parsing of human-friendly quantities on the command line: sizes, durations and rates.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// `1024`, `1KiB`, `16KB`, `1MiB`, `4GiB`, `200MB`. KB/MB/GB are powers of 10, KiB/MiB/GiB of 2.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("invalid size unit {u:?} in {s:?} (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        bail!("size {s:?} out of range");
    }
    Ok(v as u64)
}

/// `30s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => bail!("invalid duration unit {u:?} in {s:?} (use ms, s, m, h)"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("duration {s:?} out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A target send rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    RecordsPerSec(f64),
    BytesPerSec(f64),
}

impl Rate {
    pub fn records_per_sec(self, record_bytes: u64) -> f64 {
        match self {
            Rate::RecordsPerSec(r) => r,
            Rate::BytesPerSec(b) => b / record_bytes.max(1) as f64,
        }
    }
}

/// `10000` (records/s), `50k`, `200MB/s`, `1GiB/s`.
pub fn parse_rate(s: &str) -> Result<Rate> {
    let t = s.trim();
    let r = if let Some(b) = t.strip_suffix("/s") {
        Rate::BytesPerSec(parse_bytes(b)? as f64)
    } else if let Some(k) = t.strip_suffix(['k', 'K']) {
        Rate::RecordsPerSec(
            k.parse::<f64>()
                .with_context(|| format!("invalid rate {s:?}"))?
                * 1e3,
        )
    } else if let Some(m) = t.strip_suffix('M') {
        Rate::RecordsPerSec(
            m.parse::<f64>()
                .with_context(|| format!("invalid rate {s:?}"))?
                * 1e6,
        )
    } else {
        Rate::RecordsPerSec(
            t.parse::<f64>()
                .with_context(|| format!("invalid rate {s:?} (records/s, or e.g. 200MB/s)"))?,
        )
    };
    let v = match r {
        Rate::RecordsPerSec(v) | Rate::BytesPerSec(v) => v,
    };
    if !v.is_finite() || v <= 0.0 {
        bail!("rate {s:?} must be positive");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("1KiB").unwrap(), 1024);
        assert_eq!(parse_bytes("16KB").unwrap(), 16_000);
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("abc").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200MB/s").unwrap(), Rate::BytesPerSec(200e6));
        assert_eq!(parse_rate("50k").unwrap(), Rate::RecordsPerSec(50e3));
        assert_eq!(parse_rate("1000").unwrap(), Rate::RecordsPerSec(1000.0));
        assert_eq!(parse_rate("200MB/s").unwrap().records_per_sec(1000), 200e3);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
