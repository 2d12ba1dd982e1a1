//! What a trial does to its image: the geometry, the aged image it starts from
//! (prefill), and the concurrent workers whose requests the model records.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use drivers::IoSeg;
use drivers::io::sim::SimDisk;
use drivers::qcow2::create::{CreateOptions, create};
use drivers::qcow2::{Qcow2Channel, Qcow2Device};

use crate::model::{Effect, Kind, Model, Op, Outcome};

/// Guest size of every image.
pub const SIZE: u64 = 4 << 20;
pub const WORKERS: usize = 4;
pub const OPS_PER_WORKER: usize = 40;
/// Each worker owns `SIZE / WORKERS` bytes; neighbouring regions share clusters.
pub const REGION: u64 = SIZE / WORKERS as u64;

/// Host bytes one refcount table cluster covers with 512-byte clusters and 64-bit
/// refcounts: 64 blocks of 64 clusters. Images of that geometry are prefilled to just
/// below it so the workers make the table grow.
pub const SMALL_TABLE_COVERAGE: u64 = 64 * 64 * 512;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn bytes(&mut self, n: u64) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A trial's image and what happens to it, chosen by the seed.
#[derive(Clone, Debug)]
pub struct Profile {
    pub cluster: u64,
    pub refcount_bits: u32,
    pub version: u32,
    pub lazy: bool,
    /// Host bytes the prefill fills the image file to (0: a fresh image).
    pub prefill_to: u64,
    /// An internal snapshot (made by `qemu-img snapshot -c`) after the prefill, so the
    /// workers copy shared clusters and tables on write.
    pub snapshot: bool,
    /// A resize, with its own power cut, after the crash check.
    pub resize: bool,
    /// The power is cut on this disk operation of the workers' run.
    pub cut_after: u64,
    /// Extended L2 entries: 32 subclusters per cluster (64 KiB clusters, v3).
    pub extended_l2: bool,
    /// An external data file (`Some(true)`: `data_file_raw`), on the image's power.
    pub data_file: Option<bool>,
}

impl Profile {
    pub fn new(seed: u64, have_qemu: bool) -> Profile {
        let mut r = Rng::new(seed ^ 0xabcdef);
        let cluster = match r.below(100) {
            0..55 => 512,
            55..80 => 4096,
            _ => 65536,
        };
        let v2 = r.chance(15);
        let refcount_bits = match (v2, cluster, r.below(4)) {
            (true, _, _) => 16,
            (_, 512, 0 | 1) => 64,
            (_, _, 0) => 1,
            (_, _, 1) => 64,
            _ => 16,
        };
        let lazy = !v2 && r.chance(33);
        let prefill_to = match (cluster, refcount_bits) {
            _ if r.chance(20) => 0,
            // Just below what the first refcount table cluster covers.
            (512, 64) => SMALL_TABLE_COVERAGE - 512 - r.below(16 * 1024),
            _ => 64 * 1024 + r.below(SIZE / 2),
        };
        // Drawn whatever the other choices, so a seed means the same trial with and
        // without qemu-img.
        let snapshot = r.chance(15);
        let snapshot = snapshot && have_qemu && prefill_to > 0 && refcount_bits > 1;
        let resize = r.chance(25);
        Profile {
            cluster,
            refcount_bits,
            version: if v2 { 2 } else { 3 },
            lazy,
            prefill_to,
            snapshot,
            resize,
            cut_after: 1 + r.below(400),
            // Drawn last: the other choices of a seed stay what they were.
            extended_l2: r.chance(40) && cluster == 65536 && !v2,
            // Not with snapshots (refused there) nor a resize (which grows the data
            // file too, outside the simulated disks).
            data_file: (r.chance(35) && cluster >= 4096 && !v2 && !snapshot && !resize)
                .then(|| r.chance(50)),
        }
    }

    /// What a discard zeroes whole units of: subclusters with extended L2 entries,
    /// else clusters.
    pub fn discard_unit(&self) -> u64 {
        if self.extended_l2 { self.cluster / 32 } else { self.cluster }
    }

    pub fn describe(&self) -> String {
        format!(
            "cluster {}{}{}, refcount bits {}, v{}, lazy {}, prefill to {} B{}{}, cut after {} disk ops",
            self.cluster,
            if self.extended_l2 { " (extended L2)" } else { "" },
            match self.data_file {
                Some(true) => ", raw data file",
                Some(false) => ", data file",
                None => "",
            },
            self.refcount_bits,
            self.version,
            self.lazy,
            self.prefill_to,
            if self.snapshot { ", internal snapshot" } else { "" },
            if self.resize { ", then a resize" } else { "" },
            self.cut_after
        )
    }
}

