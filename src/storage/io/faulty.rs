//! Fault-injecting storage I/O for tests: [`FaultyIo`] wraps the real [`DmaIo`] and, as its
//! shared [`Faults`] say, fails writes with ENOSPC or EIO, tears writes in half, fails syncs and
//! reads, or holds writes, and, when asked to (`Faults::model_power`), keeps what a power cut would
//! leave of every file: [`Faults::power_cut`] puts each file back to the bytes that a completed
//! fdatasync or durable write covered, dropping every write not yet synced. Owned by the storage
//! tests; compiled only into test builds and with the
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
    /// `has_data_from` and `data_end_from` cannot tell written data from pre-allocated space
    /// while set: the first answers true, the second `u64::MAX` (a file system without
    /// `SEEK_DATA`/`SEEK_HOLE`, or an `lseek` that failed).
    pub data_unknown: Cell<bool>,
    /// Writes at or past this file position wait while it is set (a slow disk region).
    pub hold_writes_from: Cell<Option<u64>>,
    /// The process crashed: every later write, sync, allocation, punch, truncation, open for
    /// create and removal fails with EIO and changes nothing (I/O already issued completes).
    pub crashed: Cell<bool>,
    /// Counts of operations seen, for assertions on group commit.
    pub writes: Cell<u64>,
    pub syncs: Cell<u64>,
    /// File-system syncs (`StorageIo::sync_fs`: a shard's background sync round).
    pub fs_syncs: Cell<u64>,
    /// Bytes returned by segment reads.
    pub read_bytes: Cell<u64>,
    pub durable_writes: Cell<u64>,
    pub removed: RefCell<Vec<PathBuf>>,
    /// The process crashes (`crashed` is set) at the N+1-th file sync, truncation, removal or
    /// directory sync from now on, which fails: a kill at every step of a multi-step change.
    pub crash_after_ops: Cell<Option<u32>>,
    /// Files opened while set keep a model of their durable bytes, for [`Faults::power_cut`].
    pub model_power: Cell<bool>,
    durable: RefCell<Vec<Rc<RefCell<Durable>>>>,
}

/// What a power cut leaves of one file: its bytes as of the last completed fdatasync or
/// durable write, and the completed writes no fdatasync has covered yet.
struct Durable {
    path: PathBuf,
    bytes: Vec<u8>,
    unsynced: Vec<(u64, Vec<u8>)>,
}

impl Durable {
    /// A sync that covered `covered` (the unsynced writes when it was issued) ended: they are
    /// durable if it succeeded, else unsynced again, ahead of the writes completed meanwhile.
    fn settle(&mut self, covered: Vec<(u64, Vec<u8>)>, ok: bool) {
        if ok {
            for (pos, data) in &covered {
                self.apply(*pos, data);
            }
        } else {
            let later = std::mem::replace(&mut self.unsynced, covered);
            self.unsynced.extend(later);
        }
    }

    fn apply(&mut self, pos: u64, data: &[u8]) {
        let (from, to) = (pos as usize, pos as usize + data.len());
        if self.bytes.len() < to {
            self.bytes.resize(to, 0);
        }
        self.bytes[from..to].copy_from_slice(data);
    }
}

impl Faults {
    /// What every sync meets, of a file or of the file system: the slow-disk delay, then a
    /// crash point or an injected failure.
    async fn sync_faults(&self) -> io::Result<()> {
        let delay_ms = self.sync_delay_ms.get();
        if delay_ms > 0 {
            glommio::timer::sleep(std::time::Duration::from_millis(delay_ms)).await;
        }
        if self.crash_point() || self.sync_fails.get() {
            return Err(eio());
        }
        Ok(())
    }

    /// Counts one metadata-changing operation for `crash_after_ops`; true once crashed.
    fn crash_point(&self) -> bool {
        match self.crash_after_ops.get() {
            Some(0) => {
                self.crash_after_ops.set(None);
                self.crashed.set(true);
            }
            Some(n) => self.crash_after_ops.set(Some(n - 1)),
            None => {}
        }
        self.crashed.get()
    }

    /// The power fails: every write that no completed fdatasync or durable write covered is
    /// lost. Call once the log is gone (after `crashed` was set and its I/O drained): each file
    /// opened under `model_power` is rewritten with its durable bytes. Metadata (sizes,
    /// allocations, truncations, punched ranges) is modelled as durable at once.
    pub fn power_cut(&self) -> io::Result<()> {
        self.crashed.set(true);
        for d in self.durable.borrow().iter() {
            let d = d.borrow();
            if d.path.exists() {
                std::fs::write(&d.path, &d.bytes)?;
            }
        }
        Ok(())
    }
}

/// Real files with injected faults: the seam used by the ENOSPC / I/O-error tests.
pub struct FaultyIo {
    pub faults: Rc<Faults>,
}

struct FaultySegment {
    inner: Rc<dyn SegmentFile>,
    faults: Rc<Faults>,
    durable: Option<Rc<RefCell<Durable>>>,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}
fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultySegment {
    /// The faults every write may meet, plain or durable: counted, held while
    /// `hold_writes_from` covers it, failed after a crash or on a full disk, or torn (its first
    /// half written, then EIO).
    async fn write_faults(&self, buf: &Rc<DmaBuffer>, pos: u64) -> io::Result<()> {
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
        Ok(())
    }
}

