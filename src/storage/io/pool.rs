//! The shard's bounded cache of open segment descriptors.
//!
//! A segment file ([`PooledSegment`]) holds its path, not a descriptor: each operation takes
//! the file's descriptor from the shard's [`FilePool`], opening it (glommio `DmaFile`, an
//! asynchronous open on io_uring) when it is not open, and the descriptor stays open for the
//! next operation until the pool needs its room. The pool holds at most `max` descriptors:
//! opening one more first closes the least recently used descriptor that no operation is
//! using; when every one is in use, the operation waits for one to be released (first come,
//! first served). An operation holds one descriptor at a time and only for the duration of
//! one I/O, so waiting cannot deadlock. So a shard's descriptors do not grow with its
//! partitions and segments, and pressure costs re-opens, never `EMFILE`.
//!
//! Reopening a file is safe for the log: writes are `O_DIRECT` (their errors come back on the
//! write itself, not on a later fdatasync through whichever descriptor was open then), and an
//! fdatasync through any descriptor of the file covers the file's data.
//!
//! The pool is per thread (one per shard executor), sized by [`set_open_files_max`]; the
//! broker derives the size from `RLIMIT_NOFILE` and the shard count.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use glommio::sync::{Semaphore, StaticPermit};

use super::{probe_device_once, write_whole, IoFuture, ReadBuf, SegmentFile, ALIGN_BYTES};

/// Descriptors a shard keeps open when nothing set a size (tests, tools): small enough for the
/// usual soft limit of 1,024 with sockets on top.
pub const OPEN_FILES_DEFAULT: usize = 256;

/// The fewest descriptors a pool is given: a handful of partitions can each flush, read and
/// roll (two files at once) without waiting on each other.
pub const OPEN_FILES_MIN: usize = 8;

/// Idle descriptors looked at, oldest first, to find one to close before waiting: the least
/// recently used ones are almost always idle, and the bound keeps an open O(1) when many are
/// busy.
const EVICT_SCAN_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Option<Rc<FilePool>>> = const { RefCell::new(None) };
}

/// Sizes this thread's pool: descriptors opened from now on count against `max` (at least
/// [`OPEN_FILES_MIN`]). Files opened before keep the pool they were opened with.
pub fn set_open_files_max(max: usize) {
    let pool = FilePool::new(max.max(OPEN_FILES_MIN));
    POOL.with(|p| *p.borrow_mut() = Some(pool));
}

/// `(open, max)` of this thread's pool.
pub fn open_files() -> (usize, usize) {
    let pool = pool();
    (pool.max - pool.permits.available() as usize, pool.max)
}

fn pool() -> Rc<FilePool> {
    POOL.with(|p| {
        p.borrow_mut()
            .get_or_insert_with(|| FilePool::new(OPEN_FILES_DEFAULT))
            .clone()
    })
}

pub struct FilePool {
    max: usize,
    /// One unit per open descriptor; a [`Handle`] holds its unit until it is dropped.
    permits: Rc<Semaphore>,
    /// Open descriptors by last use: (use stamp) -> the slot holding it.
    lru: RefCell<BTreeMap<u64, Weak<Slot>>>,
    clock: Cell<u64>,
    /// Operations waiting for a unit: a descriptor whose operation ends is then closed at
    /// once (its unit handed on) instead of staying open idle.
    waiting: Cell<usize>,
}

impl FilePool {
    fn new(max: usize) -> Rc<Self> {
        Rc::new(FilePool {
            max,
            permits: Rc::new(Semaphore::new(max as u64)),
            lru: RefCell::new(BTreeMap::new()),
            clock: Cell::new(0),
            waiting: Cell::new(0),
        })
    }

    /// A unit for one more descriptor: free, or freed by closing an idle one, or waited for.
    async fn permit(&self) -> io::Result<StaticPermit> {
        loop {
            if let Ok(p) = self.permits.try_acquire_static_permit(1) {
                return Ok(p);
            }
            match self.take_idle() {
                Some(h) => h.close().await,
                None => {
                    self.waiting.set(self.waiting.get() + 1);
                    let _waiting = Waiting(self);
                    return self
                        .permits
                        .acquire_static_permit(1)
                        .await
                        .map_err(|e| io::Error::other(e.to_string()));
                }
            }
        }
    }

