//! Test harness shared by the integration tests: runs the real `sluice` binary on a free
//! 127.0.0.1 port with a temporary data dir, waits (bounded) until it accepts connections, and
//! can stop it with SIGTERM or SIGKILL and start it again on the same data dir. The process is
//! killed when the handle is dropped, so a failing test never leaves a broker behind.
//!
//! Every wait here has a deadline; nothing asserts on how long anything took.

#![allow(dead_code)]

pub mod cluster;
pub mod consumers;
pub mod history;
pub mod netpart;
pub mod raw;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to start accepting connections.
pub const START_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a broker may take to exit after a signal.
pub const EXIT_WAIT_MAX: Duration = Duration::from_secs(20);
/// How long one CLI invocation may run.
pub const CLI_WAIT_MAX: Duration = Duration::from_secs(60);

/// The broker binary: the one cargo built for this test run, or `SLUICE_BIN` when set (to test
/// a binary built elsewhere, e.g. a copy taken right after the build).
pub fn sluice_bin() -> PathBuf {
    match std::env::var_os("SLUICE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_sluice")),
    }
}

/// Ports test brokers listen on are drawn from this many ports right below the kernel's
/// ephemeral range (`ip_local_port_range`): a port inside that range can be taken, while its
/// broker is down for a restart, by any outgoing connection on the machine, and the restart
/// then fails to bind. Ports below the range are only ever taken by explicit binds.
const TEST_PORT_SPAN: u16 = 12_000;

/// The first port of the kernel's ephemeral range (Linux's default when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// A port on `host` below the ephemeral range for which `free(port)` held a moment ago (the
/// caller checks by binding); drawn at random so concurrent test processes rarely meet.
pub fn pick_port(host: &str, free: impl Fn(u16) -> bool) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let high = ephemeral_low();
    let low = high.saturating_sub(TEST_PORT_SPAN).max(1_024);
    assert!(low < high, "no room below the ephemeral ports ({high})");
    let seed = std::collections::hash_map::RandomState::new();
    for i in 0..1_000u32 {
        let mut h = seed.build_hasher();
        h.write_u32(i);
        h.write_u32(std::process::id());
        let port = low + (h.finish() % u64::from(high - low)) as u16;
        if TcpListener::bind((host, port)).is_ok() && free(port) {
            return port;
        }
    }
    panic!("no free port on {host} in {low}..{high}");
}

/// A port on 127.0.0.1 that was free a moment ago, below the ephemeral range.
/// The sum over a broker's shards of the metric `name` (a family without other labels), read
/// from its `/metrics` endpoint at `addr` (`--metrics-listen`); `None` if the endpoint cannot be
/// reached or does not report it.
pub fn scrape_metric(addr: SocketAddr, name: &str) -> Option<f64> {
    use std::io::Write;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: sluice\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    conn.read_to_string(&mut page).ok()?;
    let prefix = format!("{name}{{");
    let values: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(&prefix) || l.split(' ').next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub fn free_port() -> u16 {
    pick_port("127.0.0.1", |_| true)
}

/// Segment size of test brokers. Segment files are preallocated in extents of
/// min(64 MiB, segment size); small segments keep a test's disk use to a few MiB per partition
/// (several brokers run at once) and make segment rolls part of every test.
pub const TEST_SEGMENT_BYTES: u64 = 8 << 20;
/// The broker flag for a new group's initial rebalance delay; the harness passes 0 unless a
/// test sets it.
pub const REBALANCE_DELAY_FLAG: &str = "--group-initial-rebalance-delay-ms";

/// How to start a broker.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    pub cores: usize,
    /// `--segment-bytes`; `None` leaves the broker default.
    pub segment_bytes: Option<u64>,
    pub extra_args: Vec<String>,
    /// `--data-dir`; `None` puts it in the broker's temp dir.
    pub data_dir: Option<PathBuf>,
    /// Soft open-file limit the broker process starts with (the hard limit is left alone).
    pub fd_soft_limit: Option<u64>,
    /// Hard (and soft) open-file limit the broker process starts with: it cannot raise it.
    pub fd_hard_limit: Option<u64>,
    /// Address-space limit (RLIMIT_AS) the broker process starts with: an allocation past it
    /// fails, which aborts the process.
    pub address_space_bytes_max: Option<u64>,
    /// Extra environment variables of the broker process.
    pub envs: Vec<(String, String)>,
    /// `--listen`; `None` picks a free port on 127.0.0.1.
    pub listen: Option<SocketAddr>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            cores: 1,
            segment_bytes: Some(TEST_SEGMENT_BYTES),
            extra_args: Vec::new(),
            data_dir: None,
            fd_soft_limit: None,
            fd_hard_limit: None,
            address_space_bytes_max: None,
            envs: Vec::new(),
            listen: None,
        }
    }
}

