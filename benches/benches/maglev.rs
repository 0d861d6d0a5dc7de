//! Maglev table build (10, 100, 1,000 members at M = 65537) and lookup
//! (hash of a client address and port, then the table slot).
#![allow(clippy::expect_used)] // a bench may stop on a broken fixture

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use siphon_dataplane::maglev::{hash_source, Backend, MaglevTable};

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("member-{i:04}")).collect()
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_65537");
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let ids = ids(n);
        let backends: Vec<Backend<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Backend {
                id,
                weight: 1 + (i as u32 % 3),
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &backends, |b, backends| {
            b.iter(|| MaglevTable::build(black_box(backends), 65537))
        });
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let ids = ids(100);
    let backends: Vec<Backend<'_>> = ids.iter().map(|id| Backend { id, weight: 1 }).collect();
    let table = MaglevTable::build(&backends, 65537).expect("table");
    let flows: Vec<SocketAddr> = (0..1024u32)
        .map(|i| SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 10_000 + i as u16)))
        .collect();
    let mut g = c.benchmark_group("maglev_lookup");
    g.throughput(Throughput::Elements(flows.len() as u64));
    g.bench_function("hash_and_lookup_1024_flows", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for f in &flows {
                acc = acc.wrapping_add(u32::from(table.lookup(hash_source(*black_box(f)))));
            }
            acc
        })
    });
    g.finish();
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
