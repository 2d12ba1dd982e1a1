//! The model: what every byte of a crashed image may read.
//!
//! The workers record each request they issued, in issue order per worker, with its
//! effect on the guest bytes and its outcome. Workers own disjoint byte ranges and each
//! issues one request at a time, so the requests touching one byte are totally ordered.
//!
//! A completed request is *durable* if it was a FUA write, or if it completed before a
//! flush that later completed was issued. For each byte, the last durable request
//! touching it fixes what the byte must read — unless a later request touched it
//! (completed but not durable, or failed at the power cut): then the byte may also read
//! what one of those later requests put there, and nothing else. A byte no durable
//! request touched reads its initial content or what a later request put there.
//! Neither an older value (a lost durable write) nor garbage is ever acceptable.
//!
//! Effects, exactly as the engine promises them (no backing file on the sim disk):
//! - a write puts its bytes;
//! - write-zeroes (with or without unmap) puts zeros over its whole range: partial
//!   clusters are written with zeros, whole clusters become zero clusters (v3, keeping
//!   or dropping their host cluster) or unallocated (v2), and both read as zeros;
//! - discard puts zeros over the *whole clusters* inside its range and leaves the
//!   partial clusters at either end alone (`Shard::discard`: whole clusters become
//!   unallocated, which reads as zeros with no backing file, on v2 as on v3).

use std::ops::Range;

/// What kind of request an [`Op`] was (for coverage counts and messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A write into clusters that were all allocated: no metadata change.
    InPlace,
    /// A write that allocates, covering whole clusters only.
    Alloc,
    /// A write that allocates a cluster it covers only partly: the rest of the cluster
    /// is copied (COW) or known to be zeros.
    AllocPartial,
    ZeroUnmap,
    ZeroKeep,
    Discard,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::InPlace,
        Kind::Alloc,
        Kind::AllocPartial,
        Kind::ZeroUnmap,
        Kind::ZeroKeep,
        Kind::Discard,
    ];

    pub fn index(self) -> usize {
        Kind::ALL.iter().position(|&k| k == self).unwrap_or(0)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::InPlace => "in-place write",
            Kind::Alloc => "allocating write",
            Kind::AllocPartial => "allocating write, partial cluster (COW)",
            Kind::ZeroUnmap => "write-zeroes unmap",
            Kind::ZeroKeep => "write-zeroes no-unmap",
            Kind::Discard => "discard",
        }
    }
}

/// What a request does to the bytes it affects.
pub enum Effect {
    Data(Vec<u8>),
    /// Zeros over the whole range.
    Zero,
    /// Zeros over the whole clusters of this size inside the range.
    Discard {
        cluster: u64,
    },
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed successfully, `seq`-th of all completions.
    Done { seq: u64 },
    /// Failed (at or after the power cut): any of its bytes may or may not have landed.
    Failed,
}

pub struct Op {
    pub kind: Kind,
    pub fua: bool,
    pub off: u64,
    pub len: u64,
    pub effect: Effect,
    pub outcome: Outcome,
}

impl Op {
    /// The bytes this request changes.
    pub fn affected(&self) -> Range<usize> {
        let (lo, hi) = match self.effect {
            Effect::Discard { cluster } => {
                (self.off.div_ceil(cluster) * cluster, (self.off + self.len) / cluster * cluster)
            }
            _ => (self.off, self.off + self.len),
        };
        lo as usize..hi.max(lo) as usize
    }

    fn value_at(&self, i: usize) -> u8 {
        match &self.effect {
            Effect::Data(d) => d[i - self.off as usize],
            Effect::Zero | Effect::Discard { .. } => 0,
        }
    }

    fn describe(&self, durable_below: u64) -> String {
        let why = match self.outcome {
            Outcome::Done { seq } if self.fua => format!("completed #{seq} with FUA"),
            Outcome::Done { seq } if seq < durable_below => {
                format!("completed #{seq}, before a flush issued after #{}", durable_below - 1)
            }
            Outcome::Done { seq } => format!("completed #{seq}, not flushed"),
            Outcome::Failed => "failed".into(),
        };
        format!("{} at {}+{} ({why})", self.kind.name(), self.off, self.len)
    }
}

/// Byte states during [`Model::verify`].
const OPEN: u8 = 0;
/// A request after the last durable one (or the durable one) put what the byte reads.
const MATCHED: u8 = 1;
/// The byte's last durable request has been met (going backwards): older ones do not
/// count.
const SETTLED: u8 = 2;

/// Everything the workers did.
pub struct Model {
    /// Completions so far (the next completion's sequence number).
    pub seq: u64,
    /// Completed requests with a lower sequence number are durable (by a flush).
    pub durable_below: u64,
    /// Flushes that completed, and that failed.
    pub flushes: u64,
    pub flush_failures: u64,
    /// Per worker, in issue order.
    pub ops: Vec<Vec<Op>>,
}