    /// Takes the least recently used descriptor no operation holds out of its slot.
    fn take_idle(&self) -> Option<Rc<Handle>> {
        let mut stale = Vec::new();
        let mut found = None;
        // Upgraded slots are dropped only after the borrow ends (a slot's drop edits `lru`).
        let mut keep = Vec::new();
        {
            let lru = self.lru.borrow();
            for (&stamp, weak) in lru.iter().take(EVICT_SCAN_MAX) {
                let Some(slot) = weak.upgrade() else {
                    stale.push(stamp);
                    continue;
                };
                let idle = slot
                    .handle
                    .borrow()
                    .as_ref()
                    .is_some_and(|h| Rc::strong_count(h) == 1);
                let open = slot.handle.borrow().is_some();
                if !open {
                    stale.push(stamp);
                } else if idle {
                    stale.push(stamp);
                    found = slot.handle.borrow_mut().take();
                    slot.stamp.set(0);
                    keep.push(slot);
                    break;
                }
                keep.push(slot);
            }
        }
        {
            let mut lru = self.lru.borrow_mut();
            for s in stale {
                lru.remove(&s);
            }
        }
        drop(keep);
        found
    }

    fn touch(&self, slot: &Rc<Slot>) {
        let stamp = self.clock.get() + 1;
        self.clock.set(stamp);
        let mut lru = self.lru.borrow_mut();
        let old = slot.stamp.replace(stamp);
        if old != 0 {
            lru.remove(&old);
        }
        lru.insert(stamp, Rc::downgrade(slot));
    }

    fn forget(&self, slot: &Slot) {
        let old = slot.stamp.replace(0);
        if old != 0 {
            if let Ok(mut lru) = self.lru.try_borrow_mut() {
                lru.remove(&old);
            }
        }
    }
}

/// Counts an operation waiting for a unit while it does (also when its future is dropped).
struct Waiting<'a>(&'a FilePool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get() - 1);
    }
}

/// One operation's use of a slot's descriptor. When it ends and others wait for a unit, the
/// descriptor, if no other operation uses it, is closed and its unit handed on.
struct InUse {
    handle: Option<Rc<Handle>>,
    slot: Rc<Slot>,
}

impl std::ops::Deref for InUse {
    type Target = DmaFile;
    fn deref(&self) -> &DmaFile {
        self.handle.as_ref().expect("held until dropped").file()
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let Some(h) = self.handle.take() else {
            return;
        };
        if self.slot.pool.waiting.get() == 0 {
            return;
        }
        let ours = self
            .slot
            .handle
            .borrow()
            .as_ref()
            .is_some_and(|s| Rc::ptr_eq(s, &h));
        // The slot's reference and ours: nobody else is using it.
        if ours && Rc::strong_count(&h) == 2 {
            self.slot.release();
        }
        // Dropping the last reference closes the descriptor (glommio closes it on the next
        // reactor turn) and releases its unit to the first waiter.
        drop(h);
    }
}

/// One open descriptor and its unit of the pool.
struct Handle {
    file: Option<DmaFile>,
    _permit: StaticPermit,
}

impl Handle {
    fn file(&self) -> &DmaFile {
        self.file.as_ref().expect("open until closed")
    }
    /// Closes the descriptor, then releases its unit.
    async fn close(self: Rc<Self>) {
        if let Ok(mut h) = Rc::try_unwrap(self) {
            if let Some(f) = h.file.take() {
                let _ = f.close().await;
            }
        }
    }
}

/// One way of opening one file (plain, or `O_DSYNC`), and its descriptor while open.
struct Slot {
    path: RefCell<PathBuf>,
    flags: i32,
    pool: Rc<FilePool>,
    handle: RefCell<Option<Rc<Handle>>>,
    /// Its key in the pool's `lru` while it holds a descriptor (0: none).
    stamp: Cell<u64>,
    /// (device, inode) of the file the first open of either of its segment's slots found. A
    /// later open that finds another file at the path (the log cleaner renamed a rewritten
    /// segment over it, or retention unlinked it) fails instead of reading the new file at the
    /// old file's positions.
    identity: Rc<Cell<Option<(u64, u64)>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.forget(self);
    }
}