/// The files of a fresh image for `p` (its data file beside it, named by its absolute
/// path).
pub fn create_image(p: &Profile, path: &Path) -> crate::Files {
    let data_path = path.with_extension("data");
    let opts = CreateOptions {
        data_file: p.data_file.map(|_| data_path.display().to_string()),
        data_file_raw: p.data_file == Some(true),
        size: SIZE,
        cluster_size: p.cluster,
        refcount_bits: p.refcount_bits,
        version: p.version,
        lazy_refcounts: p.lazy,
        extended_l2: p.extended_l2,
        ..Default::default()
    };
    create(path, &opts).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let read = |p: &Path| {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        let _ = std::fs::remove_file(p);
        bytes
    };
    let data = p.data_file.map(|_| (data_path.clone(), read(&data_path)));
    crate::Files { image: read(path), data }
}

/// Takes an internal snapshot of `image` with `qemu-img snapshot -c`.
pub fn snapshot(image: Vec<u8>, path: &Path) -> Vec<u8> {
    std::fs::write(path, &image).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", "base"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img snapshot: {e}"));
    assert!(out.status.success(), "qemu-img snapshot: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    bytes
}

/// Where the prefill wrote, per worker region: the targets of in-place writes.
#[derive(Default)]
pub struct Layout {
    pub extents: Vec<Vec<(u64, u64)>>,
}

/// Ages the image: writes (and a few write-zeroes without unmap, and discards, so the
/// workers meet zero clusters with a host cluster and freed clusters) until the image
/// file reaches `p.prefill_to` bytes. Returns the guest content and where it wrote.
pub async fn prefill(
    dev: Arc<Qcow2Device>,
    disk: Arc<SimDisk>,
    p: Profile,
    seed: u64,
) -> (Vec<u8>, Layout) {
    let ch = dev.channel().expect("channel");
    let mut r = Rng::new(seed ^ 0x9e11);
    let mut content = vec![0u8; SIZE as usize];
    let mut layout = Layout { extents: vec![Vec::new(); WORKERS] };
    let mut next: Vec<u64> = (0..WORKERS as u64).map(|w| w * REGION).collect();
    while disk.len() < p.prefill_to {
        let w = r.below(WORKERS as u64) as usize;
        let end = (w as u64 + 1) * REGION;
        let off = next[w] + r.below(8192);
        // Short writes near the target, so the prefill does not overshoot it.
        let room = p.prefill_to - disk.len();
        let len = (1 + r.below(16384)).min(end.saturating_sub(off)).min(room);
        if len == 0 {
            if next.iter().enumerate().all(|(w, &n)| n >= (w as u64 + 1) * REGION) {
                break;
            }
            next[w] = end;
            continue;
        }
        next[w] = off + len;
        let mut data = r.bytes(len);
        ch.write(off, &[IoSeg::new(&mut data)], false).await.expect("prefill write");
        content[off as usize..(off + len) as usize].copy_from_slice(&data);
        layout.extents[w].push((off, len));
        age(&ch, &mut r, (off + len / 4, len / 2), p.discard_unit(), &mut content).await;
    }
    ch.flush().await.expect("prefill flush");
    (content, layout)
}

/// Now and then zeroes (keeping the host clusters) or discards the middle of what the
/// prefill just wrote.
async fn age(ch: &Qcow2Channel, r: &mut Rng, (off, len): (u64, u64), cs: u64, content: &mut [u8]) {
    let zeroed = if r.chance(10) {
        ch.write_zeroes(off, len, false, false).await.expect("prefill write-zeroes");
        off..off + len
    } else if r.chance(8) {
        ch.discard(off, len).await.expect("prefill discard");
        off.div_ceil(cs) * cs..((off + len) / cs * cs).max(off.div_ceil(cs) * cs)
    } else {
        return;
    };
    content[zeroed.start as usize..zeroed.end as usize].fill(0);
}

/// One worker's requests; each is recorded in the model when it ends. A worker stops
/// at its first failure (the power is cut).
pub async fn worker(
    dev: Arc<Qcow2Device>,
    model: Rc<RefCell<Model>>,
    layout: Rc<Layout>,
    w: usize,
    seed: u64,
    (cluster, unit, compress): (u64, u64, bool),
) {
    let ch = dev.channel().expect("channel");
    let mut r = Rng::new(seed * 31 + w as u64);
    let base = w as u64 * REGION;
    for _ in 0..OPS_PER_WORKER {
        let Some(op) = choose(&mut r, &layout.extents[w], base, (cluster, unit)) else {
            let issued = model.borrow().seq;
            if ch.flush().await.is_err() {
                model.borrow_mut().flush_failures += 1;
                return;
            }
            model.borrow_mut().flushed(issued);
            model.borrow_mut().flushes += 1;
            continue;
        };
        let (op, ok) = issue(&ch, op, cluster, compress).await;
        model.borrow_mut().record(w, op, ok);
        if !ok {
            return;
        }
    }
}

