//! `sluice status`: what a running broker is — version, uptime, shards, listener, topics,
//! partitions and disk use — for an operator on the broker's machine (like `systemctl status`).
//!
//! The process facts come from the status file the broker writes into its data dir
//! ([`StatusRecord`]) and a liveness check of its pid; topics and partitions from a Metadata
//! request to its listener; disk use from the data dir itself.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use futures_lite::future::block_on;
use serde::Serialize;
use sluice_client::admin;

use super::connect;
use crate::config::StatusRecord;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The broker's data dir [default: ./sluice-data, or SLUICE_DATA_DIR].
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What `sluice status` prints, also as JSON (`--format json`).
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub node_id: i32,
    pub cluster: bool,
    pub controller_id: i32,
    pub brokers: usize,
    pub listen: String,
    pub shards: usize,
    pub cpus: Vec<usize>,
    pub data_dir: PathBuf,
    pub topics: usize,
    pub partitions: usize,
    /// Bytes the data dir occupies on disk (allocated blocks).
    pub disk_used_bytes: u64,
    /// Bytes free to the broker on the data dir's filesystem.
    pub disk_free_bytes: u64,
    /// Allocated bytes per topic, largest first.
    pub topic_disk_bytes: Vec<(String, u64)>,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let s = status(&args.data_dir)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Format::Text => print_text(&s),
    }
    Ok(())
}

/// Reads the status of the broker running on `data_dir`; fails in one line if none runs.
pub fn status(data_dir: &Path) -> Result<Status> {
    let rec = StatusRecord::read(data_dir)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| {
            anyhow!(
                "no broker has run on data dir {} (no status file)",
                data_dir.display()
            )
        })?;
    if !alive(rec.pid) {
        bail!(
            "no broker is running on data dir {} (last started: pid {}, version {})",
            data_dir.display(),
            rec.pid,
            rec.version
        );
    }
    let now = chrono::Utc::now().timestamp_millis();
    let uptime_seconds = (now.saturating_sub(rec.started_at_ms).max(0) / 1000) as u64;
    let mut c = connect(&local_address(&rec.listen))?;
    let m = block_on(admin::metadata(&mut c, None, false))?;
    let mut topics = Vec::new();
    let mut partitions = 0;
    for t in &m.topics {
        if let Some(name) = &t.name {
            topics.push((name.to_string(), t.partitions.len()));
            partitions += t.partitions.len();
        }
    }
    let mut topic_disk_bytes: Vec<(String, u64)> = topics
        .iter()
        .map(|(name, n)| {
            let bytes = (0..*n)
                .map(|p| disk_use(&rec.data_dir.join(format!("{name}-{p}"))))
                .sum();
            (name.clone(), bytes)
        })
        .collect();
    topic_disk_bytes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(Status {
        version: rec.version,
        pid: rec.pid,
        uptime_seconds,
        node_id: rec.node_id,
        cluster: rec.cluster,
        controller_id: m.controller_id.0,
        brokers: m.brokers.len(),
        listen: rec.listen,
        shards: rec.shards,
        cpus: rec.cpus,
        data_dir: rec.data_dir.clone(),
        topics: topics.len(),
        partitions,
        disk_used_bytes: disk_use(&rec.data_dir),
        disk_free_bytes: free_bytes(&rec.data_dir),
        topic_disk_bytes,
    })
}

/// Topics listed in the text form; the JSON form lists all.
const TOPICS_SHOWN_MAX: usize = 10;

fn print_text(s: &Status) {
    let mode = if s.cluster {
        format!(
            "node {} of a cluster of {} brokers, controller {}",
            s.node_id, s.brokers, s.controller_id
        )
    } else {
        format!("single node (node id {})", s.node_id)
    };
    println!("state       running (pid {})", s.pid);
    println!("version     {}", s.version);
    println!("uptime      {}", duration(s.uptime_seconds));
    println!("mode        {mode}");
    println!("listen      {}", s.listen);
    println!("shards      {} (cpus {:?})", s.shards, s.cpus);
    println!("topics      {} ({} partitions)", s.topics, s.partitions);
    println!(
        "disk        {} used in {}, {} free",
        bytes(s.disk_used_bytes),
        s.data_dir.display(),
        bytes(s.disk_free_bytes)
    );
    for (name, b) in s.topic_disk_bytes.iter().take(TOPICS_SHOWN_MAX) {
        println!("  {:<40} {}", name, bytes(*b));
    }
    if s.topic_disk_bytes.len() > TOPICS_SHOWN_MAX {
        println!(
            "  … {} more (--format json lists all)",
            s.topic_disk_bytes.len() - TOPICS_SHOWN_MAX
        );
    }
}

/// The listener as a client reaches it from this machine: a wildcard address means loopback.
fn local_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => listen.to_string(),
    }
}

/// Whether `pid` is a running process (signal 0 checks existence and permission; EPERM means
/// it exists under another user).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Allocated bytes under `path` (what `du` reports): preallocated segment extents count.
fn disk_use(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return own;
    };
    own + entries.flatten().map(|e| disk_use(&e.path())).sum::<u64>()
}

fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills a struct we own, from a NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_like_other_tools() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3 * 3600 + 2 * 60 + 5), "3h 2m 5s");
        assert_eq!(duration(2 * 86_400 + 3600), "2d 1h 0m");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(local_address("0.0.0.0:9092"), "127.0.0.1:9092");
        assert_eq!(local_address("127.0.0.2:9092"), "127.0.0.2:9092");
    }
}
