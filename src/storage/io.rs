//! The I/O seam of the storage engine: every byte the log moves to or from a segment file goes
//! through [`StorageIo`] / [`SegmentFile`]. [`DmaIo`] is the real implementation (glommio
//! `DmaFile`, O_DIRECT on io_uring); `FaultyIo` (test builds only) wraps it to inject ENOSPC, I/O
//! errors and torn writes. Lives on one shard (`Rc`, futures are `!Send`).
//!
//! Small metadata files (indexes, checkpoints, the producer snapshot, the clean-shutdown marker)
//! are read and written with `std::fs` by `meta`; they are touched only on open, roll,
//! close and DeleteRecords, never per append.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, ReadResult};

#[cfg(any(test, feature = "fault-injection"))]
mod faulty;
mod pool;
#[cfg(any(test, feature = "fault-injection"))]
pub use faulty::{Faults, FaultyIo};
pub use pool::{open_files, set_open_files_max, PooledSegment, OPEN_FILES_DEFAULT, OPEN_FILES_MIN};

/// Direct-I/O alignment we use for positions and lengths. 4 KiB satisfies every device we run on
/// (512-byte and 4 KiB logical sectors) and equals the page size.
pub const ALIGN_BYTES: u64 = 4096;

pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

#[inline]
pub fn align_down(v: u64) -> u64 {
    v & !(ALIGN_BYTES - 1)
}
#[inline]
pub fn align_up(v: u64) -> u64 {
    (v + ALIGN_BYTES - 1) & !(ALIGN_BYTES - 1)
}

/// Bytes read from a segment: a glommio DMA buffer or (in tests) plain memory.
pub enum ReadBuf {
    Dma(ReadResult),
    Mem(Vec<u8>),
}

impl Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBuf::Dma(r) => r,
            ReadBuf::Mem(v) => v,
        }
    }
}

/// One open segment file. Contract: `write_at` takes an aligned position and a buffer whose
/// length is a multiple of [`ALIGN_BYTES`], and either writes all of it or fails; `read_at` may
/// return fewer bytes than asked at the end of the file; `sync` is fdatasync.
pub trait SegmentFile {
    fn write_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()>;
    /// `write_at` that completes only once its bytes are on stable storage (an `O_DSYNC`
    /// write: the kernel makes it durable on completion, with a FUA write where the device
    /// has one, else a cache flush). It vouches for its own range only, not for earlier
    /// writes to the file.
    fn write_durable_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()>;
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf>;
    fn sync(&self) -> IoFuture<'_, ()>;
    /// Reserves blocks up to `len` bytes; the file size becomes `len` (reads past the written
    /// data return zeros), so later writes inside it change no file size.
    fn allocate(&self, len: u64) -> IoFuture<'_, ()>;
    /// Releases `[pos, pos+len)`; reads there return zeros afterwards.
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()>;
    fn truncate(&self, len: u64) -> IoFuture<'_, ()>;
    fn size(&self) -> IoFuture<'_, u64>;
    /// Whether written data lies at or past `pos` (`lseek(SEEK_DATA)`): pre-allocated space
    /// never written counts as none where the file system tells them apart (ext4, XFS). True
    /// where it cannot be told, which costs the caller a truncation, never data.
    fn has_data_from(&self, pos: u64) -> IoFuture<'_, bool>;
    /// Where the written data that `pos` lies in (or the first written data at or past it)
    /// ends (`lseek(SEEK_HOLE)`, block-aligned, at most the file size): pre-allocated space
    /// never written counts as a hole where the file system tells them apart (ext4, XFS).
    /// `u64::MAX` where it cannot be told, so a caller that bounds a read by it reads as far
    /// as it would have without.
    fn data_end_from(&self, pos: u64) -> IoFuture<'_, u64>;
    /// The file was renamed to `path` (the log cleaner's swap): descriptors opened from now on
    /// open it there.
    fn renamed(&self, _path: &Path) {}
}

