//! Fault-injecting storage I/O for tests: [`FaultyIo`] wraps the real [`DmaIo`] and, as its
//! shared [`Faults`] say, fails writes with ENOSPC or EIO, tears writes in half, fails syncs and
//! reads, or holds writes. Owned by the storage tests; compiled only into test builds and with the
//! `fault-injection` feature, never into a release binary.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::DmaBuffer;

use super::{align_down, DmaIo, IoFuture, ReadBuf, SegmentFile, StorageIo};

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