/// The next request of the op mix (see the table in `crash.rs`); `None` is a flush.
fn choose(
    r: &mut Rng,
    extents: &[(u64, u64)],
    base: u64,
    (cluster, unit): (u64, u64),
) -> Option<Op> {
    let choice = r.below(100);
    let big = (3 * cluster).max(16384);
    Some(match choice {
        0..33 => {
            let range = random_range(r, base, 13 * 1024, cluster);
            write_op(r, range)
        }
        33..53 => {
            let range = extent_range(r, extents)
                .unwrap_or_else(|| random_range(r, base, 13 * 1024, cluster));
            write_op(r, range)
        }
        53..73 => {
            let (off, len) = random_range(r, base, big, cluster);
            let kind = if choice < 63 { Kind::ZeroUnmap } else { Kind::ZeroKeep };
            new_op(kind, off, len, Effect::Zero, false)
        }
        73..85 => {
            let (off, len) = random_range(r, base, big, cluster);
            new_op(Kind::Discard, off, len, Effect::Discard { cluster: unit }, false)
        }
        _ => return None,
    })
}

fn new_op(kind: Kind, off: u64, len: u64, effect: Effect, fua: bool) -> Op {
    Op { kind, fua, off, len, effect, outcome: Outcome::Failed }
}

fn write_op(r: &mut Rng, (off, len): (u64, u64)) -> Op {
    new_op(Kind::Alloc, off, len, Effect::Data(r.bytes(len)), r.chance(15))
}

/// A range in the worker's region of up to `max` bytes: unaligned, or (a quarter of
/// the time) whole clusters.
fn random_range(r: &mut Rng, base: u64, max: u64, cluster: u64) -> (u64, u64) {
    let mut len = 1 + r.below(max.min(REGION / 4));
    let mut off = base + r.below(REGION - len);
    if r.chance(25) && len >= cluster {
        off = off / cluster * cluster;
        len = len / cluster * cluster;
    }
    (off.max(base), len)
}

/// A range inside one of the prefill's extents.
fn extent_range(r: &mut Rng, extents: &[(u64, u64)]) -> Option<(u64, u64)> {
    if extents.is_empty() {
        return None;
    }
    let (eoff, elen) = extents[r.below(extents.len() as u64) as usize];
    let len = 1 + r.below(elen.min(8192));
    Some((eoff + r.below(elen - len + 1), len))
}

/// Issues `op` and says whether it succeeded. Writes are classified first (in place,
/// allocating whole clusters, allocating a partial cluster) from the block status.
async fn issue(ch: &Qcow2Channel, mut op: Op, cluster: u64, compress: bool) -> (Op, bool) {
    let (off, len) = (op.off, op.len);
    let ok = match &mut op.effect {
        Effect::Data(data) => {
            op.kind = classify(ch, off, len, cluster).await;
            // Every other cluster-aligned write is a compressed one, of data that
            // shrinks (a backup with `compress`): its bytes are packed into shared
            // host clusters.
            if compress
                && !op.fua
                && off.is_multiple_of(cluster)
                && len >= cluster
                && (off / cluster).is_multiple_of(2)
            {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (off as usize / 512 + i / 64) as u8;
                }
                ch.write_compressed(off, &[IoSeg::new(data)]).await.is_ok()
            } else {
                ch.write(off, &[IoSeg::new(data)], op.fua).await.is_ok()
            }
        }
        Effect::Zero => ch.write_zeroes(off, len, op.kind == Kind::ZeroUnmap, false).await.is_ok(),
        Effect::Discard { .. } => ch.discard(off, len).await.is_ok(),
    };
    (op, ok)
}

async fn classify(ch: &Qcow2Channel, off: u64, len: u64, cs: u64) -> Kind {
    let is_data = |at: u64, n: u64| async move {
        matches!(ch.block_status(at, n).await, Ok(st) if !st.hole && st.len >= n)
    };
    if is_data(off, len).await {
        return Kind::InPlace;
    }
    let end = off + len;
    let head_partial = !off.is_multiple_of(cs) || (end - off / cs * cs) < cs;
    let tail_partial = !end.is_multiple_of(cs);
    if (head_partial && !is_data(off, 1).await) || (tail_partial && !is_data(end - 1, 1).await) {
        Kind::AllocPartial
    } else {
        Kind::Alloc
    }
}
