//! What the broker reports about its environment at start-up, and systemd's readiness
//! protocol. The status file `sluice status` reads is [`crate::config::StatusRecord`]. Nothing
//! here runs on a shard.

use std::path::Path;

use crate::config::BrokerConfig;

/// Fewer open files than this will not hold a few hundred partitions and their clients.
const NOFILE_WARN_BELOW: u64 = 65_536;
/// Less free space than this in the data dir is a full disk in minutes under load.
const FREE_BYTES_WARN_BELOW: u64 = 1 << 30;

/// Sends a state line to systemd's notification socket (`sd_notify(3)`), when the service
/// manager gave one (`Type=notify` units): `READY=1` once the broker accepts connections,
/// `STOPPING=1` when shutdown begins. Without `NOTIFY_SOCKET` it does nothing.
pub fn notify_service_manager(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::UnixDatagram;
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket: a leading NUL byte instead of '@'.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(state, error = %e, "cannot notify the service manager");
    }
}

/// What an operator needs to know about the machine before trusting the broker's numbers: one
/// line at start-up, plus a warning for each setting known to hurt.
pub fn report(config: &BrokerConfig) {
    let kernel = uname_release().unwrap_or_else(|| "unknown".into());
    let cpus_online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let fs = statfs(&config.data_dir);
    let (fs_type, free) = match &fs {
        Some((t, free)) => (fs_name(*t), *free),
        None => ("unknown".into(), 0),
    };
    let nofile = rlimit(libc::RLIMIT_NOFILE);
    let memlock = rlimit(libc::RLIMIT_MEMLOCK);
    tracing::info!(
        kernel = %kernel,
        segment_files_open_max_per_shard = segment_files_per_shard(config.shard_count()),
        cpus_online,
        shards = config.shard_count(),
        pinned_cpus = ?config.cpus,
        data_dir_fs = %fs_type,
        data_dir_free_bytes = free,
        nofile_limit = nofile,
        memlock_limit = memlock,
        "environment"
    );
    if matches!(fs_type.as_str(), "tmpfs" | "overlayfs" | "nfs") {
        tracing::warn!(
            data_dir_fs = %fs_type,
            "the data dir is not on a local disk filesystem: direct I/O and fdatasync do not \
             give durability here; use XFS or ext4 (docs/deploy.md)"
        );
    }
    if fs.is_some() && free < FREE_BYTES_WARN_BELOW {
        tracing::warn!(
            data_dir_free_bytes = free,
            "the data dir has less than 1 GiB free"
        );
    }
    if nofile < NOFILE_WARN_BELOW {
        tracing::warn!(
            nofile_limit = nofile,
            "the open-file limit is low for a broker; raise LimitNOFILE / ulimit -n"
        );
    }
    if config.shard_count() > cpus_online && cpus_online > 0 {
        tracing::warn!(
            shards = config.shard_count(),
            cpus_online,
            "more shards than CPUs: shards share cores"
        );
    }
}

fn uname_release() -> Option<String> {
    // SAFETY: uname fills a struct we own; the release is NUL-terminated within it.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return None;
        }
        let r = std::ffi::CStr::from_ptr(u.release.as_ptr());
        Some(r.to_string_lossy().into_owned())
    }
}

/// The filesystem magic number of `dir` and the bytes free to unprivileged users.
pub fn statfs(dir: &Path) -> Option<(i64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills a struct we own, from a NUL-terminated path.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some((s.f_type as i64, s.f_bavail as u64 * s.f_bsize as u64))
    }
}

/// The name of a filesystem magic number (statfs(2)).
pub fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        m => format!("0x{m:x}"),
    }
}

/// Share of the open-file limit that segment descriptors may take: half. The rest is for the
/// sockets (`--connections-max` per shard), the small metadata files opened and closed
/// around each write (index appends, checkpoints, snapshots), directories being synced,
/// io_uring and eventfd descriptors, and the lag of glommio's asynchronous closes.
const SEGMENT_FILES_SHARE_DIVISOR: u64 = 2;

/// Segment descriptors one shard keeps open at most (its `storage::io` pool): its even share
/// of [`SEGMENT_FILES_SHARE_DIVISOR`] of the process's open-file limit. So the partitions a
/// shard holds never exhaust the limit: beyond it, the least recently used are closed and
/// reopened on their next use.
pub fn segment_files_per_shard(shards: usize) -> usize {
    let nofile = rlimit(libc::RLIMIT_NOFILE);
    let share = nofile / SEGMENT_FILES_SHARE_DIVISOR / shards.max(1) as u64;
    usize::try_from(share).unwrap_or(usize::MAX)
}

fn rlimit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}
