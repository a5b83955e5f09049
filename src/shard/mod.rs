//! The executor pool: one glommio executor per core, each pinned, each owning a set of
//! partitions. Other shards reach a shard's state only by message ([`invoke_on`]). Knows nothing
//! of Kafka APIs.
//!
//! A cross-shard call ships a `Send` closure to the owner shard, which runs it there and sends
//! the result back; `Bytes` travel by reference count, never by copy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::broker::Broker;
use crate::storage::{BatchCache, PartitionLog};
use crate::types::{ShardId, TopicPartition};

/// A unit of work sent to another shard: builds a local future there.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Queue depth of each shard's inbox; senders wait (back-pressure) when it is full.
pub const INBOX_DEPTH_MAX: usize = 4096;

/// The state one shard owns. Lives on its executor's thread only.
pub struct Shard {
    pub id: ShardId,
    pub broker: Arc<Broker>,
    pub partitions: RefCell<HashMap<TopicPartition, Rc<PartitionLog>>>,
    pub cache: Rc<BatchCache>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Installs the shard state of the calling executor thread.
pub fn install(shard: Rc<Shard>) {
    LOCAL.with(|l| *l.borrow_mut() = Some(shard));
}

/// The shard running on this thread. Panics if called outside a shard executor (a bug).
pub fn local() -> Rc<Shard> {
    LOCAL.with(|l| l.borrow().clone().expect("called outside a shard executor"))
}

/// The shard running on this thread, if any.
pub fn try_local() -> Option<Rc<Shard>> {
    LOCAL.with(|l| l.borrow().clone())
}

impl Shard {
    pub fn partition(&self, tp: &TopicPartition) -> Option<Rc<PartitionLog>> {
        self.partitions.borrow().get(tp).cloned()
    }
}

/// Runs `f` on shard `target` and returns its result. When `target` is the calling shard the
/// closure runs inline, with no hop.
pub async fn invoke_on<F, Fut, R>(target: ShardId, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let here = local();
    if here.id == target {
        return f().await;
    }
    let (tx, rx) = async_channel::bounded::<R>(1);
    let job: Job = Box::new(move || {
        Box::pin(async move {
            let r = f().await;
            let _ = tx.send(r).await;
        })
    });
    let inbox = &here.broker.inboxes[target.0];
    if inbox.send(job).await.is_err() {
        panic!("shard {} inbox closed while the broker runs", target.0);
    }
    rx.recv()
        .await
        .expect("shard dropped a cross-shard call without answering")
}

/// Runs `f` on every shard concurrently and collects the results in shard order.
pub async fn invoke_on_all<F, Fut, R>(f: F) -> Vec<R>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let n = local().broker.inboxes.len();
    let mut tasks = Vec::with_capacity(n);
    for s in 0..n {
        let f = f.clone();
        tasks.push(glommio::spawn_local(invoke_on(ShardId(s), move || f())));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// The message pump of one shard: runs each job sent to it as its own task.
pub async fn serve_inbox(rx: async_channel::Receiver<Job>) {
    while let Ok(job) = rx.recv().await {
        glommio::spawn_local(job()).detach();
    }
}