impl Slot {
    fn new(
        path: PathBuf,
        flags: i32,
        pool: Rc<FilePool>,
        identity: Rc<Cell<Option<(u64, u64)>>>,
    ) -> Rc<Self> {
        Rc::new(Slot {
            path: RefCell::new(path),
            flags,
            pool,
            handle: RefCell::new(None),
            stamp: Cell::new(0),
            identity,
        })
    }

    /// The open descriptor, opened (creating the file when `create`) if it is not.
    async fn get(self: &Rc<Self>, create: bool) -> io::Result<InUse> {
        let in_use = |h: Rc<Handle>| InUse {
            handle: Some(h),
            slot: self.clone(),
        };
        if let Some(h) = self.handle.borrow().clone() {
            self.pool.touch(self);
            return Ok(in_use(h));
        }
        let permit = self.pool.permit().await?;
        if let Some(h) = self.handle.borrow().clone() {
            // Opened by another operation meanwhile.
            self.pool.touch(self);
            return Ok(in_use(h));
        }
        let path = self.path.borrow().clone();
        let known_dev = self.identity.get().map(|(dev, _)| dev);
        probe_device_once(path.parent().unwrap_or(Path::new(".")), known_dev).await;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .custom_flags(self.flags)
            .dma_open(&path)
            .await?;
        let id = identity(&file)?;
        match self.identity.get() {
            None => self.identity.set(Some(id)),
            Some(first) if first != id => {
                let _ = file.close().await;
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} was replaced since it was opened", path.display()),
                ));
            }
            Some(_) => {}
        }
        let h = Rc::new(Handle {
            file: Some(file),
            _permit: permit,
        });
        let first = self.handle.borrow().clone();
        let h = match first {
            // Two operations raced to open it: keep the first, close ours.
            Some(first) => {
                h.close().await;
                first
            }
            None => h,
        };
        *self.handle.borrow_mut() = Some(h.clone());
        self.pool.touch(self);
        Ok(in_use(h))
    }

    /// Gives the descriptor back (closed once no operation holds it).
    fn release(&self) {
        let h = self.handle.borrow_mut().take();
        self.pool.forget(self);
        drop(h);
    }
}

/// (device, inode) of an open file. The `fstat` runs here, on the executor: on an open
/// descriptor it reads the in-memory inode and does no device I/O, and the blocking pool is one
/// thread per shard that runs jobs in order, so putting it there made every descriptor open —
/// the first durable write of a segment among them — wait behind whatever the pool was doing
/// (an index append, a metadata log fdatasync).
fn identity(file: &DmaFile) -> io::Result<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fstat on a descriptor `file` owns and keeps open, into a zeroed stat we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// Whether written data lies at or past `pos`, by `lseek(SEEK_DATA)` (ENXIO: none). Runs here,
/// on the executor, like [`identity`]: it is asked once per crash recovery of an active
/// segment, and reads the extent map the recovery's scan has just walked. Any other error
/// answers true (the caller then truncates, which is always safe).
fn data_from(file: &DmaFile, pos: u64) -> bool {
    seek(file, pos, libc::SEEK_DATA)
        .map_or_else(|e| e.raw_os_error() != Some(libc::ENXIO), |_| true)
}

/// Where the written data at or past `pos` ends, by `lseek(SEEK_HOLE)`; `u64::MAX` on any
/// error (ENXIO included: `pos` past the file's end), which bounds nothing. On the executor,
/// like [`data_from`]: asked once per crash recovery of an active segment.
fn hole_from(file: &DmaFile, pos: u64) -> u64 {
    seek(file, pos, libc::SEEK_HOLE).unwrap_or(u64::MAX)
}

