//! Backend choice per algorithm for a 100-member pool (one new flow each).

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use siphon_dataplane::balance::{Balancer, Candidate, Flow, PickState};
use siphon_dataplane::config::LbAlgorithm;

fn choose(c: &mut Criterion) {
    let members: Vec<Candidate> = (0..100)
        .map(|i| Candidate {
            id: format!("member-{i:03}"),
            weight: 1 + (i % 4),
            backup: false,
            usable: true,
        })
        .collect();
    let active: Vec<u64> = (0..100).map(|i| (i * 7 % 13) as u64).collect();
    let mut g = c.benchmark_group("choose_100_members");
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
        g.bench_function(BenchmarkId::from_parameter(format!("{algo:?}")), |b| {
            b.iter(|| {
                port = port.wrapping_add(1).max(1024);
                let flow = Flow {
                    src: SocketAddr::from(([198, 18, 0, 1], port)),
                    dst: SocketAddr::from(([198, 19, 0, 1], 443)),
                };
                balancer.choose(
                    black_box(&flow),
                    &mut state,
                    &|i| active[usize::from(i)],
                    &[],
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, choose);
criterion_main!(benches);
