//! Segment windows kept outside request futures.
//!
//! The request paths cut a caller's segment list into windows (one per run) in arrays
//! of [`MAX_SEGS`] entries. Held as locals, each array (4 KiB) would sit in the future
//! of every request and be copied with it wherever the future moves (into a task pool
//! slot, into its parent's state): measured, those copies were close to half the CPU of
//! a forwarded 4 KiB read. A [`SegBuf`] is a pointer to an array from a per-reactor
//! free list instead, returned on drop; the list grows to the largest number of
//! requests ever in flight and then stops allocating.

use std::cell::RefCell;

use crate::seg::IoSeg;

use super::layer::MAX_SEGS;

type Array = [IoSeg<'static>; MAX_SEGS];

thread_local! {
    static FREE: RefCell<Vec<Box<Array>>> = const { RefCell::new(Vec::new()) };
}

/// A borrowed segment array (see the module docs).
pub(crate) struct SegBuf(Option<Box<Array>>);

impl SegBuf {
    pub(crate) fn take() -> SegBuf {
        let b = FREE.with(|f| f.borrow_mut().pop());
        SegBuf(Some(b.unwrap_or_else(|| Box::new([IoSeg::EMPTY; MAX_SEGS]))))
    }

    /// The array, for segments of any lifetime that outlives this borrow.
    pub(crate) fn arr<'s, 'a: 's>(&'s mut self) -> &'s mut [IoSeg<'a>; MAX_SEGS] {
        let a: &'s mut Array = self.0.as_mut().expect("taken until dropped");
        // SAFETY: IoSeg's lifetime is a marker (a pointer and a length): the entries
        // written through this borrow live no longer than it and are never read after
        // it ends (a later borrower overwrites what it reads), so no segment outlives
        // the memory it points at.
        unsafe { &mut *(a as *mut Array).cast::<[IoSeg<'a>; MAX_SEGS]>() }
    }
}

impl Drop for SegBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            FREE.with(|f| f.borrow_mut().push(b));
        }
    }
}
