//! Seed inputs for the fuzz targets of `appliance::fuzzing`: well-formed sessions a
//! real client would produce, from which the fuzzers mutate. `tests/tests/fuzz_replay.rs`
//! replays them (with `FUZZ_WRITE_SEEDS=1` it also writes them into `fuzz/corpus/`).

/// (name, bytes) of every seed of `target`.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "nbd_session" => nbd(),
        "vhost_messages" => vhost(),
        "virtqueue_chain" => chains(),
        "config" => configs(),
        _ => Vec::new(),
    }
}

pub const TARGETS: [&str; 4] = ["nbd_session", "vhost_messages", "virtqueue_chain", "config"];

// --- NBD ---------------------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

#[derive(Default)]
struct Nbd {
    b: Vec<u8>,
    extended: bool,
}

impl Nbd {
    fn new() -> Self {
        let mut s = Nbd::default();
        s.b.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        s
    }
    fn opt(mut self, opt: u32, data: &[u8]) -> Self {
        self.b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.b.extend_from_slice(&opt.to_be_bytes());
        self.b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.b.extend_from_slice(data);
        self
    }
    fn name(name: &str, tail: &[u8]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(tail);
        d
    }
    fn go(self, export: &str) -> Self {
        self.opt(7, &Self::name(export, &0u16.to_be_bytes()))
    }
    fn meta(self, export: &str) -> Self {
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        self.opt(10, &Self::name(export, &q))
    }
    fn req(
        mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        off: u64,
        len: u64,
        payload: &[u8],
    ) -> Self {
        let magic: u32 = if self.extended { 0x21e4_1c71 } else { 0x2560_9513 };
        self.b.extend_from_slice(&magic.to_be_bytes());
        self.b.extend_from_slice(&flags.to_be_bytes());
        self.b.extend_from_slice(&kind.to_be_bytes());
        self.b.extend_from_slice(&cookie.to_be_bytes());
        self.b.extend_from_slice(&off.to_be_bytes());
        if self.extended {
            self.b.extend_from_slice(&len.to_be_bytes());
        } else {
            self.b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.b.extend_from_slice(payload);
        self
    }
    /// A mix of every command, including degenerate ones.
    fn requests(self) -> Self {
        let data = vec![0x5au8; 4096];
        self.req(1, 0, 1, 0, 4096, &data)
            .req(0, 0, 2, 0, 4096, &[])
            .req(1, 1, 3, 6000, 100, &data[..100])
            .req(0, 0, 4, 5999, 102, &[])
            .req(3, 0, 5, 0, 0, &[])
            .req(4, 0, 6, 65536, 65536, &[])
            .req(6, 2, 7, 131072, 8192, &[])
            .req(5, 0, 8, 0, 4096, &[])
            .req(7, 0, 9, 0, 1 << 20, &[])
            .req(0, 0, 10, 4096, 0, &[])
            .req(1, 0, 11, 8192, 0, &[])
            .req(2, 0, 12, 0, 0, &[])
    }
}

fn nbd() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("simple-ram".into(), Nbd::new().go("m").requests().b),
        ("structured-qcow2".into(), Nbd::new().opt(8, &[]).meta("q").go("q").requests().b),
        (
            "list-info-abort".into(),
            Nbd::new().opt(3, &[]).opt(6, &Nbd::name("q", &[0, 1, 0, 3])).opt(2, &[]).b,
        ),
        ("export-name-ro".into(), {
            let mut s = Nbd::new();
            s.b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            s.b.extend_from_slice(&1u32.to_be_bytes());
            s.b.extend_from_slice(&2u32.to_be_bytes());
            s.b.extend_from_slice(b"ro");
            s.requests().b
        }),
        (
            "odd-options".into(),
            Nbd::new()
                .opt(5, &[])
                .opt(99, &[1, 2, 3])
                .opt(9, &Nbd::name("m", &[0; 4]))
                .go("nope")
                .go("")
                .b,
        ),
    ];
    let mut ext = Nbd::new().opt(11, &[]).meta("q").go("q");
    ext.extended = true;
    v.push(("extended-qcow2".into(), ext.requests().req(4, 0x20, 13, 0, 8, &[0; 8]).b));
    v
}

// --- vhost-user ----------------------------------------------------------------------

fn msg(out: &mut Vec<u8>, code: u32, payload: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

fn le(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for (&p, &w) in parts.iter().zip(widths) {
        v.extend_from_slice(&p.to_le_bytes()[..w]);
    }
    v
}

/// Guest memory with a split ring at 0 (descriptors), 0x1000 (avail), 0x2000 (used)
/// holding one read request of 4 KiB.
fn ring_memory() -> Vec<u8> {
    let mut m = vec![0u8; 0x8000];
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = i * 16;
        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x4000, 16, 1, 1);
    desc(1, 0x5000, 4096, 3, 2);
    desc(2, 0x7000, 1, 2, 0);
    m[0x1002..0x1004].copy_from_slice(&1u16.to_le_bytes()); // avail idx
    m[0x1004..0x1006].copy_from_slice(&0u16.to_le_bytes()); // ring[0] = head 0
    m
}

