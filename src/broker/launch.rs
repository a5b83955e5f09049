//! Launch of the shards: one glommio executor per configured CPU, pinned to it, each installing
//! its [`Shard`] state, opening the partitions it owns, binding its listener and then serving
//! until shutdown. Shard 0 also becomes the metadata owner ([`crate::admin`]) and, in a cluster,
//! runs the controller ([`crate::controller`]).

use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use glommio::{LocalExecutorBuilder, Placement};

use crate::admin::ProducerIds;
use crate::metadata::{configs, MetadataStore};
use crate::shard::{self, BrokerContext, Job, Shard};
use crate::types::{ShardId, TopicPartition};

/// Starts every shard and waits until each has opened its partitions and bound its listener;
/// shard 0 takes the metadata log (none in a cluster) and the producer-id allocator. Returns the executors' handles, or the first start-up error once every shard has stopped.
pub fn start_shards(
    broker: &Arc<BrokerContext>,
    receivers: Vec<async_channel::Receiver<Job>>,
    metadata_owner: (Option<MetadataStore>, ProducerIds),
) -> Result<Vec<glommio::ExecutorJoinHandle<()>>, String> {
    // Before any shard opens a log: the clean-shutdown records of the last run, read into
    // memory and removed durably (each log's open takes its entry).
    let covered = crate::storage::load_shutdown_records(&broker.config.data_dir)
        .map_err(|e| format!("cannot read the clean-shutdown records: {e}"))?;
    tracing::info!("clean-shutdown records read: {covered} logs covered");
    let n = receivers.len();
    let ready = Arc::new(Barrier::new(n + 1));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut metadata_owner = Some(metadata_owner);
    let mut handles = Vec::with_capacity(n);
    for (i, rx) in receivers.into_iter().enumerate() {
        let broker = broker.clone();
        let ready = ready.clone();
        let failed = failed.clone();
        let owner = if i == 0 { metadata_owner.take() } else { None };
        let cpu = broker.config.cpus[i];
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i}"))
            .spawn(move || async move {
                run_shard(ShardId(i), broker, rx, owner, ready, failed).await;
            })
            .map_err(|e| format!("cannot start shard {i} on cpu {cpu}: {e}"))?;
        handles.push(h);
    }
    ready.wait();
    let failed = failed.lock().expect("start-up error slot").clone();
    if let Some(e) = failed {
        broker.begin_shutdown();
        for h in handles {
            let _ = h.join();
        }
        return Err(e);
    }
    Ok(handles)
}

/// Partition logs a shard opens at once at start-up: their reads of small files and segment
/// tails overlap, and the memory of the logs being opened stays bounded.
const START_OPEN_CONCURRENCY: usize = 64;

