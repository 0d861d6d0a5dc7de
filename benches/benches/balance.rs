//! Backend choice per algorithm (one new flow each) for pools of 10, 1,000
//! and 10,000 members with weights 1..=4. `LEAST_CONNECTIONS` sees fixed
//! active counts, so every pick does the same work as the last.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use siphon_dataplane::balance::{Balancer, Candidate, FlowKey, PickState};
use siphon_proto::config::LbAlgorithm;

fn members(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            id: format!("member-{i:05}"),
            weight: 1 + (i as u32 % 4),
            backup: false,
            usable: true,
        })
        .collect()
}

fn choose(c: &mut Criterion) {
    let mut g = c.benchmark_group("choose");
    for n in [10usize, 1000, 10_000] {
        let members = members(n);
        let active: Vec<u64> = (0..n).map(|i| (i * 7 % 13) as u64).collect();
        for algo in [
            LbAlgorithm::RoundRobin,
            LbAlgorithm::LeastConnections,
            LbAlgorithm::SourceIp,
            LbAlgorithm::SourceIpPort,
            LbAlgorithm::Maglev,
        ] {
            let balancer = Balancer::new(&members, algo, 65537);
            let mut state = PickState::default();
            let mut port = 1024u16;
            g.bench_function(BenchmarkId::new(format!("{algo:?}"), n), |b| {
                b.iter(|| {
                    port = port.wrapping_add(1).max(1024);
                    let flow = FlowKey {
                        src: SocketAddr::from(([198, 18, 0, 1], port)),
                        dst: SocketAddr::from(([198, 19, 0, 1], 443)),
                    };
                    balancer.choose(
                        black_box(&flow),
                        &mut state,
                        &|i| active.get(usize::from(i)).copied().unwrap_or(0),
                        &[],
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, choose);
criterion_main!(benches);
