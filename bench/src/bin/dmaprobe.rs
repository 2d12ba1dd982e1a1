//! What the CPU pays to touch memory the disk has just used.
//!
//! A served write copies its payload out of the socket into a DMA buffer that the disk
//! read a moment before (the previous write's), and a served read copies its reply out
//! of a buffer the disk has just written. On a virtual disk the device is a host thread
//! on another physical core, which leaves those lines in its own caches; on the benchmark
//! machine that made the reactor's cost per 64 KiB write swing threefold from one second
//! to the next (docs/perf/profile.md, 2026-12-07 07:30). This probe times, on one core,
//! the copy of 64 KiB (or `--size`) into a buffer the disk has just read (an O_DIRECT
//! `pwrite` of it) and out of one the disk has just filled (an O_DIRECT `pread`), each
//! against the same copy into or out of a buffer of our own that the disk never saw.
//!
//! ```text
//! cargo run -p bench --release --bin dmaprobe -- --file /var/tmp/probe.img
//! ```

use std::alloc::{Layout, alloc, dealloc};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Times copies into and out of buffers the disk has just used")]
struct Args {
    /// Scratch file to create on the disk to probe (64 MiB; it must not exist, and it is
    /// removed at the end).
    #[arg(long)]
    file: PathBuf,
    /// Buffer size in bytes (a multiple of 4096).
    #[arg(long, default_value_t = 65536)]
    size: usize,
    /// Copies per case.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Buffers cycled through: the reuse distance in buffers (1 = the same buffer).
    #[arg(long, default_value_t = 2)]
    buffers: usize,
}

/// Page-aligned buffers, freed on drop.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(bytes: usize) -> Aligned {
        let layout = Layout::from_size_align(bytes, 2 << 20).expect("layout");
        // SAFETY: the layout has a non-zero size (checked by the caller's arguments).
        let ptr = unsafe { alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: `ptr` is valid for `bytes` writes; fill so every page is touched.
        unsafe { std::ptr::write_bytes(ptr, 1, bytes) };
        Aligned { ptr, layout }
    }

    fn slice(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.layout.size());
        // SAFETY: in bounds (asserted) and exclusively borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let span = 64usize << 20;
    if a.size == 0 || !a.size.is_multiple_of(4096) || a.size > span {
        return Err(format!(
            "--size {}: must be a non-zero multiple of 4096, at most 64 MiB",
            a.size
        ));
    }
    if a.buffers == 0 || a.buffers > 4096 || a.iterations == 0 {
        return Err("--buffers must be 1 to 4096 and --iterations above 0".into());
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.file)
        .map_err(|e| format!("{}: {e}", a.file.display()))?;
    let _scratch = Scratch(&a.file);
    f.set_len(span as u64).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let slots = span / a.size;
    let mut used = Aligned::new(a.size * a.buffers);
    let mut fresh = Aligned::new(a.size * a.buffers);
    let src = vec![3u8; a.size];
    let mut sink = vec![0u8; a.size];
    let (mut into_used, mut into_fresh, mut out_used, mut out_fresh) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..a.iterations {
        let off = (i % a.buffers) * a.size;
        let pos = ((i * 7919) % slots * a.size) as u64;
        // Writes: the disk reads `used`, then the payload is copied into it.
        f.write_all_at(used.slice(off, a.size), pos).map_err(|e| format!("pwrite: {e}"))?;
        into_used += timed(|| used.slice(off, a.size).copy_from_slice(&src));
        into_fresh += timed(|| fresh.slice(off, a.size).copy_from_slice(&src));
        // Reads: the disk fills `used`, then the reply is copied out of it.
        f.read_exact_at(used.slice(off, a.size), pos).map_err(|e| format!("pread: {e}"))?;
        fresh.slice(off, a.size).copy_from_slice(&src);
        out_used += timed(|| sink.copy_from_slice(used.slice(off, a.size)));
        out_fresh += timed(|| sink.copy_from_slice(fresh.slice(off, a.size)));
    }
    std::hint::black_box(&sink);
    let n = a.iterations as f64;
    println!(
        "copy of {} KiB, {} buffers: into a buffer the disk just read {:.2} us (never given to the disk {:.2} us); \
         out of a buffer the disk just filled {:.2} us (never given {:.2} us)",
        a.size / 1024,
        a.buffers,
        into_used / n,
        into_fresh / n,
        out_used / n,
        out_fresh / n
    );
    Ok(())
}

/// Removes the scratch file however the probe ends.
struct Scratch<'a>(&'a std::path::Path);

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Microseconds `f` took.
fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}