/// Opens, syncs and removes files of one storage directory tree.
pub trait StorageIo {
    /// Opens a segment for reading and writing, creating it when `create`.
    fn open(&self, path: &Path, create: bool) -> IoFuture<'_, Rc<dyn SegmentFile>>;
    fn sync_dir(&self, dir: &Path) -> IoFuture<'_, ()>;
    fn remove(&self, path: &Path) -> IoFuture<'_, ()>;
    /// Makes every write that completed before the call durable on each file system holding
    /// one of `dirs`, for every file at once ([`sync_file_systems`]: one `syncfs` per file
    /// system, then a directory fsync for a device cache flush after all it wrote). A
    /// directory that no longer exists holds nothing to sync.
    fn sync_fs(&self, dirs: Vec<PathBuf>) -> IoFuture<'_, ()>;
    /// Storages of one domain reach the same files the same way, so one [`StorageIo::sync_fs`]
    /// through any of them serves the logs of all (a shard's sync rounds group logs by it).
    /// Every [`DmaIo`] is of the one production domain, 0.
    fn sync_domain(&self) -> usize {
        0
    }
}

/// The production implementation: glommio `DmaFile`s (O_DIRECT through io_uring), their
/// descriptors taken from the shard's bounded pool ([`PooledSegment`]).
pub struct DmaIo;

impl DmaIo {
    /// This thread's one `DmaIo`, shared by the logs of the shard instead of one allocation
    /// each.
    pub fn shared() -> Rc<dyn StorageIo> {
        thread_local! {
            static SHARED: Rc<DmaIo> = Rc::new(DmaIo);
        }
        SHARED.with(|io| io.clone() as Rc<dyn StorageIo>)
    }
}

async fn write_whole(file: &DmaFile, buf: Rc<DmaBuffer>, pos: u64) -> io::Result<()> {
    debug_assert_eq!(pos % ALIGN_BYTES, 0);
    let len = buf.len();
    debug_assert_eq!(len as u64 % ALIGN_BYTES, 0);
    let n = file.write_rc_at(buf, pos).await?;
    if n != len {
        // O_DIRECT writes inside pre-allocated space are not expected to be short; treat
        // one as a failed write so the appender retries the whole range.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write {n} of {len} at {pos}"),
        ));
    }
    Ok(())
}

thread_local! {
    /// Devices (st_dev) whose io_uring poll-ring support glommio has already probed here.
    static PROBED_DEVICES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Held while a probe runs: the opens of other logs (a shard opens many at once at start)
    /// wait for it, so none can be the first file glommio opens on the device.
    static PROBE_TURN: Rc<glommio::sync::Semaphore> = Rc::new(glommio::sync::Semaphore::new(1));
}

/// glommio decides once per device and thread whether reads may use the io_uring poll ring, by
/// reading the first block of the first file it opens there. When that file is empty the read
/// succeeds without reaching the device, the poll ring is wrongly enabled, and every later read
/// fails with EOPNOTSUPP on devices without poll queues (virtio disks, for one). So before the
/// first segment of a device is opened on this thread, let the probe run on a small file that
/// holds real data.
///
/// `known_dev` is the device of the file about to be opened when a previous open of it found
/// it (a reopen): the directory is then not looked at. Otherwise the directory's `stat`, and
/// the probe file's write and removal, run on the blocking pool.
async fn probe_device_once(dir: &Path, known_dev: Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    let probed = |dev: u64| PROBED_DEVICES.with(|p| p.borrow().contains(&dev));
    if known_dev.is_some_and(probed) {
        return;
    }
    let stat_dir = dir.to_path_buf();
    let Ok(dev) = glommio::executor()
        .spawn_blocking(move || std::fs::metadata(stat_dir).map(|m| m.dev()))
        .await
    else {
        return;
    };
    if probed(dev) {
        return;
    }
    let turn = PROBE_TURN.with(|t| t.clone());
    let _turn = turn.acquire_permit(1).await;
    if probed(dev) {
        return;
    }
    let probe = dir.join(".dma-probe");
    let written = {
        let probe = probe.clone();
        glommio::executor()
            .spawn_blocking(move || std::fs::write(probe, vec![0x5a; ALIGN_BYTES as usize]))
            .await
    };
    if written.is_ok() {
        if let Ok(f) = DmaFile::open(&probe).await {
            let _ = f.close().await;
        }
    }
    let _ = glommio::executor()
        .spawn_blocking(move || std::fs::remove_file(probe))
        .await;
    // Only now: until the probe is done, every other open on this thread waits above.
    PROBED_DEVICES.with(|p| p.borrow_mut().push(dev));
}

