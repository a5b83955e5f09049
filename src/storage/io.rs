//! The I/O seam of the storage engine: every byte the log moves to or from a segment file goes
//! through [`StorageIo`] / [`SegmentFile`]. [`DmaIo`] is the real implementation (glommio
//! `DmaFile`, O_DIRECT on io_uring); [`FaultyIo`] wraps it to inject ENOSPC, I/O errors and torn
//! writes in tests. Lives on one shard (`Rc`, futures are `!Send`).
//!
//! Small metadata files (indexes, checkpoints, the producer snapshot, the clean-shutdown marker)
//! are read and written with `std::fs` by `meta`; they are touched only on open, roll,
//! close and DeleteRecords, never per append.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

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
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf>;
    fn sync(&self) -> IoFuture<'_, ()>;
    /// Reserves blocks up to `len` bytes; the file size becomes `len` (reads past the written
    /// data return zeros), so later writes inside it change no file size.
    fn allocate(&self, len: u64) -> IoFuture<'_, ()>;
    /// Releases `[pos, pos+len)`; reads there return zeros afterwards.
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()>;
    fn truncate(&self, len: u64) -> IoFuture<'_, ()>;
    fn size(&self) -> IoFuture<'_, u64>;
}

/// Opens, syncs and removes files of one storage directory tree.
pub trait StorageIo {
    /// Opens a segment for reading and writing, creating it when `create`.
    fn open(&self, path: &Path, create: bool) -> IoFuture<'_, Rc<dyn SegmentFile>>;
    fn sync_dir(&self, dir: &Path) -> IoFuture<'_, ()>;
    fn remove(&self, path: &Path) -> IoFuture<'_, ()>;
}

/// The production implementation: glommio `DmaFile`s (O_DIRECT through io_uring).
pub struct DmaIo;

struct DmaSegment {
    file: DmaFile,
}

impl SegmentFile for DmaSegment {
    fn write_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            debug_assert_eq!(pos % ALIGN_BYTES, 0);
            let len = buf.len();
            debug_assert_eq!(len as u64 % ALIGN_BYTES, 0);
            let n = self.file.write_rc_at(buf, pos).await?;
            if n != len {
                // O_DIRECT writes inside pre-allocated space are not expected to be short; treat
                // one as a failed write so the appender retries the whole range.
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write {n} of {len} at {pos}"),
                ));
            }
            Ok(())
        })
    }
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            let r = if pos.is_multiple_of(ALIGN_BYTES) && (len as u64).is_multiple_of(ALIGN_BYTES) {
                self.file.read_at_aligned(pos, len).await?
            } else {
                self.file.read_at(pos, len).await?
            };
            Ok(ReadBuf::Dma(r))
        })
    }
    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(self.file.fdatasync().await?) })
    }
    fn allocate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(self.file.pre_allocate(len, false).await?) })
    }
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(self.file.deallocate(pos, len).await?) })
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(self.file.truncate(len).await?) })
    }
    fn size(&self) -> IoFuture<'_, u64> {
        Box::pin(async move { Ok(self.file.file_size().await?) })
    }
}

thread_local! {
    /// Devices (st_dev) whose io_uring poll-ring support glommio has already probed here.
    static PROBED_DEVICES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// glommio decides once per device and thread whether reads may use the io_uring poll ring, by
/// reading the first block of the first file it opens there. When that file is empty the read
/// succeeds without reaching the device, the poll ring is wrongly enabled, and every later read
/// fails with EOPNOTSUPP on devices without poll queues (virtio disks, for one). So before the
/// first segment of a device is opened on this thread, let the probe run on a small file that
/// holds real data.
async fn probe_device_once(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata(dir).map(|m| m.dev()) else {
        return;
    };
    if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
        return;
    }
    PROBED_DEVICES.with(|p| p.borrow_mut().push(dev));
    let probe = dir.join(".dma-probe");
    if std::fs::write(&probe, vec![0x5a; ALIGN_BYTES as usize]).is_ok() {
        if let Ok(f) = DmaFile::open(&probe).await {
            let _ = f.close().await;
        }
    }
    let _ = std::fs::remove_file(&probe);
}

impl StorageIo for DmaIo {
    fn open(&self, path: &Path, create: bool) -> IoFuture<'_, Rc<dyn SegmentFile>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            probe_device_once(path.parent().unwrap_or(Path::new("."))).await;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .dma_open(&path)
                .await?;
            Ok(Rc::new(DmaSegment { file }) as Rc<dyn SegmentFile>)
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
}

