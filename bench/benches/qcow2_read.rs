//! A 4 KiB read of an allocated qcow2 cluster whose L2 entry is cached: the cache-hit
//! mapping path plus the read (through the page cache, so the device is out of the
//! picture), next to the same read of a raw file to show what the mapping costs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use drivers::qcow2::create::{CreateOptions, create};
use drivers::{Bdev, IoSeg};
use poller::{HugepageMode, IdlePolicy, ReactorHandle, ReactorOptions, Reactors, dma};

const SIZE: u64 = 64 << 20;

fn open(path: &Path, format: &str, h: &ReactorHandle) -> Arc<Bdev> {
    let disk = bench::disk_from_toml(&format!(
        "name = \"b\"\npath = {}\nformat = \"{format}\"\ndriver = \"io_uring\"\ndirect = false\n",
        bench::toml_str(&path.to_string_lossy())
    ))
    .expect("disk config");
    Bdev::open(&disk, std::slice::from_ref(h)).expect("open image")
}

/// Writes data into the first clusters (allocating them in the qcow2 image).
fn fill(bdev: &Arc<Bdev>, h: &ReactorHandle) {
    let bdev = bdev.clone();
    h.block_on(move || async move {
        let ch = bdev.channel().expect("channel");
        let mut buf = dma::alloc_wait(65536).await.expect("buffer");
        buf.set_len(65536);
        buf.as_mut_slice().fill(0xa5);
        for i in 0..4u64 {
            ch.write(i * 65536, &[IoSeg::from_dma(&mut buf)], false).await.expect("write");
        }
        ch.flush().await.expect("flush");
    });
}

fn bench_read(c: &mut Criterion, name: &str, bdev: &Arc<Bdev>, h: &ReactorHandle) {
    let mut g = c.benchmark_group("bdev read 4k (page cache)");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let bdev = bdev.clone();
            h.block_on(move || async move {
                let ch = bdev.channel().expect("channel");
                let mut buf = dma::alloc_wait(4096).await.expect("buffer");
                buf.set_len(4096);
                // Warm the L2 cache and the page.
                ch.read(8192, &[IoSeg::from_dma(&mut buf)]).await.expect("read");
                let start = Instant::now();
                for _ in 0..iters {
                    ch.read(8192, &[IoSeg::from_dma(&mut buf)]).await.expect("read");
                }
                let t = start.elapsed();
                assert_eq!(buf.as_slice()[0], 0xa5);
                t
            })
        })
    });
    g.finish();
}

fn qcow2_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let qcow2 = dir.path().join("img.qcow2");
    let raw = dir.path().join("img.raw");
    create(&qcow2, &CreateOptions { size: SIZE, cluster_size: 65536, ..Default::default() })
        .expect("create qcow2");
    std::fs::File::create(&raw).and_then(|f| f.set_len(SIZE)).expect("create raw");
    let reactors = Reactors::start(ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Busy,
        hugepages: HugepageMode::Off,
        dma_pool_bytes: 4 << 20,
        pin: true,
    })
    .expect("start a reactor");
    let h = reactors.handles()[0].clone();
    let q = open(&qcow2, "qcow2", &h);
    let r = open(&raw, "raw", &h);
    fill(&q, &h);
    fill(&r, &h);
    bench_read(c, "qcow2, L2 cache hit", &q, &h);
    bench_read(c, "raw", &r, &h);
    q.close().expect("close qcow2");
    drop((q, r));
    reactors.stop();
}

criterion_group!(benches, qcow2_read);
criterion_main!(benches);
