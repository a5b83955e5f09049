//! Panic containment, the lowest layer: a future adapter that catches a panic of the future it
//! polls ([`contain`]), the [`Panic`] record that carries what happened (message, location,
//! thread) to whoever awaits the work, and the process panic hook ([`install_hook`]) that stays
//! quiet for contained panics so that each one is logged once, by the code that catches it.
//!
//! glommio does not catch a panic of a task: it unwinds out of the executor and ends the shard's
//! thread, with every connection and partition on it. Work that must not do that runs inside
//! [`contain`]. Knows nothing of Kafka or shards: `shard` builds contained tasks and cross-shard
//! calls on it, and storage (below `shard`) uses it for its background tasks.
//!
//! How the hook knows: a thread-local depth counts the contained futures being polled on this
//! thread. A panic while it is above zero will be caught by one of them, so the hook records
//! message and location in a thread-local for the catcher instead of printing; any other panic
//! gets the default hook's message.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// How many contained futures are being polled on this thread right now.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Message and location of the last panic the hook saw while `DEPTH` was above zero.
    static LAST: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// A caught panic. It travels as a value (over a cross-shard reply channel, in a task's output)
/// and is re-raised with [`Panic::resume`], which unwinds without running the hook again. One
/// that is dropped without being [reported](Panic::mark_reported) logs itself, so a panic whose
/// result nobody awaited is still logged, once.
pub struct Panic {
    /// The panic message (`panic!` arguments, or the payload's type when it is not a string).
    pub message: String,
    /// `file:line:column` of the panic, or `unknown` when no hook recorded it.
    pub location: String,
    /// Name of the thread (shard) it happened on.
    pub thread: String,
    reported: bool,
}

impl Panic {
    /// Turns the payload `catch_unwind` returned into a `Panic`: a re-raised `Panic` as it was,
    /// anything else with the message and location the hook recorded on this thread.
    pub fn from_payload(payload: Box<dyn Any + Send>) -> Panic {
        match payload.downcast::<Panic>() {
            Ok(p) => *p,
            Err(payload) => {
                let recorded = LAST.try_with(|l| l.borrow_mut().take()).ok().flatten();
                let (message, location) =
                    recorded.unwrap_or_else(|| (payload_message(&*payload), "unknown".into()));
                Panic {
                    message,
                    location,
                    thread: std::thread::current()
                        .name()
                        .unwrap_or("unnamed")
                        .to_string(),
                    reported: false,
                }
            }
        }
    }

    /// Re-raises this panic in the calling task; the hook does not run again.
    pub fn resume(self) -> ! {
        std::panic::resume_unwind(Box::new(self))
    }

    /// The caller logged this panic; dropping it stays silent.
    pub fn mark_reported(&mut self) {
        self.reported = true;
    }
}

impl std::fmt::Display for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "panicked at {} on {}: {}",
            self.location, self.thread, self.message
        )
    }
}

impl std::fmt::Debug for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Drop for Panic {
    fn drop(&mut self) {
        if !self.reported {
            tracing::error!(
                "a contained task {self}; nobody awaited its result, the task is gone and its \
                 shard keeps running"
            );
        }
    }
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(p) = payload.downcast_ref::<Panic>() {
        p.message.clone()
    } else {
        "Box<dyn Any>".to_string()
    }
}

/// Installs the process panic hook: panics inside contained work are recorded for their
/// catcher and not printed; every other panic goes to the previous (default) hook. Call once at
/// start-up, before any executor runs.
pub fn install_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let contained = DEPTH.try_with(|d| d.get() > 0).unwrap_or(false);
        if contained {
            let message = payload_message(info.payload());
            let location = info
                .location()
                .map(|l| l.to_string())
                .unwrap_or_else(|| "unknown".into());
            if LAST
                .try_with(|l| *l.borrow_mut() = Some((message, location)))
                .is_ok()
            {
                return;
            }
        }
        previous(info);
    }));
}

/// Wraps `fut` so that a panic while it is polled ends it with `Err(Panic)` instead of
/// unwinding into the executor. The future is dropped right after it panics.
pub fn contain<F: Future>(fut: F) -> Contained<F> {
    Contained { fut: Some(fut) }
}

/// The future [`contain`] returns.
pub struct Contained<F> {
    fut: Option<F>,
}

/// Counts a contained poll on this thread for as long as it lives (also while unwinding).
struct Entered;

impl Entered {
    fn new() -> Entered {
        DEPTH.with(|d| {
            if d.get() == 0 {
                // A panic caught by someone else's catch_unwind may have left a record.
                LAST.with(|l| l.borrow_mut().take());
            }
            d.set(d.get() + 1);
        });
        Entered
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = DEPTH.try_with(|d| d.set(d.get() - 1));
    }
}

impl<F: Future> Future for Contained<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `fut` is never moved out of `self`; it is only polled in place and dropped in
        // place (by assigning `None`), which is what pinning allows.
        let this = unsafe { self.get_unchecked_mut() };
        let fut = this
            .fut
            .as_mut()
            .expect("contained future polled after it completed");
        // SAFETY: see above; `this` itself stays pinned.
        let fut = unsafe { Pin::new_unchecked(fut) };
        let _entered = Entered::new();
        let out = match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(v)) => Ok(v),
            Err(payload) => Err(Panic::from_payload(payload)),
        };
        // Done: drop the future now, still counted as contained (a destructor may panic too).
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| this.fut = None)) {
            drop(Panic::from_payload(payload)); // logs itself
        }
        Poll::Ready(out)
    }
}

/// Spawns `fut` on the calling executor as a background task that is contained: a panic is
/// logged once with `name` and ends that task only. What happens to the work the task did is
/// the spawner's business (see the call sites).
pub fn spawn_background<F>(name: &'static str, fut: F)
where
    F: Future<Output = ()> + 'static,
{
    glommio::spawn_local(async move {
        if let Err(mut p) = contain(fut).await {
            p.mark_reported();
            tracing::error!("background task {name} {p}; the task is stopped");
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T>(f: impl Future<Output = T> + 'static) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(f)
    }

    #[test]
    fn a_panicking_future_ends_with_its_message_and_the_executor_keeps_running() {
        let (message, after) = run(async {
            let r = contain(async {
                glommio::yield_if_needed().await;
                if std::hint::black_box(true) {
                    panic!("boom {}", 7);
                }
                1
            })
            .await;
            let mut p = r.expect_err("the future panicked");
            p.mark_reported();
            let after = contain(async { 2 }).await.expect("no panic");
            (p.message.clone(), after)
        });
        assert_eq!(message, "boom 7");
        assert_eq!(after, 2);
    }

    #[test]
    fn a_resumed_panic_arrives_unchanged_at_the_outer_catcher() {
        let (message, location) = run(async {
            let r = contain(async {
                let inner = contain(async {
                    panic!("inner");
                })
                .await;
                if let Err(p) = inner {
                    p.resume();
                }
            })
            .await;
            let mut p = r.expect_err("re-raised");
            p.mark_reported();
            (p.message.clone(), p.location.clone())
        });
        assert_eq!(message, "inner");
        // Without the hook (unit tests do not install it) the location is unknown.
        assert_eq!(location, "unknown");
    }
}
