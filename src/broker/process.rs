//! Process guards and tuning, run once by [`super::run`] before any shard starts: the data-dir
//! lock, the port check, the open-file limit and the allocator thresholds. Nothing here runs on a
//! shard.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Holds the data-dir lock for the life of the process (flock; released by the kernel on exit,
/// even after `kill -9`).
pub struct DirLock {
    _file: File,
}

pub fn lock_data_dir(dir: &Path) -> Result<DirLock, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    let path = dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data dir {} is in use by another sluice process (lock held on {})",
            dir.display(),
            path.display()
        ));
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(DirLock { _file: file })
}

/// SO_REUSEPORT would let us bind a port another process holds and silently share its traffic:
/// refuse to start unless a plain bind (without SO_REUSEPORT) succeeds first. The socket is bound
/// but never listens, so no client can connect to it in the meantime.
///
/// A broker killed with SIGKILL releases its listening socket only when the kernel has torn down
/// its io_uring instances (an accept in flight holds the socket), which can take a moment after
/// the process is gone; a restart in that window waits for the port instead of failing.
pub fn check_port_free(addr: std::net::SocketAddr) -> Result<(), String> {
    const PORT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);
    let deadline = std::time::Instant::now() + PORT_WAIT_MAX;
    loop {
        let sock = crate::server::new_tcp_socket(addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        match sock.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                drop(sock);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}")),
        }
    }
}

/// Each shard keeps segment files open up to a share of the open-file limit (closing the least
/// recently used beyond it, `storage::io`), and every connection holds a socket: the usual soft
/// limit of 1,024 descriptors would make the share small and the reopens many. Raise the soft
/// limit to the hard one, as Kafka's and Redpanda's deployment guides ask operators to.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::info!(from, to = lim.rlim_max, "raised the open-file limit");
        }
    }
}

/// Request frames and batch copies are often 64 KiB-1 MiB. glibc serves blocks that large with
/// fresh mmaps and returns them on free, so every produce request paid for page faults and the
/// kernel zeroing new pages (a third of the broker's CPU under load). Keep them in the heap.
/// The `sluice` binary allocates through mimalloc (src/main.rs); this still governs what goes
/// through glibc malloc (C libraries, and programs that link the crate without that allocator).
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
