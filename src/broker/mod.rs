//! The broker process, the composition root: checks and tunes the process, opens the metadata
//! log and the producer-id allocator, builds the context every shard shares, installs the signal
//! handler, starts one pinned executor per shard and waits for them to stop. Nothing below
//! imports this module; it wires them together.
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | [`run`]: start-up order, signals, shutdown |
//! | `process.rs` | process guards and tuning: data-dir lock, port check, fd limit, allocator |
//! | `environment.rs` | the start-up environment report, systemd readiness notifications |
//! | `launch.rs` | the pinned executors and what each shard does from start to stop |
//! | `metrics.rs` | the Prometheus endpoint (`--metrics-listen`), served off the shards |

use std::sync::Arc;

use crate::admin::ProducerIds;
use crate::config::BrokerConfig;
use crate::metadata::MetadataStore;
use crate::shard::{self, BrokerContext, Job};

mod environment;
mod launch;
mod metrics;
mod process;

pub use process::tune_allocator;

/// Starts the broker and blocks until it has shut down.
pub fn run(mut config: BrokerConfig) -> Result<(), String> {
    // Contained panics are logged once by their catcher; others by the default hook.
    crate::contain::install_hook();
    crate::fault::init();
    process::tune_allocator();
    process::raise_fd_limit();
    let _lock = process::lock_data_dir(&config.data_dir)?;
    // Absolute from here on: direct-I/O files are opened by absolute path, and logs name it.
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|e| format!("cannot resolve data dir {}: {e}", config.data_dir.display()))?;
    process::check_port_free(config.listen)?;
    environment::report(&config);
    // A single node keeps its metadata in the metadata log; a cluster in the controller's raft
    // log, whose entries the controller applies once the shards run.
    let store =
        match config.cluster {
            None => Some(MetadataStore::open(&config.data_dir).map_err(|e| {
                format!("cannot open metadata in {}: {e}", config.data_dir.display())
            })?),
            Some(_) => {
                // The producer-id block lives there too.
                let meta = config.data_dir.join("__meta");
                std::fs::create_dir_all(&meta)
                    .map_err(|e| format!("cannot create {}: {e}", meta.display()))?;
                None
            }
        };
    let producer_ids = ProducerIds::open(&config.data_dir)
        .map_err(|e| format!("cannot open the producer id block: {e}"))?;
    let image = store
        .as_ref()
        .map(|s| s.image().clone())
        .unwrap_or_default();
    let n = config.shard_count();
    let mut inboxes = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = async_channel::bounded::<Job>(shard::INBOX_DEPTH_MAX);
        inboxes.push(tx);
        receivers.push(rx);
    }
    let broker = Arc::new(BrokerContext::new(config.clone(), image, inboxes));

    // Signals: the first SIGINT/SIGTERM starts a graceful shutdown.
    {
        let broker = broker.clone();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        std::thread::Builder::new()
            .name("sluice-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "shutting down");
                    environment::notify_service_manager("STOPPING=1");
                    broker.begin_shutdown();
                }
            })
            .map_err(|e| e.to_string())?;
    }

    // Bound before the shards start, so a taken port fails start-up with the others; a scrape
    // before the shards run waits for their inboxes (or reports them missing).
    let metrics_addr = match config.metrics_listen {
        Some(addr) => Some(metrics::start(broker.clone(), addr)?),
        None => None,
    };
    let handles = launch::start_shards(&broker, receivers, (store, producer_ids))?;
    tracing::info!(
        node = config.node_id,
        cluster = config.cluster.is_some(),
        listen = %config.listen,
        shards = n,
        data_dir = %config.data_dir.display(),
        metrics = %metrics_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        "sluice started"
    );
    if let Err(e) = crate::config::StatusRecord::new(&config).write(&config.data_dir) {
        tracing::warn!(error = %e, "cannot write the status file");
    }
    environment::notify_service_manager("READY=1");
    for h in handles {
        let _ = h.join();
    }
    tracing::info!("sluice stopped");
    Ok(())
}
