//! The `null` backend: a device of a given size that stores nothing. Reads leave
//! buffers untouched and writes vanish: the transport's and the stack's own ceiling.

use std::sync::Arc;

use crate::error::IoError;
use crate::seg::IoSeg;

use super::probe::Alignment;
use super::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};

pub(crate) fn open(size: u64) -> Arc<Storage> {
    Storage::new(Box::new(Null), None, Alignment::NONE, size, false, false)
}

struct Null;

impl Backend for Null {
    fn kind(&self) -> &'static str {
        "<null>"
    }
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        Ok(Box::new(Null))
    }
    fn read_sync(&self, buf: &mut [u8], _off: u64) -> std::io::Result<usize> {
        Ok(buf.len())
    }
}

impl BackendChannel for Null {
    fn read<'a>(&'a self, _off: u64, _segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        StoreFuture::ready(Ok(()))
    }
    fn write<'a>(&'a self, _off: u64, _segs: &'a [IoSeg<'a>], _fua: bool) -> StoreFuture<'a> {
        StoreFuture::ready(Ok(()))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::ready(Ok(()))
    }
    fn zero_range(&self, _off: u64, _len: u64, _unmap: bool, _grows: bool) -> StoreFuture<'_> {
        StoreFuture::ready(Ok(()))
    }
    fn discard(&self, _off: u64, _len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::ready(Ok(false))
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}
