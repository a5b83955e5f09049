//! Small typed ids and offsets used across modules, so that an offset and a partition index
//! cannot be swapped silently, and the clock ([`Clock`]) everything time-driven reads.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A Kafka log offset (defined with the batch codec, whose headers carry it).
pub use sluice_protocol::Offset;

/// Index of a shard (one glommio executor pinned to one core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub usize);

/// A partition index within a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub i32);

/// A (topic, partition) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
    /// `<topic>-<partition>`: the partition's directory name under the data dir.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.topic, self.partition)
    }
}
/// A (topic, partition) key as borrowed parts: looks a [`TopicPartition`] up in a map without
/// building one (no `String` per lookup). Hashes and compares as `TopicPartition`'s derived
/// `Hash`/`Eq` do: the topic's `str`, then the partition.
pub trait PartitionKey {
    fn parts(&self) -> (&str, i32);
}

impl PartitionKey for TopicPartition {
    fn parts(&self) -> (&str, i32) {
        (&self.topic, self.partition)
    }
}

impl PartitionKey for (&str, i32) {
    fn parts(&self) -> (&str, i32) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn PartitionKey + 'a> for TopicPartition {
    fn borrow(&self) -> &(dyn PartitionKey + 'a) {
        self
    }
}

impl std::hash::Hash for dyn PartitionKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let (topic, partition) = self.parts();
        topic.hash(h);
        partition.hash(h);
    }
}

impl PartialEq for dyn PartitionKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn PartitionKey + '_ {}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Milliseconds since the Unix epoch, as Kafka timestamps are (the wall clock; code that a test
/// should be able to drive reads a [`Clock`] instead).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The time seam: what a log, a group coordinator or a timer loop reads the time from and sleeps
/// on. [`Clock::system`] (the default, used by the broker) is the wall clock for timestamps
/// ([`Clock::now_ms`]), the monotonic clock for intervals ([`Clock::now`]) and glommio's timers
/// for sleeps: one predictable branch on top of the calls it replaces. [`Clock::fake`] reads a
/// [`FakeClock`] that moves only when a test advances it, waking every sleeper whose deadline
/// has passed, so a test can let seven days pass without waiting for them. Per shard (`Rc`).
#[derive(Clone, Default)]
pub struct Clock {
    fake: Option<Rc<FakeClock>>,
}

impl Clock {
    /// The real clocks.
    pub fn system() -> Clock {
        Clock { fake: None }
    }

    /// A clock that reads `fake`.
    pub fn fake(fake: &Rc<FakeClock>) -> Clock {
        Clock {
            fake: Some(fake.clone()),
        }
    }

    /// Milliseconds since the Unix epoch.
    #[inline]
    pub fn now_ms(&self) -> i64 {
        match &self.fake {
            None => now_ms(),
            Some(f) => f
                .start_ms
                .saturating_add(f.elapsed.get().as_millis() as i64),
        }
    }

    /// A monotonic instant, for intervals and deadlines.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.fake {
            None => Instant::now(),
            Some(f) => f.start + f.elapsed.get(),
        }
    }

    /// Resolves once `d` has passed on this clock. The deadline is fixed when this is called.
    pub fn sleep(&self, d: Duration) -> Sleep {
        match &self.fake {
            None => {
                // Taken before the timer's own deadline (`Timer::new` reads the clock after
                // this), so this one is never later: see `SystemSleep`.
                let deadline = Instant::now().checked_add(d);
                Sleep::System(SystemSleep {
                    timer: glommio::timer::Timer::new(d),
                    deadline,
                    registered: None,
                })
            }
            Some(f) => {
                let id = f.next_id.get();
                f.next_id.set(id + 1);
                Sleep::Fake(FakeSleep {
                    deadline: f.elapsed.get().saturating_add(d),
                    clock: f.clone(),
                    id,
                })
            }
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fake {
            None => f.write_str("Clock::system"),
            Some(c) => write!(f, "Clock::fake(+{:?})", c.elapsed.get()),
        }
    }
}

/// The future of [`Clock::sleep`].
pub enum Sleep {
    System(SystemSleep),
    Fake(FakeSleep),
}