impl Model {
    pub fn new(workers: usize) -> Model {
        Model {
            seq: 0,
            durable_below: 0,
            flushes: 0,
            flush_failures: 0,
            ops: (0..workers).map(|_| Vec::new()).collect(),
        }
    }

    /// Records a request's end.
    pub fn record(&mut self, worker: usize, mut op: Op, ok: bool) {
        op.outcome = if ok {
            self.seq += 1;
            Outcome::Done { seq: self.seq - 1 }
        } else {
            Outcome::Failed
        };
        self.ops[worker].push(op);
    }

    /// A flush issued when `issued` requests had completed has completed.
    pub fn flushed(&mut self, issued: u64) {
        self.durable_below = self.durable_below.max(issued);
    }

    pub fn is_durable(&self, op: &Op) -> bool {
        match op.outcome {
            Outcome::Done { seq } => op.fua || seq < self.durable_below,
            Outcome::Failed => false,
        }
    }

    /// Durable only because of FUA (no flush covers it): the FUA promise at work.
    pub fn durable_by_fua_alone(&self, op: &Op) -> bool {
        matches!(op.outcome, Outcome::Done { seq } if op.fua && seq >= self.durable_below)
    }

    /// Checks `content` (what the crashed image reads) against the model, given what
    /// the image held before the workers started.
    pub fn verify(&self, initial: &[u8], content: &[u8]) -> Result<(), String> {
        let mut state = vec![OPEN; content.len()];
        for ops in &self.ops {
            for op in ops.iter().rev() {
                self.apply_backwards(op, content, &mut state)?;
            }
        }
        check_untouched(initial, content, &state)
    }

    /// One request, walking each worker's requests from the last to the first.
    fn apply_backwards(&self, op: &Op, content: &[u8], state: &mut [u8]) -> Result<(), String> {
        let durable = self.is_durable(op);
        for i in op.affected() {
            if state[i] == SETTLED {
                continue;
            }
            let want = op.value_at(i);
            if content[i] == want {
                state[i] = MATCHED;
            }
            if durable {
                if state[i] != MATCHED {
                    return Err(format!(
                        "byte {i} reads {:#04x}, but the {} put {want:#04x} there and no later \
                         request wrote {:#04x}",
                        content[i],
                        op.describe(self.durable_below),
                        content[i]
                    ));
                }
                state[i] = SETTLED;
            }
        }
        Ok(())
    }
}

/// Bytes no request accounts for must hold their initial content.
fn check_untouched(initial: &[u8], content: &[u8], state: &[u8]) -> Result<(), String> {
    const CHUNK: usize = 4096;
    for (k, c) in content.chunks(CHUNK).enumerate() {
        let base = k * CHUNK;
        let init = &initial[base..base + c.len()];
        if c == init {
            continue;
        }
        for (j, (&got, &was)) in c.iter().zip(init).enumerate() {
            if got != was && state[base + j] == OPEN {
                return Err(format!(
                    "byte {} reads {got:#04x}: it held {was:#04x} and no request wrote \
                     {got:#04x} there",
                    base + j
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, off: u64, effect: Effect, fua: bool) -> Op {
        let len = match &effect {
            Effect::Data(d) => d.len() as u64,
            _ => 8,
        };
        Op { kind, fua, off, len, effect, outcome: Outcome::Failed }
    }

    #[test]
    fn the_model_rejects_lost_and_stale_bytes() {
        let mut m = Model::new(1);
        m.record(0, op(Kind::Alloc, 0, Effect::Data(vec![1; 4]), false), true);
        m.flushed(1);
        m.record(0, op(Kind::InPlace, 0, Effect::Data(vec![2; 4]), false), true);
        m.record(0, op(Kind::InPlace, 4, Effect::Data(vec![3; 4]), true), true);
        let init = [9u8; 8];
        assert!(m.verify(&init, &[1, 2, 1, 2, 3, 3, 3, 3]).is_ok());
        assert!(m.verify(&init, &[9, 1, 1, 1, 3, 3, 3, 3]).is_err(), "a flushed write lost");
        assert!(m.verify(&init, &[1, 1, 1, 1, 9, 3, 3, 3]).is_err(), "a FUA write lost");
        assert!(m.verify(&init, &[1, 1, 1, 7, 3, 3, 3, 3]).is_err(), "garbage");
    }

    #[test]
    fn discard_zeroes_only_whole_clusters() {
        let mut m = Model::new(1);
        let d = Op {
            kind: Kind::Discard,
            fua: false,
            off: 2,
            len: 12,
            effect: Effect::Discard { cluster: 4 },
            outcome: Outcome::Failed,
        };
        assert_eq!(d.affected(), 4..12);
        m.record(0, d, true);
        m.flushed(1);
        let init = [5u8; 16];
        let mut got = init;
        got[4..12].fill(0);
        assert!(m.verify(&init, &got).is_ok());
        got[2] = 0;
        assert!(m.verify(&init, &got).is_err(), "a partial cluster was zeroed");
    }
}