/// `lseek(pos, whence)` on `file`'s descriptor: the position it answers.
fn seek(file: &DmaFile, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor `file` owns and keeps open; O_DIRECT I/O here passes its
    // own offsets, so the file position it moves is not used.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

async fn size_at(path: PathBuf) -> io::Result<u64> {
    glommio::executor()
        .spawn_blocking(move || Ok(std::fs::metadata(path)?.len()))
        .await
}

/// A segment file whose descriptors come from the shard's [`FilePool`].
pub struct PooledSegment {
    path: RefCell<PathBuf>,
    main: Rc<Slot>,
    /// A second descriptor of the same file opened with `O_DSYNC`, for durable writes; opened
    /// at the first one and given back when the file is truncated (the segment is sealed, or
    /// recovered).
    dsync: Rc<Slot>,
}

impl PooledSegment {
    /// A segment file at `path`. With `create` the file is created (and its descriptor kept
    /// open: it is about to be written); otherwise it must exist, and is opened at its first
    /// use.
    pub async fn open(path: PathBuf, create: bool) -> io::Result<Self> {
        let pool = pool();
        let identity = Rc::new(Cell::new(None));
        let seg = PooledSegment {
            main: Slot::new(path.clone(), 0, pool.clone(), identity.clone()),
            dsync: Slot::new(path.clone(), libc::O_DSYNC, pool, identity),
            path: RefCell::new(path),
        };
        if create {
            seg.main.get(true).await?;
        } else {
            // Fail now, as an open would, rather than at the first read.
            let path = seg.path.borrow().clone();
            size_at(path).await?;
        }
        Ok(seg)
    }
}

impl SegmentFile for PooledSegment {
    fn write_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            write_whole(&h, buf, pos).await
        })
    }
    fn write_durable_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let h = self.dsync.get(false).await?;
            write_whole(&h, buf, pos).await
        })
    }
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            let r = if pos.is_multiple_of(ALIGN_BYTES) && (len as u64).is_multiple_of(ALIGN_BYTES) {
                h.read_at_aligned(pos, len).await?
            } else {
                h.read_at(pos, len).await?
            };
            Ok(ReadBuf::Dma(r))
        })
    }
    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(h.fdatasync().await?)
        })
    }
    fn allocate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(h.pre_allocate(len, false).await?)
        })
    }
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(h.deallocate(pos, len).await?)
        })
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        // A truncation seals the segment (or ends its recovery): no more durable writes soon.
        self.dsync.release();
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(h.truncate(len).await?)
        })
    }
    fn renamed(&self, path: &Path) {
        *self.path.borrow_mut() = path.to_path_buf();
        *self.main.path.borrow_mut() = path.to_path_buf();
        *self.dsync.path.borrow_mut() = path.to_path_buf();
    }
    fn has_data_from(&self, pos: u64) -> IoFuture<'_, bool> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(data_from(&h, pos))
        })
    }
    fn data_end_from(&self, pos: u64) -> IoFuture<'_, u64> {
        Box::pin(async move {
            let h = self.main.get(false).await?;
            Ok(hole_from(&h, pos))
        })
    }
    fn size(&self) -> IoFuture<'_, u64> {
        Box::pin(async move {
            let open = self.main.handle.borrow().clone();
            match open {
                Some(h) => Ok(h.file().file_size().await?),
                // No descriptor needed (nor taken from the pool) to learn the size.
                None => {
                    // Cloned first: a rename during the stat must not find the path borrowed.
                    let path = self.path.borrow().clone();
                    size_at(path).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::run;
    use futures_lite::future::poll_once;
    use std::sync::mpsc;

    /// A job that holds the executor's blocking pool (one thread) until the sender is used
    /// or dropped.
    fn hold_pool() -> (mpsc::Sender<()>, impl std::future::Future<Output = ()>) {
        let (release, released) = mpsc::channel::<()>();
        let held = glommio::executor().spawn_blocking(move || {
            let _ = released.recv();
        });
        (release, held)
    }

    /// Opening a sealed segment without creating it, and asking its size with no descriptor
    /// held, `stat` the file on the blocking pool: behind a job that holds the pool's thread
    /// both are still pending after a poll; released, they resolve (a missing file fails as
    /// an open would).
    #[test]
    fn a_segment_opened_without_creating_it_and_sized_without_a_descriptor_is_stat_on_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        std::fs::write(&path, vec![7u8; 3 * ALIGN_BYTES as usize]).unwrap();
        run(async move {
            let (release, held) = hold_pool();
            let mut opened = Box::pin(PooledSegment::open(path.clone(), false));
            assert!(
                poll_once(&mut opened).await.is_none(),
                "the segment was stat on the executor"
            );
            release.send(()).unwrap();
            let seg = opened.await.unwrap();
            held.await;
            assert!(
                seg.main.handle.borrow().is_none(),
                "opened at its first use"
            );

            let (release, held) = hold_pool();
            let mut size = seg.size();
            assert!(
                poll_once(&mut size).await.is_none(),
                "the size was read on the executor"
            );
            release.send(()).unwrap();
            assert_eq!(size.await.unwrap(), 3 * ALIGN_BYTES);
            held.await;
            assert_eq!(open_files().0, 0, "no descriptor taken to learn the size");

            let missing = PooledSegment::open(path.with_extension("gone"), false).await;
            assert_eq!(missing.err().unwrap().kind(), io::ErrorKind::NotFound);
        });
    }

    /// The first open of a segment file looks at its directory's device (whether glommio has
    /// probed it) with a `stat` on the blocking pool: behind a job that holds the pool's
    /// thread, a new segment is not created even once a later open on the executor has
    /// completed; released, it is.
    #[test]
    fn a_first_open_looks_at_the_device_on_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("00000000000000000000.log");
        let second = dir.path().join("00000000000000000100.log");
        run(async move {
            // The device is probed by the first segment (the pool free).
            PooledSegment::open(first.clone(), true).await.unwrap();
            let (release, held) = hold_pool();
            let mut opened = Box::pin(PooledSegment::open(second.clone(), true));
            assert!(poll_once(&mut opened).await.is_none());
            // An open submitted after: once it completes, an open the first poll had
            // submitted would have completed too.
            DmaFile::open(&first).await.unwrap().close().await.unwrap();
            assert!(poll_once(&mut opened).await.is_none());
            assert!(
                !second.exists(),
                "the directory was looked at on the executor"
            );
            release.send(()).unwrap();
            opened.await.unwrap();
            held.await;
            assert!(second.exists());
        });
    }

    /// `has_data_from` tells written data from holes and from pre-allocated space never
    /// written (ENXIO: none), and answers true for a position `lseek` cannot take, so that the
    /// caller truncates rather than keep what it cannot see.
    #[test]
    fn data_past_a_position_is_told_from_holes_and_pre_allocated_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&path).unwrap();
            // A hole of eight blocks, then one written block.
            f.write_all_at(&[7u8; ALIGN_BYTES as usize], 8 * ALIGN_BYTES)
                .unwrap();
        }
        run(async move {
            let seg = PooledSegment::open(path.clone(), false).await.unwrap();
            assert!(seg.has_data_from(0).await.unwrap(), "data behind the hole");
            assert!(seg.has_data_from(8 * ALIGN_BYTES).await.unwrap());
            assert!(
                !seg.has_data_from(9 * ALIGN_BYTES).await.unwrap(),
                "at the end"
            );
            seg.allocate(64 * ALIGN_BYTES).await.unwrap();
            assert_eq!(seg.size().await.unwrap(), 64 * ALIGN_BYTES);
            assert!(
                !seg.has_data_from(9 * ALIGN_BYTES).await.unwrap(),
                "pre-allocated, never written"
            );
            let file = DmaFile::open(&path).await.unwrap();
            assert!(data_from(&file, u64::MAX), "an offset lseek cannot take");
            file.close().await.unwrap();
        });
    }

    /// A reopened descriptor (and so the write or read that needed it) does not wait for the
    /// blocking pool: its identity check is an `fstat` on the executor.
    #[test]
    fn a_reopened_descriptor_does_not_wait_for_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        std::fs::write(&path, vec![7u8; ALIGN_BYTES as usize]).unwrap();
        run(async move {
            let seg = PooledSegment::open(path.clone(), false).await.unwrap();
            // The first open probes the device and records the file's identity.
            assert_eq!(&*seg.read_at(0, 1).await.unwrap(), &[7u8][..]);
            seg.main.release();
            assert!(seg.main.handle.borrow().is_none());
            let (release, held) = hold_pool();
            assert_eq!(&*seg.read_at(0, 1).await.unwrap(), &[7u8][..]);
            assert!(seg.main.handle.borrow().is_some(), "reopened");
            release.send(()).unwrap();
            held.await;
        });
    }
}