async fn run_shard(
    id: ShardId,
    broker: Arc<BrokerContext>,
    inbox: async_channel::Receiver<Job>,
    metadata_owner: Option<(Option<MetadataStore>, ProducerIds)>,
    ready: Arc<Barrier>,
    failed: Arc<Mutex<Option<String>>>,
) {
    crate::storage::io::set_open_files_max(super::environment::segment_files_per_shard(
        broker.config.shard_count(),
    ));
    shard::install(Rc::new(Shard::new(id, broker.clone())));
    if !glommio::executor().io_uring_is_cooperative() {
        // Linux < 5.19: each completion from another CPU (disk, network) interrupts this core.
        tracing::warn!(shard = id.0, "io_uring cooperative task running unavailable (Linux 5.19 or newer has it): completions from other CPUs interrupt this shard");
    }
    let mut err = None;
    if let Some((store, producer_ids)) = metadata_owner {
        crate::admin::install(store, producer_ids);
    }
    glommio::spawn_local(shard::serve_inbox(inbox)).detach();
    if let Err(e) = shard::start_partition_transport() {
        err = Some(e);
    }
    if id == crate::controller::CONTROLLER_SHARD && broker.config.cluster.is_some() {
        // The controller opens this node's partitions as it applies the metadata entries.
        if let Err(e) = crate::controller::start() {
            err = Some(e);
        }
    }

    // Open the partitions this shard owns, several at once; their clean-shutdown markers'
    // removals are made durable together, before the shard serves.
    let image = broker.image();
    let mut owned = Vec::new();
    for t in image.topics.values() {
        let lc = configs::log_config(
            &configs::BrokerDefaults::of(&broker.config, &image),
            &t.configs,
        );
        for p in 0..t.partition_count() {
            if broker.owner(t, p) == Some(id) {
                // A partition with a raft group waits for the controller to start it.
                let replicated = t.groups.get(p as usize).is_some();
                owned.push((
                    TopicPartition::new(t.name.clone(), p),
                    lc.clone(),
                    replicated,
                ));
            }
        }
    }
    crate::storage::defer_marker_syncs();
    let mut owned = owned.into_iter();
    loop {
        let wave: Vec<_> = owned
            .by_ref()
            .take(START_OPEN_CONCURRENCY)
            .map(|(tp, lc, replicated)| {
                glommio::spawn_local(async move {
                    let r = shard::open_partition_here(tp.clone(), lc, replicated).await;
                    (tp, r)
                })
            })
            .collect();
        if wave.is_empty() {
            break;
        }
        for task in wave {
            if let (tp, Err(e)) = task.await {
                err = Some(format!("cannot open partition {tp}: {e}"));
            }
        }
    }
    if let Err(e) = crate::storage::sync_deferred_markers().await {
        err = Some(format!(
            "cannot sync the data dir after opening the partitions: {e}"
        ));
    }
    let listener = match err {
        Some(e) => Err(e),
        None => crate::server::bind_listener(broker.config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", broker.config.listen)),
    };
    let listener = match listener {
        Ok(l) => Some(l),
        Err(e) => {
            failed.lock().expect("start-up error slot").get_or_insert(e);
            None
        }
    };
    ready.wait();
    let Some(listener) = listener else {
        if id == crate::controller::CONTROLLER_SHARD {
            crate::controller::stop().await;
        }
        shard::close_partitions().await;
        return;
    };
    crate::contain::spawn_background("retention", retention_loop());
    crate::contain::spawn_background("log cleaner", cleaner_loop());
    crate::group::start_shard_tasks();
    crate::group::share_state::start_shard_tasks();
    crate::txn::start_shard_tasks();
    crate::server::accept_loop(listener).await;
    if id == crate::controller::CONTROLLER_SHARD {
        crate::controller::stop().await;
    }
    shard::close_partitions().await;
}

/// How often each shard applies retention to its logs (Kafka's
/// `log.retention.check.interval.ms` is 5 minutes; a shorter round costs one pass over the
/// shard's segment lists).
const RETENTION_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long each shard's log cleaner waits between rounds over its compacted logs (Kafka's
/// `log.cleaner.backoff.ms`); `SLUICE_CLEANER_BACKOFF_MS` in the broker's environment overrides
/// it (tests).
const CLEANER_BACKOFF: std::time::Duration = std::time::Duration::from_secs(15);
/// Passes over one log in a round: a dirty section larger than the cleaner's map takes several;
/// the rest waits for the next round so the other logs get their turn.
const CLEANER_PASSES_PER_LOG: usize = 8;

/// The shard's log cleaner: one log and one pass at a time (so one key map per shard). A
/// replicated partition's log is cleaned by every replica on its own, below what that replica
/// has committed and applied, keeping every batch (its raft entry) as at least an empty shell
/// (`PartitionLog::compact_replicated`).
async fn cleaner_loop() {
    let clock = shard::local().clock.clone();
    let backoff = std::env::var("SLUICE_CLEANER_BACKOFF_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
        .unwrap_or(CLEANER_BACKOFF);
    loop {
        clock.sleep(backoff).await;
        let here = shard::local();
        let logs: Vec<_> = here
            .partitions
            .borrow()
            .iter()
            // A log whose raft group is not attached yet is raft's: left for a later round.
            .filter(|(tp, _)| !here.awaits_replica(*tp))
            .map(|(tp, log)| (log.clone(), here.replica(tp)))
            .collect();
        for (log, replica) in logs {
            for _ in 0..CLEANER_PASSES_PER_LOG {
                let started = std::time::Instant::now();
                let pass = async {
                    match &replica {
                        // Read at each pass: the bound only grows while the replica runs.
                        Some(r) => {
                            log.compact_replicated(clock.now_ms(), r.cleanable_below())
                                .await
                        }
                        None => log.compact(clock.now_ms()).await,
                    }
                };
                match crate::contain::contain(pass).await {
                    Ok(Ok(Some(r))) => {
                        let took = started.elapsed();
                        crate::stats::log_cleaned(r.bytes_in + r.bytes_mapped, r.bytes_out);
                        tracing::info!(
                            dir = %log.dir().display(), segments_in = r.segments_in,
                            segments_out = r.segments_out, bytes_in = r.bytes_in,
                            bytes_out = r.bytes_out, records_removed = r.records_removed,
                            tombstones_removed = r.tombstones_removed,
                            aborted_batches_removed = r.aborted_batches_removed,
                            markers_removed = r.markers_removed,
                            batches_emptied = r.batches_emptied, replicated = replica.is_some(),
                            cleaned_to = r.cleaned_to.0, ms = took.as_millis() as u64,
                            "log cleaned"
                        );
                        if !r.more {
                            break;
                        }
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(dir = %log.dir().display(), error = %e, "log cleaning failed");
                        break;
                    }
                    Err(mut p) => {
                        p.mark_reported();
                        tracing::error!(dir = %log.dir().display(), "log cleaner {p}; skipped this round");
                        break;
                    }
                }
            }
        }
    }
}

async fn retention_loop() {
    let clock = shard::local().clock.clone();
    loop {
        clock.sleep(RETENTION_CHECK_INTERVAL).await;
        let here = shard::local();
        let logs: Vec<_> = here
            .partitions
            .borrow()
            .iter()
            // A log whose raft group is not attached yet is raft's: left for a later round.
            .filter(|(tp, _)| !here.awaits_replica(*tp))
            .map(|(tp, log)| (log.clone(), here.replica(tp)))
            .collect();
        let now = clock.now_ms();
        for (log, replica) in logs {
            // A replicated partition's log start moves with its raft log (over committed
            // entries only), on every replica.
            let enforced = async {
                match (&replica, log.retention_target(now)) {
                    (Some(r), Some(target)) => r.advance_log_start(target).await.map(|_| ()),
                    (Some(_), None) => Ok(()),
                    (None, _) => log.enforce_retention(now).await,
                }
            };
            // Contained per log: a panic skips that log this round (logged) and the loop goes on.
            match crate::contain::contain(enforced).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed")
                }
                Err(mut p) => {
                    p.mark_reported();
                    tracing::error!(dir = %log.dir().display(), "retention {p}; skipped this round");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The shards' executors come from the patched glommio (crates/glommio/PATCHED.md): their
    /// rings take completions from other CPUs without an interrupt each. Every kernel this
    /// broker supports in production has the flag (5.19+); an older one fails here on purpose.
    #[test]
    fn a_shards_io_uring_rings_run_completions_cooperatively() {
        let cooperative = glommio::LocalExecutorBuilder::default()
            .spawn(|| async { glommio::executor().io_uring_is_cooperative() })
            .expect("executor")
            .join()
            .expect("joined");
        assert!(cooperative);
    }
}
