//! What the trials exercised, counted so a change that stops covering an operation
//! fails the run instead of passing quietly.
//!
//! Request counts come from the model (what completed, and how many of those the
//! read-back pinned as durable). Metadata structure changes come from comparing the
//! image's metadata before the workers started with what the disk held when the power
//! went (the latest writes, durable or not) and with the crash image.

use drivers::qcow2::header::Header;

use crate::model::{Kind, Model};

/// The metadata facts of an image that show structure changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub size: u64,
    pub l1_entries: u32,
    pub reftable: (u64, u32),
    /// Allocated L2 tables (non-zero L1 entries).
    pub l2_tables: usize,
    /// Allocated refcount blocks (non-zero refcount table entries).
    pub refblocks: usize,
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 8).map_or(0, |s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

fn nonzero(b: &[u8], off: u64, entries: u64) -> usize {
    (0..entries).filter(|i| be64(b, off + i * 8) != 0).count()
}

/// Reads an image's [`Shape`] from its bytes.
pub fn shape(bytes: &[u8]) -> Shape {
    let h = Header::parse(bytes, bytes.len() as u64).expect("a valid header");
    let ref_entries = u64::from(h.refcount_table_clusters) * h.cluster_size() / 8;
    Shape {
        size: h.size,
        l1_entries: h.l1_size,
        reftable: (h.refcount_table_offset, h.refcount_table_clusters),
        l2_tables: nonzero(bytes, h.l1_table_offset, u64::from(h.l1_size)),
        refblocks: nonzero(bytes, h.refcount_table_offset, ref_entries),
    }
}

/// Counts over a run of trials.
#[derive(Default, Debug)]
pub struct Coverage {
    pub trials: u64,
    /// Per [`Kind`]: requests that completed, and of those, the ones durable at the cut
    /// (so the read-back checked their bytes).
    pub done: [u64; Kind::ALL.len()],
    pub durable: [u64; Kind::ALL.len()],
    pub fua_done: u64,
    /// FUA writes durable through FUA alone (no completed flush after them).
    pub fua_alone: u64,
    pub flushes: u64,
    /// Trials whose power cut came during the workers' run (or the close after it).
    pub cut: u64,
    /// Trials whose workers allocated L2 tables, refcount blocks, or grew the refcount
    /// table (header switched before the cut), and whose crash image kept that growth.
    pub l2_alloc: u64,
    pub refblock_alloc: u64,
    pub reftable_growth: u64,
    pub reftable_growth_durable: u64,
    pub lazy: u64,
    pub v2: u64,
    pub snapshot: u64,
    /// Trials on images with extended L2 entries (subclusters).
    pub extended_l2: u64,
    /// Trials on images with an external data file (raw or not) on the same power.
    pub data_file: u64,
    pub data_file_raw: u64,
    /// Trials with the image split over 2 and over 4 shards (on their own reactors).
    pub shards2: u64,
    pub shards4: u64,
    /// Trials whose workers had requests served on the zero-hop path.
    pub zero_hop: u64,
    pub resize: u64,
    /// Resizes cut in the middle; crash images at the old and at the new size; resizes
    /// that grew the L1 table.
    pub resize_cut: u64,
    pub resize_old_size: u64,
    pub resize_new_size: u64,
    pub resize_l1_grown: u64,
}

impl Coverage {
    /// The request counts of one trial's model.
    pub fn requests(&mut self, m: &Model) {
        for op in m.ops.iter().flatten() {
            if !matches!(op.outcome, crate::model::Outcome::Done { .. }) {
                continue;
            }
            let k = op.kind.index();
            self.done[k] += 1;
            self.durable[k] += u64::from(m.is_durable(op));
            self.fua_done += u64::from(op.fua);
            self.fua_alone += u64::from(m.durable_by_fua_alone(op));
        }
        self.flushes += m.flushes;
    }

    /// The structure changes of one trial.
    pub fn structures(&mut self, before: &Shape, at_cut: &Shape, crashed: &Shape) {
        self.l2_alloc += u64::from(at_cut.l2_tables > before.l2_tables);
        self.refblock_alloc += u64::from(at_cut.refblocks > before.refblocks);
        self.reftable_growth += u64::from(at_cut.reftable.1 > before.reftable.1);
        self.reftable_growth_durable += u64::from(crashed.reftable.1 > before.reftable.1);
    }

    pub fn add(&mut self, o: &Coverage) {
        for k in 0..Kind::ALL.len() {
            self.done[k] += o.done[k];
            self.durable[k] += o.durable[k];
        }
        let pairs = [
            (&mut self.trials, o.trials),
            (&mut self.fua_done, o.fua_done),
            (&mut self.fua_alone, o.fua_alone),
            (&mut self.flushes, o.flushes),
            (&mut self.cut, o.cut),
            (&mut self.l2_alloc, o.l2_alloc),
            (&mut self.refblock_alloc, o.refblock_alloc),
            (&mut self.reftable_growth, o.reftable_growth),
            (&mut self.reftable_growth_durable, o.reftable_growth_durable),
            (&mut self.lazy, o.lazy),
            (&mut self.v2, o.v2),
            (&mut self.snapshot, o.snapshot),
            (&mut self.extended_l2, o.extended_l2),
            (&mut self.data_file, o.data_file),
            (&mut self.data_file_raw, o.data_file_raw),
            (&mut self.shards2, o.shards2),
            (&mut self.shards4, o.shards4),
            (&mut self.zero_hop, o.zero_hop),
            (&mut self.resize, o.resize),
            (&mut self.resize_cut, o.resize_cut),
            (&mut self.resize_old_size, o.resize_old_size),
            (&mut self.resize_new_size, o.resize_new_size),
            (&mut self.resize_l1_grown, o.resize_l1_grown),
        ];
        for (a, b) in pairs {
            *a += b;
        }
    }

    fn named(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = Vec::new();
        for k in Kind::ALL {
            v.push((format!("{} done", k.name()), self.done[k.index()]));
            v.push((format!("{} durable", k.name()), self.durable[k.index()]));
        }
        v.extend([
            ("FUA writes done".into(), self.fua_done),
            ("FUA writes durable by FUA alone".into(), self.fua_alone),
            ("flushes".into(), self.flushes),
            ("trials cut during the run".into(), self.cut),
            ("trials allocating L2 tables".into(), self.l2_alloc),
            ("trials allocating refcount blocks".into(), self.refblock_alloc),
            ("trials growing the refcount table".into(), self.reftable_growth),
            ("trials whose crash image kept the grown table".into(), self.reftable_growth_durable),
            ("lazy-refcount trials".into(), self.lazy),
            ("v2 trials".into(), self.v2),
            ("internal-snapshot trials".into(), self.snapshot),
            ("extended-L2 trials".into(), self.extended_l2),
            ("external data file trials".into(), self.data_file),
            ("raw external data file trials".into(), self.data_file_raw),
            ("trials on 2 shards".into(), self.shards2),
            ("trials on 4 shards".into(), self.shards4),
            ("trials with zero-hop requests".into(), self.zero_hop),
            ("resizes".into(), self.resize),
            ("resizes cut midway".into(), self.resize_cut),
            ("resize crash images at the old size".into(), self.resize_old_size),
            ("resize crash images at the new size".into(), self.resize_new_size),
            ("resizes growing the L1 table".into(), self.resize_l1_grown),
        ]);
        v
    }

    /// One line per counter.
    pub fn report(&self) -> String {
        self.named().iter().map(|(n, c)| format!("  {n}: {c}\n")).collect()
    }

    /// Panics naming every counter at zero (a run long enough to cover everything).
    pub fn assert_everything_covered(&self) {
        let zero: Vec<String> =
            self.named().into_iter().filter(|(_, c)| *c == 0).map(|(n, _)| n).collect();
        assert!(zero.is_empty(), "the crash trials no longer cover: {}", zero.join(", "));
    }
}
