//! The steady-state data path allocates nothing: a counting global allocator watches the
//! reactor threads while a client drives a burst of pipelined NBD reads and writes
//! through an in-process appliance, over a RAM disk and over a file with each engine,
//! on one reactor and on two; and over a qcow2 image on one shard and split over two,
//! where half the requests are forwarded to the other reactor's shard and back; with
//! sockets on the reactor's io_uring (the default), on epoll and with one multishot
//! receive per connection; and over an RBD image of a single-node Ceph cluster, whose
//! completions come back from librbd's threads.
//! Every eighth write is FUA and every burst ends with a flush.
//!
//! The one allocation the burst may make is a task pool's growth (a chunk of 16
//! request slots, counted by `poller::executor::pool_growths`): a connection's pool
//! grows the first time the reactor takes more of its requests in one go than ever
//! before, which depends on how the client's bytes happen to arrive (a warm-up that
//! never took more than 16 at once leaves the burst to make the second chunk, 62,720
//! bytes: seen in one fresh-clone CI run, and in one local run in ~150). Bounded per
//! connection, never per request; every other allocation fails the test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use appliance_tests::nbd_client::{CMD_FLUSH, CMD_READ, CMD_WRITE, Client};

/// NBD_CMD_FLAG_FUA.
const FLAG_FUA: u16 = 1;
use appliance_tests::pattern;

struct Counting;

