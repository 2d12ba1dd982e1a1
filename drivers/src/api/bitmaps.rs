//! A disk's named dirty bitmaps: what changed since a point in time, for incremental
//! backups (QEMU's `block-dirty-bitmap-*`).
//!
//! Each bitmap is a [`DirtyBitmap`] shared by every reactor. The enabled ones form the
//! disk's *tracking set*, which every channel reads at its disk's generation like the
//! driver and the filter: a change (write, zero write, discard) marks each of them once
//! it reached the driver, on whatever reactor or export it came from, with atomic bit
//! operations and no lock. The set changes (a bitmap added, removed, enabled or
//! disabled) only while the disk is quiesced, so a bitmap made at an instant holds
//! exactly the changes that completed after it; clearing and merging need no quiesce
//! (a change racing a clear stays marked, which only copies a range once more).
//!
//! These bitmaps live in memory: they last as long as the disk is served. Storing them
//! in the qcow2 image (the bitmaps extension) is not built yet.

use std::sync::{Arc, Mutex};

use super::bitmap::DirtyBitmap;

/// The granularities a named bitmap may have, as QEMU accepts.
pub const MIN_GRANULARITY: u64 = 512;
pub const MAX_GRANULARITY: u64 = 2 << 30;
/// Named bitmaps per disk.
pub const MAX_BITMAPS: usize = 64;
/// The longest name (QEMU's limit for a qcow2 bitmap name).
pub const MAX_NAME: usize = 1023;
/// The most memory one bitmap may take (a bit per chunk): 8 TiB at 64 KiB, 1 TiB at
/// 8 KiB; a finer granularity over a large disk is refused, naming the coarsest that
/// fits.
pub const MAX_BITMAP_BYTES: u64 = 16 << 20;

/// One named bitmap.
#[derive(Clone)]
pub struct NamedBitmap {
    pub name: String,
    pub map: Arc<DirtyBitmap>,
    pub enabled: bool,
}

/// What a bitmap request got wrong (the message names the bitmap or the value).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error("no bitmap named {0:?}")]
    NotFound(String),
    #[error("a bitmap named {0:?} exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
}

/// The bitmaps of one disk.
#[derive(Default)]
pub struct Bitmaps {
    list: Mutex<Vec<NamedBitmap>>,
}

impl Bitmaps {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<NamedBitmap>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every bitmap, in the order they were added.
    pub fn all(&self) -> Vec<NamedBitmap> {
        self.list().clone()
    }

    pub fn get(&self, name: &str) -> Result<NamedBitmap, BitmapError> {
        self.list()
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))
    }

    /// The enabled bitmaps: what every change marks.
    pub(crate) fn tracking(&self) -> Arc<[Arc<DirtyBitmap>]> {
        self.list().iter().filter(|b| b.enabled).map(|b| b.map.clone()).collect()
    }

    /// Checks a new bitmap's name and granularity over a disk of `size` bytes.
    pub fn check_new(&self, name: &str, granularity: u64, size: u64) -> Result<(), BitmapError> {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(BitmapError::Invalid(format!(
                "bitmap name {name:?} must be 1 to {MAX_NAME} bytes without control characters"
            )));
        }
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(BitmapError::Invalid(format!(
                "granularity {granularity} is not a power of two from {MIN_GRANULARITY} to \
                 {MAX_GRANULARITY}"
            )));
        }
        if size.div_ceil(granularity).div_ceil(8) > MAX_BITMAP_BYTES {
            let least = (size.div_ceil(MAX_BITMAP_BYTES * 8)).next_power_of_two();
            return Err(BitmapError::Invalid(format!(
                "granularity {granularity} over {size} bytes needs more than {MAX_BITMAP_BYTES} \
                 bytes of bitmap; use {least} or more"
            )));
        }
        let l = self.list();
        if l.iter().any(|b| b.name == name) {
            return Err(BitmapError::Exists(name.to_string()));
        }
        if l.len() >= MAX_BITMAPS {
            return Err(BitmapError::Invalid(format!(
                "the disk has {MAX_BITMAPS} bitmaps already"
            )));
        }
        Ok(())
    }

    pub(crate) fn add(&self, b: NamedBitmap) -> Result<(), BitmapError> {
        self.check_new(&b.name, b.map.granularity(), b.map.len())?;
        self.list().push(b);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Result<NamedBitmap, BitmapError> {
        let mut l = self.list();
        let i = l
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
        Ok(l.remove(i))
    }

    /// Enables or disables `name`; whether that changed anything.
    pub(crate) fn set_enabled(&self, name: &str, on: bool) -> Result<bool, BitmapError> {
        let mut l = self.list();
        let b = l
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
        Ok(std::mem::replace(&mut b.enabled, on) != on)
    }
}

impl super::Bdev {
    /// The disk's named bitmaps.
    pub fn bitmaps(&self) -> &Bitmaps {
        &self.bitmaps
    }

    /// Adds a clean bitmap, tracking changes from now on when `enabled`; the disk is
    /// quiesced, so no change in flight is half-seen.
    pub fn add_bitmap(
        &self,
        q: &super::Quiesced,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<Arc<DirtyBitmap>, BitmapError> {
        self.bitmaps.check_new(name, granularity, self.info.size)?;
        let map = Arc::new(DirtyBitmap::new(self.info.size, granularity));
        self.bitmaps.add(NamedBitmap { name: name.to_string(), map: map.clone(), enabled })?;
        self.retrack(q);
        Ok(map)
    }

    pub fn remove_bitmap(&self, q: &super::Quiesced, name: &str) -> Result<(), BitmapError> {
        self.bitmaps.remove(name)?;
        self.retrack(q);
        Ok(())
    }

    /// Starts or stops `name` tracking changes.
    pub fn enable_bitmap(
        &self,
        q: &super::Quiesced,
        name: &str,
        on: bool,
    ) -> Result<(), BitmapError> {
        if self.bitmaps.set_enabled(name, on)? {
            self.retrack(q);
        }
        Ok(())
    }

    /// Publishes the tracking set to the channels (at their next request).
    fn retrack(&self, q: &super::Quiesced) {
        assert_eq!(q.id(), self.id, "bitmaps change while their own disk is quiesced");
        let t = self.bitmaps.tracking();
        self.stack.lock().unwrap_or_else(|p| p.into_inner()).tracking = t;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}