/// A sleep on the system clock: glommio's timer, polled again only when that can change
/// something.
///
/// Each poll of a glommio `Timer` that is not due takes it out of the reactor's timer map and
/// puts it back with a clone of the waker. A task that polls its sleep on every wake-up (the
/// partition flusher waits on its writes, its sync and its sync timer at once) paid that on
/// every write. Here a sleep already registered with a waker that wakes the same task, and not
/// yet due, answers `Pending` without touching the timer: the reactor still holds it and will
/// wake that task.
///
/// Why that is safe: `deadline` is read before glommio reads its own, so it is never later
/// than the instant glommio fires at. Once glommio fired (and dropped its registration), the
/// clock has passed `deadline` too, and the poll goes to the timer, which answers `Ready`.
pub struct SystemSleep {
    timer: glommio::timer::Timer,
    /// `None` when the deadline is past what `Instant` holds: always asks the timer.
    deadline: Option<Instant>,
    /// The waker the timer holds, once it was polled and not due.
    registered: Option<Waker>,
}

impl SystemSleep {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let (Some(deadline), Some(w)) = (self.deadline, &self.registered) {
            if w.will_wake(cx.waker()) && Instant::now() < deadline {
                return Poll::Pending;
            }
        }
        match Pin::new(&mut self.timer).poll(cx) {
            Poll::Ready(_) => {
                self.registered = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                match &mut self.registered {
                    Some(w) => w.clone_from(cx.waker()),
                    None => self.registered = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// A sleep on a [`FakeClock`]; registered with the clock while pending, removed when dropped.
pub struct FakeSleep {
    clock: Rc<FakeClock>,
    deadline: Duration,
    id: u64,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Sleep::System(t) => t.poll(cx),
            Sleep::Fake(s) => {
                if s.clock.elapsed.get() >= s.deadline {
                    return Poll::Ready(());
                }
                let mut sleepers = s.clock.sleepers.borrow_mut();
                match sleepers.iter_mut().find(|e| e.id == s.id) {
                    Some(e) => e.waker.clone_from(cx.waker()),
                    None => sleepers.push(Sleeper {
                        id: s.id,
                        deadline: s.deadline,
                        waker: cx.waker().clone(),
                    }),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for FakeSleep {
    fn drop(&mut self) {
        self.clock.sleepers.borrow_mut().retain(|e| e.id != self.id);
    }
}

struct Sleeper {
    id: u64,
    deadline: Duration,
    waker: Waker,
}

/// Time that passes only when [`FakeClock::advance`] says so (tests). Starts at a given wall
/// time and at the real monotonic instant it was made at.
pub struct FakeClock {
    start: Instant,
    start_ms: i64,
    elapsed: Cell<Duration>,
    /// Every pending sleep: its deadline (as elapsed time) and waker.
    sleepers: RefCell<Vec<Sleeper>>,
    next_id: Cell<u64>,
}

impl FakeClock {
    /// A clock that reads `start_ms` (ms since the epoch) until advanced.
    pub fn new(start_ms: i64) -> Rc<FakeClock> {
        Rc::new(FakeClock {
            start: Instant::now(),
            start_ms,
            elapsed: Cell::new(Duration::ZERO),
            sleepers: RefCell::new(Vec::new()),
            next_id: Cell::new(0),
        })
    }

    /// Moves time forward by `d` and wakes every sleep whose deadline is now past.
    pub fn advance(&self, d: Duration) {
        let now = self.elapsed.get().saturating_add(d);
        self.elapsed.set(now);
        let due: Vec<Waker> = {
            let mut sleepers = self.sleepers.borrow_mut();
            let (due, rest): (Vec<_>, Vec<_>) = sleepers.drain(..).partition(|e| e.deadline <= now);
            *sleepers = rest;
            due.into_iter().map(|e| e.waker).collect()
        };
        for w in due {
            w.wake();
        }
    }

    /// Time advanced so far.
    pub fn elapsed(&self) -> Duration {
        self.elapsed.get()
    }

    /// Pending sleeps that have been polled and are not yet due (a test can wait for a timer
    /// loop to be asleep again).
    pub fn sleepers(&self) -> usize {
        self.sleepers.borrow().len()
    }

    /// Sleeps made on this clock so far (a test can count the timers a loop arms).
    pub fn sleeps_made(&self) -> u64 {
        self.next_id.get()
    }
}

/// A Kafka error code as it travels between functions. It becomes the wire's `i16` (with
/// [`ErrorCode::get`]) only where a response struct is filled, so a code cannot be confused
/// with a count, an epoch or an API version on the way. `Debug` prints the error's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorCode(i16);

impl ErrorCode {
    /// No error.
    pub const NONE: ErrorCode = ErrorCode(0);

    pub const fn new(e: kafka_protocol::ResponseError) -> ErrorCode {
        ErrorCode(e.code())
    }

    /// The code as the protocol encodes it.
    pub const fn get(self) -> i16 {
        self.0
    }

    pub const fn is_error(self) -> bool {
        self.0 != 0
    }
}

impl From<kafka_protocol::ResponseError> for ErrorCode {
    fn from(e: kafka_protocol::ResponseError) -> ErrorCode {
        ErrorCode::new(e)
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match kafka_protocol::ResponseError::try_from_code(self.0) {
            None => f.write_str("NONE"),
            Some(kafka_protocol::ResponseError::Unknown(c)) => write!(f, "ErrorCode({c})"),
            Some(e) => write!(f, "{e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Clock, ErrorCode, FakeClock};
    use std::time::Duration;

    #[test]
    fn a_fake_clock_moves_and_wakes_sleepers_only_when_advanced() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(async {
                let fake = FakeClock::new(1_000);
                let clock = Clock::fake(&fake);
                let t0 = clock.now();
                assert_eq!(clock.now_ms(), 1_000);
                let woke = std::rc::Rc::new(std::cell::Cell::new(false));
                let sleeper = {
                    let (clock, woke) = (clock.clone(), woke.clone());
                    glommio::spawn_local(async move {
                        clock.sleep(Duration::from_secs(60)).await;
                        woke.set(true);
                    })
                };
                while fake.sleepers() == 0 {
                    futures_lite::future::yield_now().await;
                }
                fake.advance(Duration::from_secs(59));
                futures_lite::future::yield_now().await;
                assert!(!woke.get(), "woke before its deadline");
                fake.advance(Duration::from_secs(1));
                sleeper.await;
                assert!(woke.get());
                assert_eq!(clock.now_ms(), 61_000);
                assert_eq!(clock.now() - t0, Duration::from_secs(60));
                // A sleep whose deadline has passed resolves at once.
                clock.sleep(Duration::ZERO).await;
            });
    }

    /// A system sleep polled again and again before its deadline (a task woken by other
    /// futures polls it each time) resolves at its deadline, not before and not never; one
    /// polled by a task and then moved to another wakes the other.
    #[test]
    fn a_system_sleep_polled_often_or_moved_to_another_task_wakes_at_its_deadline() {
        use std::time::Instant;
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(async {
                let clock = Clock::system();
                let start = Instant::now();
                let mut sleep = std::pin::pin!(clock.sleep(Duration::from_millis(30)));
                let mut polls = 0u32;
                std::future::poll_fn(|cx| {
                    polls += 1;
                    let r = std::future::Future::poll(sleep.as_mut(), cx);
                    if r.is_pending() {
                        cx.waker().wake_by_ref(); // woken at once, as by another future
                    }
                    r
                })
                .await;
                assert!(start.elapsed() >= Duration::from_millis(30));
                assert!(polls > 1, "{polls}");

                let mut sleep = Box::pin(clock.sleep(Duration::from_millis(20)));
                assert!(futures_lite::future::poll_once(sleep.as_mut())
                    .await
                    .is_none());
                let moved = glommio::spawn_local(sleep);
                // Bounds the failure only: the sleep wakes its new task after ~20 ms.
                let bound = glommio::timer::Timer::new(Duration::from_secs(30));
                let woke = futures_lite::future::or(
                    async {
                        moved.await;
                        true
                    },
                    async {
                        bound.await;
                        false
                    },
                )
                .await;
                assert!(woke, "the task the sleep moved to was never woken");
                assert!(start.elapsed() >= Duration::from_millis(50));
            });
    }

    use kafka_protocol::ResponseError;

    #[test]
    fn error_code_names_itself() {
        assert_eq!(format!("{:?}", ErrorCode::NONE), "NONE");
        let e = ErrorCode::from(ResponseError::UnknownTopicOrPartition);
        assert_eq!(e.get(), 3);
        assert!(e.is_error() && !ErrorCode::NONE.is_error());
        assert_eq!(format!("{e:?}"), "UnknownTopicOrPartition");
        assert_eq!(format!("{:?}", ErrorCode(-12345)), "ErrorCode(-12345)");
    }
}
