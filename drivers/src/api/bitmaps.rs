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
//! A bitmap lives in memory while the disk is served. A *persistent* one (qcow2 disks
//! only) is also stored in the image when the disk closes and loaded again when it
//! opens (see `crate::format::qcow2::bitmaps`); one the image held in use at open (a
//! crash before it was stored) is *inconsistent*: it records nothing and may not be
//! read, merged or enabled until it is cleared (which makes it a fresh start) or
//! removed.

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
    /// Stored in the image at close.
    pub persistent: bool,
    /// Loaded in use after a crash: its bits are not trusted.
    pub inconsistent: bool,
}

impl NamedBitmap {
    /// Refuses a bitmap whose bits are not trusted.
    pub fn usable(&self) -> Result<&Self, BitmapError> {
        if self.inconsistent {
            return Err(BitmapError::Inconsistent(self.name.clone()));
        }
        Ok(self)
    }
}

/// What a bitmap request got wrong (the message names the bitmap or the value).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error("no bitmap named {0:?}")]
    NotFound(String),
    #[error("a bitmap named {0:?} exists")]
    Exists(String),
    #[error(
        "bitmap {0:?} is inconsistent (the image was not closed cleanly while it was in use): \
         clear it to start afresh, or remove it"
    )]
    Inconsistent(String),
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
        if on {
            b.usable()?;
        }
        Ok(std::mem::replace(&mut b.enabled, on) != on)
    }

    /// Clears every bit of `name`, which makes an inconsistent bitmap a fresh start.
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        let mut l = self.list();
        let b = l
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
        b.map.clear_all();
        b.inconsistent = false;
        Ok(())
    }

    /// The persistent bitmaps, as the driver stores them.
    pub(crate) fn persistent(&self) -> Vec<crate::driver::StoredBitmap> {
        self.list()
            .iter()
            .filter(|b| b.persistent)
            .map(|b| crate::driver::StoredBitmap {
                name: b.name.clone(),
                map: b.map.clone(),
                auto: b.enabled,
                inconsistent: b.inconsistent,
            })
            .collect()
    }

    /// Registers the bitmaps a driver loaded from its image (recording as stored,
    /// unless the disk is read-only or the bitmap inconsistent).
    pub(crate) fn restore(&self, stored: Vec<crate::driver::StoredBitmap>, read_only: bool) {
        let mut l = self.list();
        for s in stored {
            l.push(NamedBitmap {
                enabled: s.auto && !s.inconsistent && !read_only,
                name: s.name,
                map: s.map,
                persistent: true,
                inconsistent: s.inconsistent,
            });
        }
    }
}

impl super::Bdev {
    /// The disk's named bitmaps.
    pub fn bitmaps(&self) -> &Bitmaps {
        &self.bitmaps
    }

    /// Adds a clean bitmap, tracking changes from now on when `enabled`, stored in the
    /// image at close when `persistent`; the disk is quiesced, so no change in flight
    /// is half-seen.
    pub fn add_bitmap(
        &self,
        q: &super::Quiesced,
        name: &str,
        granularity: u64,
        enabled: bool,
        persistent: bool,
    ) -> Result<Arc<DirtyBitmap>, BitmapError> {
        self.bitmaps.check_new(name, granularity, self.info().size)?;
        if persistent && let Some(why) = self.driver().bitmap_store_refusal() {
            return Err(BitmapError::Invalid(format!("bitmap {name:?} cannot persist: {why}")));
        }
        let map = Arc::new(DirtyBitmap::new(self.info().size, granularity));
        let b = NamedBitmap {
            name: name.to_string(),
            map: map.clone(),
            enabled,
            persistent,
            inconsistent: false,
        };
        self.bitmaps.add(b)?;
        self.retrack(q);
        Ok(map)
    }

    /// Offers `map` as the disk's bitmap `name`, recording nothing (a point-in-time
    /// export's copy of its origin's bitmap).
    pub fn add_frozen_bitmap(&self, name: &str, map: Arc<DirtyBitmap>) -> Result<(), BitmapError> {
        let b = NamedBitmap {
            name: name.to_string(),
            map,
            enabled: false,
            persistent: false,
            inconsistent: false,
        };
        self.bitmaps.add(b)
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
