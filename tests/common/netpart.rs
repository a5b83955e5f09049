//! Network partitions between the nodes of a test cluster, made with iptables on the loopback
//! addresses the nodes listen on (127.0.0.1–3). Each rule drops TCP packets between two nodes'
//! addresses on one of the receiving node's internal ports (the controller listener and the
//! partition transport of each shard), in both directions of each connection, and carries a
//! comment unique to this process, so nothing but the test's own traffic is touched.
//!
//! The rules live as long as the `Partition` guard: dropping it removes every rule it inserted,
//! also when the test panics, so a failed test never leaves the machine partitioned. Rules of a
//! test process that was killed outright (no unwinding) are removed by the next partition made.
//!
//! Needs root and a working `iptables` (tests/run.sh installs it); `Partition::unavailable`
//! says why a test cannot partition the network here.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The chain the rules go in: every loopback packet passes it on its way in, and a drop there
/// is silent (the sender sees a dead network, not an error).
const CHAIN: &str = "INPUT";

/// Why partitions cannot be made here, or `None` when they can: root, iptables that lists the
/// chain, and the nodes on distinct addresses.
pub fn unavailable(nodes: &[NodeAddrs]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (iptables rules need CAP_NET_ADMIN)".to_string());
    }
    match Command::new("iptables")
        .args(["-w", "-n", "-L", CHAIN])
        .output()
    {
        Err(e) => return Some(format!("iptables cannot run: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "iptables -L {CHAIN} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let mut ips: Vec<IpAddr> = nodes.iter().map(|n| n.ip).collect();
    ips.sort();
    ips.dedup();
    if ips.len() != nodes.len() {
        return Some(
            "the nodes share an address (127.0.0.2-3 cannot be bound here): no partition by address"
                .to_string(),
        );
    }
    None
}

/// One node's address and the ports its peers connect to.
#[derive(Clone, Debug)]
pub struct NodeAddrs {
    pub id: i32,
    pub ip: IpAddr,
    pub internal_ports: Vec<u16>,
}

impl NodeAddrs {
    /// A node whose controller listener is `internal` and which runs `shards` shards: its
    /// internal ports are the listener's and each shard's partition transport port (the
    /// listener's + 1 + shard index).
    pub fn new(id: i32, internal: SocketAddr, shards: u16) -> NodeAddrs {
        let base = internal.port();
        let mut internal_ports = vec![base];
        internal_ports.extend((0..shards).filter_map(|s| base.checked_add(1)?.checked_add(s)));
        NodeAddrs {
            id,
            ip: internal.ip(),
            internal_ports,
        }
    }
}

/// Prefix of every rule's comment; the rest is the inserting process id and a counter.
const COMMENT_PREFIX: &str = "sluice-test-netpart-";

/// Removes rules a test process left behind when it was killed before its guard could run
/// (the comment names the process; it is gone): their ports may be handed to a later test.
fn remove_stale_rules() {
    let Ok(out) = Command::new("iptables").args(["-w", "-S", CHAIN]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(at) = line.find(COMMENT_PREFIX) else {
            continue;
        };
        let pid = line[at + COMMENT_PREFIX.len()..]
            .split(['-', ' ', '"'])
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Some(spec) = line.strip_prefix(&format!("-A {CHAIN} ")) else {
            continue;
        };
        let args: Vec<String> = spec
            .split_whitespace()
            .map(|a| a.trim_matches('"').to_string())
            .collect();
        let _ = Command::new("iptables")
            .args(["-w", "-D", CHAIN])
            .args(&args)
            .status();
    }
}

/// The rules of one partition; removed on drop.
pub struct Partition {
    comment: String,
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Cuts `isolated` off from each of `others` (both directions). Panics if a rule cannot be
    /// inserted (after removing those that were).
    pub fn isolate(isolated: &NodeAddrs, others: &[NodeAddrs]) -> Partition {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        remove_stale_rules();
        let comment = format!(
            "{COMMENT_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut p = Partition {
            comment,
            rules: Vec::new(),
        };
        for other in others {
            for (from, to) in [(isolated, other), (other, isolated)] {
                for port in &to.internal_ports {
                    // Packets to the receiving node's port, and its answers on that
                    // connection.
                    p.insert(from.ip, to.ip, "--dport", *port);
                    p.insert(to.ip, from.ip, "--sport", *port);
                }
            }
        }
        p
    }

    fn insert(&mut self, src: IpAddr, dst: IpAddr, port_flag: &str, port: u16) {
        let spec: Vec<String> = [
            "-s",
            &src.to_string(),
            "-d",
            &dst.to_string(),
            "-p",
            "tcp",
            port_flag,
            &port.to_string(),
            "-m",
            "comment",
            "--comment",
            &self.comment,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = Command::new("iptables")
            .args(["-w", "-I", CHAIN])
            .args(&spec)
            .output()
            .expect("run iptables");
        if !out.status.success() {
            let e = String::from_utf8_lossy(&out.stderr).into_owned();
            self.heal();
            panic!("iptables -I {CHAIN} {}: {e}", spec.join(" "));
        }
        self.rules.push(spec);
    }

    /// Removes every rule of this partition (also done on drop).
    pub fn heal(&mut self) {
        for spec in std::mem::take(&mut self.rules) {
            let removed = Command::new("iptables")
                .args(["-w", "-D", CHAIN])
                .args(&spec)
                .status();
            if !removed.is_ok_and(|s| s.success()) {
                eprintln!(
                    "netpart: could not remove iptables rule {} (comment {})",
                    spec.join(" "),
                    self.comment
                );
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}
