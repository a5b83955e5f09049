//! Shared harness for the integration tests: runs the real `sluice` binary on a free 127.0.0.1
//! port with a temporary data directory, and stops it by PID.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the broker binary built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// How long a broker may take to accept connections or to exit.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A port that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Waits (bounded) for a child to exit; `None` if it is still running at the deadline.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("try_wait failed: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the PID of a child this harness spawned and has not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// True if a Kafka ApiVersions v0 request on a fresh connection gets a response. A bare TCP
/// connect is not enough: right after a SIGKILL the dead broker's listening socket can live on
/// for a moment (its io_uring is torn down asynchronously) and accept connections that are then
/// reset.
pub fn answers_api_versions(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    // length 10 | api_key 18 | version 0 | correlation id 1 | client id null
    let frame = [0u8, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
    if s.write_all(&frame).is_err() {
        return false;
    }
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return false;
    }
    let n = i32::from_be_bytes(len);
    if !(4..=1 << 20).contains(&n) {
        return false;
    }
    let mut body = vec![0u8; n as usize];
    s.read_exact(&mut body).is_ok() && body[..4] == [0, 0, 0, 1]
}

/// A running broker process.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub cores: usize,
    pub extra: Vec<String>,
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl Broker {
    /// Starts a broker with `cores` shards and default settings.
    pub fn start(cores: usize) -> Broker {
        Broker::start_with(cores, &[])
    }

    /// Starts a broker with `cores` shards and extra `sluice start` flags.
    pub fn start_with(cores: usize, extra: &[&str]) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Broker {
            stderr_path: dir.path().join("broker.stderr"),
            dir,
            port: 0,
            cores,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        b.spawn_and_wait();
        b
    }

    /// The data directory (a subdirectory of the temp dir, so the log file stays outside).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:PORT`, as clients want it.
    pub fn bootstrap(&self) -> String {
        self.addr().to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The broker's stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The command line used to start this broker (for tests that start a second one).
    pub fn command(&self, port: u16) -> Command {
        start_command(&self.data_dir(), port, self.cores, &self.extra)
    }

    fn spawn_and_wait(&mut self) {
        // A port picked by bind(0) can be taken by someone else before the broker binds it;
        // retry with a fresh port a few times.
        for attempt in 0..5 {
            if self.port == 0 || attempt > 0 {
                self.port = free_port();
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.stderr_path)
                .expect("open broker log");
            let mut cmd = self.command(self.port);
            cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
            let child = cmd.spawn().expect("spawn sluice");
            self.child = Some(child);
            if self.wait_accepting() {
                return;
            }
            // It exited (port taken?) or never accepted: kill and retry on a new port.
            self.sigkill();
        }
        panic!(
            "broker did not start accepting within {START_TIMEOUT:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// Restart on the same port if possible (a new port if not) after a stop.
    fn respawn_same_port(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open broker log");
        let mut cmd = self.command(self.port);
        cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().expect("spawn sluice"));
        if !self.wait_accepting() {
            self.sigkill();
            self.spawn_and_wait();
        }
    }

    fn wait_accepting(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if answers_api_versions(self.addr()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("broker is not running");
        signal(child.id(), libc::SIGTERM);
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(st) => st,
            None => {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "broker did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Kills the broker with SIGKILL (no shutdown work at all) and reaps it.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same data directory (stopping it first with SIGKILL if
    /// it is still running).
    pub fn restart(&mut self) {
        self.sigkill();
        self.respawn_same_port();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            eprintln!(
                "--- broker stderr ({}) ---\n{}",
                self.stderr_path.display(),
                self.stderr()
            );
        }
    }
}

/// `sluice start` on `data_dir`, 127.0.0.1:`port`, `cores` shards, plus `extra` flags.
pub fn start_command(data_dir: &Path, port: u16, cores: usize, extra: &[String]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("start")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cores")
        .arg(cores.to_string())
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion with a bounded wait; returns (status, stdout, stderr).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn command");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let st = match wait_timeout(&mut child, timeout) {
        Some(st) => st,
        None => {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!("command did not finish within {timeout:?}: {cmd:?}");
        }
    };
    let out = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    (st, out, err)
}