/// What [`FaultyIo`] does to the next operations. Shared with the test through `Rc`.
#[derive(Default)]
pub struct Faults {
    /// Writes, allocations and punches fail with ENOSPC while set ("disk full").
    pub disk_full: Cell<bool>,
    /// Pre-allocation fails with ENOSPC while set (files can still be created).
    pub allocate_fails: Cell<bool>,
    /// fdatasync fails with EIO while set.
    pub sync_fails: Cell<bool>,
    /// Every fdatasync takes at least this long while non-zero (a slow disk).
    pub sync_delay_ms: Cell<u64>,
    /// The next N writes fail with EIO after writing only their first half (a torn write).
    pub torn_writes: Cell<u32>,
    /// Reads fail with EIO while set.
    pub read_fails: Cell<bool>,
    /// Writes at or past this file position wait while it is set (a slow disk region).
    pub hold_writes_from: Cell<Option<u64>>,
    /// The process crashed: every later write, sync, allocation, punch, truncation, open for
    /// create and removal fails with EIO and changes nothing (I/O already issued completes).
    pub crashed: Cell<bool>,
    /// Counts of operations seen, for assertions on group commit.
    pub writes: Cell<u64>,
    pub syncs: Cell<u64>,
    pub removed: RefCell<Vec<PathBuf>>,
}

/// Real files with injected faults: the seam used by the ENOSPC / I/O-error tests.
pub struct FaultyIo {
    pub faults: Rc<Faults>,
}

struct FaultySegment {
    inner: Rc<dyn SegmentFile>,
    faults: Rc<Faults>,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}
fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl SegmentFile for FaultySegment {
    fn write_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = &self.faults;
            f.writes.set(f.writes.get() + 1);
            while f.hold_writes_from.get().is_some_and(|from| pos >= from) {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            if f.crashed.get() {
                return Err(eio());
            }
            if f.disk_full.get() {
                return Err(enospc());
            }
            if f.torn_writes.get() > 0 {
                f.torn_writes.set(f.torn_writes.get() - 1);
                let half = align_down(buf.len() as u64 / 2) as usize;
                if half > 0 {
                    let mut part = glommio::allocate_dma_buffer_global(half);
                    part.as_bytes_mut().copy_from_slice(&buf.as_bytes()[..half]);
                    self.inner.write_at(Rc::new(part), pos).await?;
                }
                return Err(eio());
            }
            self.inner.write_at(buf, pos).await
        })
    }
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            if self.faults.read_fails.get() {
                return Err(eio());
            }
            self.inner.read_at(pos, len).await
        })
    }
    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = &self.faults;
            f.syncs.set(f.syncs.get() + 1);
            let delay_ms = f.sync_delay_ms.get();
            if delay_ms > 0 {
                glommio::timer::sleep(std::time::Duration::from_millis(delay_ms)).await;
            }
            if f.sync_fails.get() || f.crashed.get() {
                return Err(eio());
            }
            self.inner.sync().await
        })
    }
    fn allocate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.faults.crashed.get() {
                return Err(eio());
            }
            if self.faults.disk_full.get() || self.faults.allocate_fails.get() {
                return Err(enospc());
            }
            self.inner.allocate(len).await
        })
    }
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.faults.crashed.get() {
                return Err(eio());
            }
            self.inner.punch(pos, len).await
        })
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.faults.crashed.get() {
                return Err(eio());
            }
            self.inner.truncate(len).await
        })
    }
    fn size(&self) -> IoFuture<'_, u64> {
        Box::pin(async move { self.inner.size().await })
    }
}

impl StorageIo for FaultyIo {
    fn open(&self, path: &Path, create: bool) -> IoFuture<'_, Rc<dyn SegmentFile>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            if create && self.faults.crashed.get() {
                return Err(eio());
            }
            if create && self.faults.disk_full.get() {
                return Err(enospc());
            }
            let inner = DmaIo.open(&path, create).await?;
            Ok(Rc::new(FaultySegment {
                inner,
                faults: self.faults.clone(),
            }) as Rc<dyn SegmentFile>)
        })
    }
    fn sync_dir(&self, dir: &Path) -> IoFuture<'_, ()> {
        DmaIo.sync_dir(dir)
    }
    fn remove(&self, path: &Path) -> IoFuture<'_, ()> {
        if self.faults.crashed.get() {
            return Box::pin(async { Err(eio()) });
        }
        self.faults.removed.borrow_mut().push(path.to_path_buf());
        DmaIo.remove(path)
    }
}

/// Runs `futs` concurrently until all are done and returns the first error in order (only after
/// all finished, so no write is still in flight when the caller reacts to a failure). Whenever
/// the run of leading futures that completed successfully grows, `on_prefix` gets its new length
/// (writes issued in file order: the bytes up to the end of that run are on the file).
pub async fn join_in_order(
    mut futs: Vec<IoFuture<'_, ()>>,
    mut on_prefix: impl FnMut(usize),
) -> io::Result<()> {
    let mut done: Vec<Option<io::Result<()>>> = futs.iter().map(|_| None).collect();
    let mut prefix = 0usize;
    std::future::poll_fn(|cx| {
        for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
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
