//! Power-cut simulation for the offline metadata tools' tests: an in-memory image that
//! records every write and sync, and the images a power cut after any prefix of them
//! can leave (everything written up to the cut, or only what the last sync made
//! durable).

use std::cell::RefCell;

use crate::format::qcow2::open::MetaIo;

pub enum Op {
    Write(u64, Vec<u8>),
    Sync,
}

/// An image in memory, with the log of what was done to it.
#[derive(Default)]
pub struct Mem {
    pub data: RefCell<Vec<u8>>,
    pub log: RefCell<Vec<Op>>,
}

impl Mem {
    pub fn with(data: Vec<u8>) -> Self {
        Mem { data: RefCell::new(data), log: RefCell::default() }
    }

    pub fn apply(data: &mut Vec<u8>, off: u64, buf: &[u8]) {
        let end = off as usize + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[off as usize..end].copy_from_slice(buf);
    }
}

impl MetaIo for Mem {
    fn meta_read(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let d = self.data.borrow();
        let start = (off as usize).min(d.len());
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        Ok(n)
    }
    fn meta_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        Self::apply(&mut self.data.borrow_mut(), off, buf);
        self.log.borrow_mut().push(Op::Write(off, buf.to_vec()));
        Ok(())
    }
    fn meta_sync(&self) -> std::io::Result<()> {
        self.log.borrow_mut().push(Op::Sync);
        Ok(())
    }
    fn meta_len(&self) -> std::io::Result<u64> {
        Ok(self.data.borrow().len() as u64)
    }
}

/// The two images a power cut after the first `cut` operations of `log` can leave
/// from `initial`: (everything written, only what was synced).
pub fn cut(initial: &[u8], log: &[Op], cut: usize) -> (Vec<u8>, Vec<u8>) {
    let mut all = initial.to_vec();
    let mut synced = initial.to_vec();
    let mut pending: Vec<(u64, &[u8])> = Vec::new();
    for op in &log[..cut] {
        match op {
            Op::Write(off, buf) => {
                Mem::apply(&mut all, *off, buf);
                pending.push((*off, buf));
            }
            Op::Sync => {
                for (off, buf) in pending.drain(..) {
                    Mem::apply(&mut synced, off, buf);
                }
            }
        }
    }
    (all, synced)
}