impl StorageIo for DmaIo {
    fn open(&self, path: &Path, create: bool) -> IoFuture<'_, Rc<dyn SegmentFile>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            Ok(Rc::new(PooledSegment::open(path, create).await?) as Rc<dyn SegmentFile>)
        })
    }
    fn sync_dir(&self, dir: &Path) -> IoFuture<'_, ()> {
        let dir = dir.to_path_buf();
        Box::pin(async move {
            let d = glommio::io::Directory::open(&dir).await?;
            d.sync().await?;
            d.close().await?;
            Ok(())
        })
    }
    fn remove(&self, path: &Path) -> IoFuture<'_, ()> {
        let path = path.to_path_buf();
        Box::pin(async move { Ok(glommio::io::remove(&path).await?) })
    }
    fn sync_fs(&self, dirs: Vec<PathBuf>) -> IoFuture<'_, ()> {
        // Blocking calls: on the shard's blocking thread pool, never on its executor.
        Box::pin(async move {
            glommio::executor()
                .spawn_blocking(move || sync_file_systems(&dirs))
                .await
        })
    }
}

/// Blocking: makes every write that completed before the call durable on each file system
/// holding one of `dirs`, with one `syncfs` per file system (told apart by device number),
/// whatever the number of directories on it. Directories that no longer exist are skipped.
pub(crate) fn sync_file_systems(dirs: &[PathBuf]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    fn skip_gone<T>(r: io::Result<T>) -> io::Result<Option<T>> {
        match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            r => r.map(Some),
        }
    }
    let mut synced: smallvec::SmallVec<[(u64, std::fs::File); 1]> = smallvec::SmallVec::new();
    for dir in dirs {
        // A `stat` per directory (start-up passes one per log); a descriptor per file system.
        let Some(meta) = skip_gone(std::fs::metadata(dir))? else {
            continue;
        };
        if synced.iter().any(|(d, _)| *d == meta.dev()) {
            continue;
        }
        let Some(f) = skip_gone(std::fs::File::open(dir))? else {
            continue;
        };
        // SAFETY: `f` is an open descriptor for the whole call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        synced.push((meta.dev(), f));
    }
    // ext4 without a journal flushes the device cache inside `syncfs` and may write its last
    // metadata blocks after that flush; an fsync asks for one more flush after all of it.
    for (_, f) in &synced {
        f.sync_all()?;
    }
    Ok(())
}

/// Futures [`join_in_order`] tracks without a heap allocation.
const JOIN_INLINE: usize = 4;

/// Runs `futs` concurrently until all are done and returns the first error in order (only after
/// all finished, so no write is still in flight when the caller reacts to a failure). Whenever
/// the run of leading futures that completed successfully grows, `on_prefix` gets its new length
/// (writes issued in file order: the bytes up to the end of that run are on the file). Allocates
/// nothing for up to `JOIN_INLINE` futures beyond what `futs` holds.
pub async fn join_in_order<'a>(
    mut futs: impl AsMut<[IoFuture<'a, ()>]>,
    mut on_prefix: impl FnMut(usize),
) -> io::Result<()> {
    let mut done: smallvec::SmallVec<[Option<io::Result<()>>; JOIN_INLINE]> =
        futs.as_mut().iter().map(|_| None).collect();
    let mut prefix = 0usize;
    std::future::poll_fn(|cx| {
        for (f, d) in futs.as_mut().iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                if let std::task::Poll::Ready(r) = f.as_mut().poll(cx) {
                    *d = Some(r);
                }
            }
        }
        let before = prefix;
        while prefix < done.len() && matches!(done[prefix], Some(Ok(()))) {
            prefix += 1;
        }
        if prefix > before {
            on_prefix(prefix);
        }
        if done.iter().any(|d| d.is_none()) {
            return std::task::Poll::Pending;
        }
        let first_err = done.iter_mut().find_map(|d| match d.take() {
            Some(Err(e)) => Some(e),
            _ => None,
        });
        std::task::Poll::Ready(first_err.map_or(Ok(()), Err))
    })
    .await
}