impl SegmentFile for FaultySegment {
    fn write_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.write_faults(&buf, pos).await?;
            let data = self.durable.as_ref().map(|_| buf.as_bytes().to_vec());
            self.inner.write_at(buf, pos).await?;
            if let (Some(d), Some(data)) = (&self.durable, data) {
                d.borrow_mut().unsynced.push((pos, data));
            }
            Ok(())
        })
    }
    fn write_durable_at(&self, buf: Rc<DmaBuffer>, pos: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = &self.faults;
            f.durable_writes.set(f.durable_writes.get() + 1);
            self.write_faults(&buf, pos).await?;
            let delay_ms = f.sync_delay_ms.get();
            if delay_ms > 0 {
                glommio::timer::sleep(std::time::Duration::from_millis(delay_ms)).await;
            }
            if f.sync_fails.get() {
                // The bytes may have reached the file, but are not known to be durable.
                self.inner.write_at(buf, pos).await?;
                return Err(eio());
            }
            let data = self.durable.as_ref().map(|_| buf.as_bytes().to_vec());
            // Like every I/O issued before a crash, it completes (and is durable).
            self.inner.write_durable_at(buf, pos).await?;
            if let (Some(d), Some(data)) = (&self.durable, data) {
                d.borrow_mut().apply(pos, &data);
            }
            Ok(())
        })
    }
    fn read_at(&self, pos: u64, len: usize) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            if self.faults.read_fails.get() {
                return Err(eio());
            }
            let r = self.inner.read_at(pos, len).await?;
            let f = &self.faults;
            f.read_bytes.set(f.read_bytes.get() + r.len() as u64);
            Ok(r)
        })
    }
    fn sync(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = &self.faults;
            f.syncs.set(f.syncs.get() + 1);
            f.sync_faults().await?;
            // The sync covers the writes completed before it was issued.
            let covered = self
                .durable
                .as_ref()
                .map(|d| std::mem::take(&mut d.borrow_mut().unsynced));
            let r = self.inner.sync().await;
            if let (Some(d), Some(covered)) = (&self.durable, covered) {
                d.borrow_mut().settle(covered, r.is_ok());
            }
            r
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
            self.inner.allocate(len).await?;
            if let Some(d) = &self.durable {
                let mut d = d.borrow_mut();
                if (d.bytes.len() as u64) < len {
                    d.bytes.resize(len as usize, 0);
                }
            }
            Ok(())
        })
    }
    fn punch(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.faults.crashed.get() {
                return Err(eio());
            }
            self.inner.punch(pos, len).await?;
            if let Some(d) = &self.durable {
                let mut d = d.borrow_mut();
                let end = ((pos + len) as usize).min(d.bytes.len());
                if (pos as usize) < end {
                    d.bytes[pos as usize..end].fill(0);
                }
            }
            Ok(())
        })
    }
    fn has_data_from(&self, pos: u64) -> IoFuture<'_, bool> {
        if self.faults.data_unknown.get() {
            return Box::pin(async { Ok(true) });
        }
        self.inner.has_data_from(pos)
    }
    fn data_end_from(&self, pos: u64) -> IoFuture<'_, u64> {
        if self.faults.data_unknown.get() {
            return Box::pin(async { Ok(u64::MAX) });
        }
        self.inner.data_end_from(pos)
    }
    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.faults.crash_point() {
                return Err(eio());
            }
            self.inner.truncate(len).await?;
            if let Some(d) = &self.durable {
                let mut d = d.borrow_mut();
                d.bytes.truncate(len as usize);
                d.unsynced.retain(|(pos, _)| *pos < len);
                for (pos, data) in d.unsynced.iter_mut() {
                    data.truncate((len - *pos) as usize);
                }
            }
            Ok(())
        })
    }
    fn renamed(&self, path: &Path) {
        self.inner.renamed(path);
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
            let durable = if self.faults.model_power.get() {
                // What is in the file when it is opened survives a power cut (recovery syncs it).
                let d = Rc::new(RefCell::new(Durable {
                    bytes: std::fs::read(&path)?,
                    path: path.clone(),
                    unsynced: vec![],
                }));
                self.faults.durable.borrow_mut().push(d.clone());
                Some(d)
            } else {
                None
            };
            Ok(Rc::new(FaultySegment {
                inner,
                faults: self.faults.clone(),
                durable,
            }) as Rc<dyn SegmentFile>)
        })
    }
    fn sync_dir(&self, dir: &Path) -> IoFuture<'_, ()> {
        if self.faults.crash_point() {
            return Box::pin(async { Err(eio()) });
        }
        DmaIo.sync_dir(dir)
    }
    fn remove(&self, path: &Path) -> IoFuture<'_, ()> {
        if self.faults.crash_point() {
            return Box::pin(async { Err(eio()) });
        }
        self.faults.removed.borrow_mut().push(path.to_path_buf());
        DmaIo.remove(path)
    }
    /// Like an fdatasync of every file opened here: the writes completed before the call
    /// become durable once it succeeds.
    fn sync_fs(&self, dirs: Vec<PathBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = &self.faults;
            f.fs_syncs.set(f.fs_syncs.get() + 1);
            f.sync_faults().await?;
            let covered: Vec<_> = f
                .durable
                .borrow()
                .iter()
                .map(|d| (d.clone(), std::mem::take(&mut d.borrow_mut().unsynced)))
                .collect();
            let r = DmaIo.sync_fs(dirs).await;
            for (d, covered) in covered {
                d.borrow_mut().settle(covered, r.is_ok());
            }
            r
        })
    }
    /// Storages sharing their [`Faults`] share the files a `sync_fs` settles.
    fn sync_domain(&self) -> usize {
        Rc::as_ptr(&self.faults) as usize
    }
}