impl BrokerOptions {
    pub fn cores(mut self, n: usize) -> Self {
        self.cores = n;
        self
    }

    pub fn segment_bytes(mut self, n: Option<u64>) -> Self {
        self.segment_bytes = n;
        self
    }

    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    pub fn fd_soft_limit(mut self, n: u64) -> Self {
        self.fd_soft_limit = Some(n);
        self
    }

    pub fn fd_hard_limit(mut self, n: u64) -> Self {
        self.fd_hard_limit = Some(n);
        self
    }

    pub fn address_space_bytes_max(mut self, n: u64) -> Self {
        self.address_space_bytes_max = Some(n);
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.extra_args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn start(self) -> Broker {
        Broker::start_with(self)
    }
}

/// A running (or stopped) `sluice start` process.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub options: BrokerOptions,
    /// Data dir and log files; removed when the handle is dropped.
    dir: tempfile::TempDir,
    /// Starts so far; each writes its own stderr file.
    generation: u32,
}

impl Broker {
    /// One shard, default settings.
    pub fn start() -> Broker {
        BrokerOptions::default().start()
    }

    pub fn options() -> BrokerOptions {
        BrokerOptions::default()
    }

    pub fn start_with(options: BrokerOptions) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("sluice-test-")
            .tempdir()
            .expect("create a temp dir");
        let addr: SocketAddr = options.listen.unwrap_or_else(|| {
            format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("socket addr")
        });
        let mut b = Broker {
            child: None,
            addr,
            options,
            dir,
            generation: 0,
        };
        b.spawn_and_wait();
        b
    }

    pub fn data_dir(&self) -> PathBuf {
        self.options
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// `host:port` for clients.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn stderr_path(&self, generation: u32) -> PathBuf {
        self.dir.path().join(format!("stderr-{generation}.log"))
    }

    /// Stderr of the latest start (the broker logs there).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path(self.generation)).unwrap_or_default()
    }

    /// The command line of `sluice start` for this broker.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("start")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--cores")
            .arg(self.options.cores.to_string())
            .args(
                self.options
                    .segment_bytes
                    .map(|n| vec!["--segment-bytes".to_string(), n.to_string()])
                    .unwrap_or_default(),
            )
            .args(
                // Kafka's default initial rebalance delay is 3 s; tests form groups at once
                // unless they set it themselves.
                (!self
                    .options
                    .extra_args
                    .iter()
                    .any(|a| a == REBALANCE_DELAY_FLAG))
                .then_some([REBALANCE_DELAY_FLAG, "0"])
                .into_iter()
                .flatten(),
            )
            .args(&self.options.extra_args)
            .env_remove("RUST_LOG")
            .envs(self.options.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let (nofile, nofile_hard, address_space) = (
            self.options.fd_soft_limit,
            self.options.fd_hard_limit,
            self.options.address_space_bytes_max,
        );
        if nofile.is_some() || nofile_hard.is_some() || address_space.is_some() {
            use std::os::unix::process::CommandExt;
            // Lowers one soft limit (the hard limit is left alone).
            fn lower(resource: libc::__rlimit_resource_t, soft: u64) -> std::io::Result<()> {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit/setrlimit on a local struct; async-signal-safe.
                unsafe {
                    if libc::getrlimit(resource, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            }
            // SAFETY: only async-signal-safe calls (getrlimit/setrlimit) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(hard) = nofile_hard {
                        let lim = libc::rlimit {
                            rlim_cur: hard,
                            rlim_max: hard,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(soft) = nofile {
                        lower(libc::RLIMIT_NOFILE, soft)?;
                    }
                    if let Some(soft) = address_space {
                        lower(libc::RLIMIT_AS, soft)?;
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        self.generation += 1;
        let log = std::fs::File::create(self.stderr_path(self.generation)).expect("stderr file");
        let log2 = log.try_clone().expect("clone stderr file");
        let child = self
            .command()
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("spawn the sluice binary");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT_MAX;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "sluice exited during start-up with {status}; stderr:\n{}",
                    self.stderr()
                );
            }
            if answers_api_versions(self.addr) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "sluice did not accept connections on {} within {:?}; stderr:\n{}",
                    self.addr,
                    START_WAIT_MAX,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the broker process (by PID).
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("broker is running");
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits (bounded) for the process to exit and reaps it.
    pub fn wait_exit(&mut self, max: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + max;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for exit; returns the exit status (panics if it does not exit in time).
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(EXIT_WAIT_MAX) {
            Some(s) => s,
            None => {
                self.kill_now();
                panic!("sluice did not exit within {EXIT_WAIT_MAX:?} of SIGTERM");
            }
        }
    }

    /// SIGKILL and reap: a crash, nothing gets flushed.
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        assert!(
            self.wait_exit(EXIT_WAIT_MAX).is_some(),
            "sluice survived SIGKILL"
        );
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates `topic` with `partitions` partitions through the CLI.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let out = sluice(
            &[
                "topic",
                "create",
                topic,
                "-p",
                &partitions.to_string(),
                "--brokers",
                &self.bootstrap(),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Produces `per_partition` records to each of `topic`'s first `partitions` partitions
    /// with librdkafka (acks=all), valued `{prefix}p{partition}-{i}`, and waits for all acks.
    pub fn produce_to_partitions(
        &self,
        topic: &str,
        partitions: i32,
        per_partition: usize,
        prefix: &str,
    ) {
        use rdkafka::config::ClientConfig;
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        for part in 0..partitions {
            for i in 0..per_partition {
                let v = format!("{prefix}p{part}-{i}");
                p.send(
                    BaseRecord::<(), String>::to(topic)
                        .partition(part)
                        .payload(&v),
                )
                .expect("enqueue");
            }
        }
        p.flush(Duration::from_secs(30)).expect("flush");
    }

    /// Starts the broker again on the same data dir and port.
    pub fn restart(&mut self) {
        self.spawn_and_wait();
    }

    /// Starts the broker again on the same data dir but a fresh port (for tests whose subject is
    /// the data, not the port).
    pub fn restart_on_new_port(&mut self) {
        self.addr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("socket addr");
        self.spawn_and_wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Show what the broker said, to explain the failure (after a moment to flush).
            std::thread::sleep(Duration::from_millis(300));
            let state = match self.child.as_mut().map(|c| c.try_wait()) {
                None => "not running".to_string(),
                Some(Ok(None)) => "still running".to_string(),
                Some(Ok(Some(s))) => format!("exited with {s}"),
                Some(Err(e)) => format!("unknown ({e})"),
            };
            eprintln!("--- sluice on {} is {state} ---", self.addr);
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- sluice stderr (last {} lines, start #{}) ---",
                tail.len(),
                self.generation
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill_now();
    }
}

/// Whether a broker on `addr` answers an ApiVersions v0 request. A bare TCP connect is not
/// enough: during start-up the port may briefly accept connections that are then reset.
pub fn answers_api_versions(addr: SocketAddr) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    // [len][api key 18][version 0][correlation id][client id: null]
    let mut req = Vec::with_capacity(14);
    req.extend(10i32.to_be_bytes());
    req.extend(18i16.to_be_bytes());
    req.extend(0i16.to_be_bytes());
    req.extend(0x5eed_i32.to_be_bytes());
    req.extend((-1i16).to_be_bytes());
    if s.write_all(&req).is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    i32::from_be_bytes([head[4], head[5], head[6], head[7]]) == 0x5eed
}

/// Runs a command to completion with a deadline; kills it if it runs over.
pub fn run_bounded(mut cmd: Command, stdin: Option<&[u8]>, max: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn command");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut si = child.stdin.take().expect("stdin piped");
        // A command that fails early (e.g. an unreachable broker) exits without reading its
        // input: the broken pipe is its answer, not the harness's failure.
        match si.write_all(input) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
            _ => {}
        }
        drop(si);
    }
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + max;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command {cmd:?} did not finish within {max:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `sluice <args>` (a client command) with a deadline.
pub fn sluice(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(args).env_remove("SLUICE_BROKERS");
    run_bounded(cmd, stdin, CLI_WAIT_MAX)
}

/// A fresh, unique topic name.
pub fn topic_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a file exists and is non-empty (used to sanity-check the data dir).
pub fn non_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// The command line's Kafka client (`sluice-client` over a blocking socket), for tests that
/// send hand-built requests at a chosen version.
pub struct Client(sluice::cli::Client);

impl Client {
    pub fn connect(brokers: &str) -> anyhow::Result<Client> {
        sluice::cli::connect(brokers).map(Client)
    }

    /// Sends `req` (an `api` request) at `version` and waits for its response.
    pub fn call_at<R: kafka_protocol::protocol::Request>(
        &mut self,
        api: kafka_protocol::messages::ApiKey,
        version: i16,
        req: &R,
    ) -> anyhow::Result<R::Response> {
        assert_eq!(api as i16, R::KEY, "request type and API key disagree");
        futures_lite::future::block_on(self.0.call_at(req, version))
    }

    /// IncrementalAlterConfigs (v1) of one key on GROUP resource `group`: SET `value`, or
    /// DELETE with `None`. The resource's error code.
    pub fn alter_group_config(&mut self, group: &str, key: &str, value: Option<&str>) -> i16 {
        use kafka_protocol::messages::incremental_alter_configs_request::*;
        use kafka_protocol::messages::{ApiKey, IncrementalAlterConfigsResponse};
        use kafka_protocol::protocol::StrBytes;
        let s = |x: &str| StrBytes::from_string(x.to_string());
        let r: IncrementalAlterConfigsResponse = self
            .call_at(
                ApiKey::IncrementalAlterConfigs,
                1,
                &IncrementalAlterConfigsRequest::default().with_resources(vec![
                    AlterConfigsResource::default()
                        .with_resource_type(32)
                        .with_resource_name(s(group))
                        .with_configs(vec![AlterableConfig::default()
                            .with_name(s(key))
                            // 0 SET, 1 DELETE.
                            .with_config_operation(if value.is_some() { 0 } else { 1 })
                            .with_value(value.map(s))]),
                ]),
            )
            .expect("incremental alter configs");
        r.responses[0].error_code
    }

    /// Asks FindCoordinator (v2) for `group` until a coordinator answers, at most `within`.
    pub fn wait_coordinator(&mut self, group: &str, within: Duration) {
        use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, FindCoordinatorResponse};
        let deadline = Instant::now() + within;
        loop {
            let r: FindCoordinatorResponse = self
                .call_at(
                    ApiKey::FindCoordinator,
                    2,
                    &FindCoordinatorRequest::default().with_key(
                        kafka_protocol::protocol::StrBytes::from_string(group.into()),
                    ),
                )
                .expect("find coordinator");
            if r.error_code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no coordinator: {}",
                r.error_code
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
