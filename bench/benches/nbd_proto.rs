//! NBD wire encoding: request header parsing and reply header encoding, the per-request
//! protocol work of the export.

use std::hint::black_box;

use appliance::nbd::proto::{
    self, CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, ReplyMode, Request,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn request() -> Request {
    Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 0x1234_5678_9abc_def0,
        offset: 1 << 30,
        length: 4096,
    }
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd parse");
    g.throughput(Throughput::Elements(1));
    for extended in [false, true] {
        let mut buf = [0u8; 32];
        let n = proto::encode_request(&request(), extended, &mut buf);
        let name = if extended { "extended request" } else { "request" };
        g.bench_function(name, |b| {
            b.iter(|| proto::parse_request(black_box(&buf[..n]), black_box(extended)).unwrap())
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd encode");
    g.throughput(Throughput::Elements(1));
    let r = request();
    let mut out = [0u8; 128];
    g.bench_function("request", |b| {
        b.iter(|| proto::encode_request(black_box(&r), false, black_box(&mut out)))
    });
    g.bench_function("simple reply", |b| {
        b.iter(|| proto::encode_simple(black_box(&mut out), 0, black_box(r.cookie)))
    });
    for (name, mode) in [
        ("structured read chunk", ReplyMode::Structured),
        ("extended read chunk", ReplyMode::Extended),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let n = proto::encode_chunk(
                    black_box(&mut out),
                    mode,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    black_box(r.cookie),
                    black_box(r.offset),
                    8 + r.length,
                );
                // The data chunk's offset field follows the header, as the export writes it.
                out[n..n + 8].copy_from_slice(&r.offset.to_be_bytes());
                n + 8
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