static COUNT: AtomicU64 = AtomicU64::new(0);
/// The sizes of the first counted allocations (a clue to where they come from when the
/// test fails; recording them allocates nothing).
static SIZES: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn counted(l: Layout) {
    let n = COUNT.fetch_add(1, Ordering::Relaxed) as usize;
    if let Some(s) = SIZES.get(n) {
        s.store(l.size() as u64, Ordering::Relaxed);
    }
}

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards to the system allocator; the bookkeeping allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if TRACK.with(Cell::get) {
            counted(l);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if TRACK.with(Cell::get) {
            // SAFETY: `l`'s alignment with the new size, as `realloc`'s contract says.
            counted(unsafe { Layout::from_size_align_unchecked(n, l.align()) });
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A burst of 4000 pipelined requests at queue depth 32: writes (one in eight FUA),
/// reads and a flush.
fn burst(c: &mut Client, seed: u64) {
    let data = pattern(seed, 4096);
    for round in 0..125u64 {
        for i in 0..32u64 {
            let cookie = round * 32 + i + 1;
            let off = ((round * 32 + i) % 2048) * 4096;
            if cookie % 2 == 1 {
                let flags = if cookie % 16 == 1 { FLAG_FUA } else { 0 };
                c.request(CMD_WRITE, flags, cookie, off, 4096, &data).unwrap();
            } else {
                c.request(CMD_READ, 0, cookie, off, 4096, &[]).unwrap();
            }
        }
        for _ in 0..32 {
            // Odd cookies are writes (no data), even ones reads.
            let r = c.reply_for(|k| if k % 2 == 1 { 0 } else { 4096 }).unwrap();
            assert_eq!(r.error, 0);
        }
    }
    c.request(CMD_FLUSH, 0, 0, 0, 0, &[]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, 0);
}

fn check(disk_toml: &str, cores: &str, prepare: impl FnOnce(&Path)) {
    check_with(disk_toml, cores, "", prepare)
}

/// `nbd`: lines of the `[nbd]` table (how connections move bytes: `socket_io`,
/// `multishot_receive`).
fn check_with(disk_toml: &str, cores: &str, nbd: &str, prepare: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let sock = dir.path().join("nbd.sock");
    let text = format!(
        "[appliance]\ncores = {cores}\nidle = \"busy\"\nbuffer_pool = \"32MiB\"\n[nbd]\nlisten = [\"unix:{}\"]\n{nbd}\n{}",
        sock.display(),
        disk_toml.replace("{dir}", &dir.path().display().to_string())
    );
    let config = config::Config::parse(&text, "no_alloc.toml", dir.path()).unwrap();
    let app = appliance::serve::Appliance::start(config, true).unwrap();
    let reactors = app.reactor_handles().to_vec();
    let track = |on: bool| {
        for r in &reactors {
            r.call(move || TRACK.with(|t| t.set(on)));
        }
    };
    let growths = || reactors.iter().map(|r| r.call(poller::executor::pool_growths)).sum::<u64>();
    // Connections go to the reactors in turn: enough of them to reach each.
    for (k, structured) in
        [false, true, false, true].into_iter().take(2 * reactors.len()).enumerate()
    {
        // The counter does see the reactors: a handshake allocates (per connection).
        COUNT.store(0, Ordering::SeqCst);
        track(true);
        let mut c = Client::connect(&sock, "d", structured, false).unwrap();
        track(false);
        assert!(COUNT.load(Ordering::SeqCst) > 0, "the counting allocator sees the reactor thread");
        // Two bursts of warm-up: a branch first taken under some timing (a socket
        // drained early, say) may register a tracing callsite or grow a queue to its
        // high-water mark once; steady state is what follows.
        burst(&mut c, 1 + k as u64);
        burst(&mut c, 21 + k as u64);
        let growths_before = growths();
        COUNT.store(0, Ordering::SeqCst);
        track(true);
        burst(&mut c, 11 + k as u64);
        track(false);
        let n = COUNT.load(Ordering::SeqCst);
        let grown = growths() - growths_before;
        let sizes: Vec<u64> = SIZES.iter().map(|s| s.load(Ordering::SeqCst)).collect();
        assert_eq!(
            n, grown,
            "{disk_toml} on cores {cores}, [nbd] {nbd}: {n} heap allocations on the reactors during 4000 requests, {grown} of them task-pool growths (first sizes {sizes:?})"
        );
        c.disconnect();
    }
    app.shutdown();
}

#[test]
fn steady_state_data_path_does_not_allocate() {
    for cores in ["[0]", "[0, 1]"] {
        let mem = "[[disk]]\nname = \"d\"\ndriver = \"mem\"\nsize = \"16MiB\"\n";
        check(mem, cores, |_| {});
        // Sockets through readiness polling and one system call each, as well as
        // through the reactor's io_uring (the default above).
        check_with(mem, cores, "socket_io = \"epoll\"", |_| {});
        // And through one multishot receive per connection.
        check_with(mem, cores, "multishot_receive = \"on\"", |_| {});
        for driver in ["io_uring", "aio"] {
            check(
                &format!(
                    "[[disk]]\nname = \"d\"\npath = \"{{dir}}/d.img\"\ndriver = \"{driver}\"\n"
                ),
                cores,
                |dir| appliance_tests::sparse_file(&dir.join("d.img"), 16 << 20),
            );
        }
    }
    qcow2_on_one_and_two_shards();
    rbd_on_one_and_two_reactors();
}

/// Part of the one test above: an RBD disk of a single-node cluster. librbd's own
/// allocations (its completion, its threads' work) go through C's allocator and are
/// not counted; the appliance's side of each request (the future, the completion's
/// hand-off to the reactor through its wake ring) must allocate nothing.
fn rbd_on_one_and_two_reactors() {
    let cluster = appliance_tests::ceph::Cluster::start();
    cluster.rbd(&["create", "--size", "16M", "rbd/d"]);
    let toml = cluster.disk_toml("d", "d", 30, "");
    for cores in ["[0]", "[0, 1]"] {
        check(&toml, cores, |_| {});
    }
}

/// Part of the one test above: the counter is global, so checks must not run at once.
fn qcow2_on_one_and_two_shards() {
    appliance_tests::require_tool("qemu-img", "qemu-utils");
    // 4 KiB clusters: the burst's 8 MiB span four L2 tables, two per shard. The first
    // burst of each connection allocates; the measured one writes in place.
    let toml = "[[disk]]\nname = \"d\"\npath = \"{dir}/d.qcow2\"\nformat = \"qcow2\"\n";
    for cores in ["[0]", "[0, 1]"] {
        check(toml, cores, |dir| {
            appliance_tests::run(
                std::process::Command::new("qemu-img")
                    .args(["create", "-f", "qcow2", "-o", "cluster_size=4096"])
                    .arg(dir.join("d.qcow2"))
                    .arg("16M"),
            );
        });
    }
}