fn vhost() -> Vec<(String, Vec<u8>)> {
    let va = 0x7f00_0000_0000u64;
    let mut setup = Vec::new();
    msg(&mut setup, 1, &[]); // GET_FEATURES
    msg(&mut setup, 3, &[]); // SET_OWNER
    msg(&mut setup, 15, &[]); // GET_PROTOCOL_FEATURES
    msg(&mut setup, 16, &le(&[0x1 | 0x2 | 0x200 | 0x8], &[8])); // MQ, LOG_SHMFD?, CONFIG, REPLY_ACK
    msg(&mut setup, 2, &le(&[(1 << 32) | (1 << 30) | (1 << 28) | (1 << 9)], &[8]));
    msg(&mut setup, 17, &[]); // GET_QUEUE_NUM
    msg(
        &mut setup,
        24,
        &le(&[0, 60, 0], &[4, 4, 4]).into_iter().chain([0u8; 60]).collect::<Vec<_>>(),
    );
    let region = le(&[1, 0, 0, 2 << 20, va, 0], &[4, 4, 8, 8, 8, 8]);
    msg(&mut setup, 5, &region); // SET_MEM_TABLE
    msg(&mut setup, 8, &le(&[0, 16], &[4, 4])); // SET_VRING_NUM
    msg(&mut setup, 9, &le(&[0, 0, va, va + 0x2000, va + 0x1000, 0], &[4, 4, 8, 8, 8, 8]));
    msg(&mut setup, 10, &le(&[0, 0], &[4, 4])); // SET_VRING_BASE
    msg(&mut setup, 13, &le(&[0], &[8])); // SET_VRING_CALL
    msg(&mut setup, 12, &le(&[0], &[8])); // SET_VRING_KICK
    msg(&mut setup, 18, &le(&[0, 1], &[4, 4])); // SET_VRING_ENABLE
    let mut full = setup.clone();
    msg(&mut full, 11, &le(&[0, 0], &[4, 4])); // GET_VRING_BASE
    let mem = ring_memory();
    let with_mem = |msgs: &[u8]| {
        let mut v = (mem.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&mem);
        v.extend_from_slice(msgs);
        v
    };
    let mut bad = setup.clone();
    msg(&mut bad, 8, &le(&[7, 3], &[4, 4])); // a queue size that is no power of two
    msg(
        &mut bad,
        5,
        &le(&[2, 0, 0, 1 << 40, va, 0, 1 << 40, 1 << 40, va, 0], &[4, 4, 8, 8, 8, 8, 8, 8, 8, 8]),
    );
    vec![
        ("qemu-start-stop".into(), with_mem(&full)),
        ("running-queue".into(), with_mem(&setup)),
        ("bad-values".into(), with_mem(&bad)),
    ]
}

// --- virtqueue chains --------------------------------------------------------------

fn chain(
    kind: u32,
    sector: u64,
    descs: &[(u64, u32, u16, u16)],
    extra: &[(usize, &[u8])],
) -> Vec<u8> {
    let mut m = vec![0u8; 0x8000];
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let at = i * 16;
        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    m[0x4000..0x4004].copy_from_slice(&kind.to_le_bytes());
    m[0x4008..0x4010].copy_from_slice(&sector.to_le_bytes());
    for &(at, bytes) in extra {
        m[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let mut v = 16u16.to_le_bytes().to_vec(); // queue size
    v.extend_from_slice(&0u16.to_le_bytes()); // head
    v.push(1); // indirect allowed
    v.extend_from_slice(&m);
    v
}

fn chains() -> Vec<(String, Vec<u8>)> {
    let hdr = (0x4000, 16, 1, 1);
    let range = {
        let mut r = 8u64.to_le_bytes().to_vec();
        r.extend_from_slice(&16u32.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r
    };
    vec![
        ("read".into(), chain(0, 0, &[hdr, (0x5000, 4096, 3, 2), (0x7000, 1, 2, 0)], &[])),
        ("write".into(), chain(1, 8, &[hdr, (0x5000, 4096, 1, 2), (0x7000, 1, 2, 0)], &[])),
        ("flush".into(), chain(4, 0, &[hdr, (0x7000, 1, 2, 0)], &[])),
        ("get-id".into(), chain(8, 0, &[hdr, (0x5000, 20, 3, 2), (0x7000, 1, 2, 0)], &[])),
        (
            "write-zeroes".into(),
            chain(13, 0, &[hdr, (0x5000, 16, 1, 2), (0x7000, 1, 2, 0)], &[(0x5000, &range)]),
        ),
        (
            "indirect-read".into(),
            chain(
                0,
                0,
                &[(0x6000, 48, 4, 0)],
                &[(0x6000, &{
                    let mut t = Vec::new();
                    for &(a, l, f, n) in
                        &[(0x4000u64, 16u32, 1u16, 1u16), (0x5000, 512, 3, 2), (0x7000, 1, 2, 0)]
                    {
                        t.extend_from_slice(&a.to_le_bytes());
                        t.extend_from_slice(&l.to_le_bytes());
                        t.extend_from_slice(&f.to_le_bytes());
                        t.extend_from_slice(&n.to_le_bytes());
                    }
                    t
                })],
            ),
        ),
        (
            "second-region".into(),
            chain(0, 0, &[hdr, (1 << 20, 4096, 3, 2), (0x7000, 1, 2, 0)], &[]),
        ),
    ]
}

// --- config -------------------------------------------------------------------------

fn configs() -> Vec<(String, Vec<u8>)> {
    let example =
        std::fs::read(crate::workspace().join("examples/appliance.toml")).unwrap_or_default();
    vec![
        ("example".into(), example),
        (
            "small".into(),
            b"[appliance]\ncores = [0]\nidle = \"busy\"\n[nbd]\nlisten = [\"unix:/tmp/n.sock\"]\nidle_timeout = 2.5\n[[disk]]\nname = \"a\"\ndriver = \"null\"\nsize = \"1G\"\n[disk.qos]\niops = 10\n"
                .to_vec(),
        ),
    ]
}
