//! A worker's live view of the current generation's pools: each pool's
//! balancer as the health thread last published it, and the worker's own
//! pick state (the least-connections heaps; the round-robin position is
//! in the balancer, shared by all workers).
//!
//! A health change replaces one pool's balancer by message, so the
//! forwarding path reads it without a lock. Connections of an older
//! generation choose with their own pool's balancer and a throwaway state.

use std::sync::Arc;

use crate::balance::{Balancer, FlowKey, PickState};
use crate::snapshot::{PoolRt, Snapshot};

#[derive(Debug)]
struct Live {
    pool: Arc<PoolRt>,
    balancer: Arc<Balancer>,
    pick: PickState,
}

#[derive(Debug, Default)]
pub struct LivePools {
    pools: Vec<Live>,
}

impl LivePools {
    /// Starts over on a new generation.
    pub fn reset(&mut self, snapshot: &Snapshot) {
        self.pools = snapshot
            .pools
            .iter()
            .map(|p| Live {
                pool: p.clone(),
                balancer: p.balancer.clone(),
                pick: PickState::default(),
            })
            .collect();
    }

    /// Takes a rebuilt balancer for `pool`; ignored if `pool` is not of the
    /// current generation (an apply overtook the health change, and the
    /// new generation was built with the newer health state).
    pub fn set_balancer(&mut self, pool: &Arc<PoolRt>, balancer: Arc<Balancer>) {
        if let Some(l) = self.current(pool) {
            l.balancer = balancer;
            // Positions and weights may have changed under the heaps.
            l.pick = PickState::default();
        }
    }

    /// Picks a member of `pool` for `flow`, never one in `tried`.
    pub fn choose(&mut self, pool: &Arc<PoolRt>, flow: &FlowKey, tried: &[u16]) -> Option<u16> {
        let members = &pool.members;
        let active = |i: u16| members.get(usize::from(i)).map_or(0, |m| m.stats.active());
        match self.current(pool) {
            Some(l) => l.balancer.choose(flow, &mut l.pick, &active, tried),
            None => pool
                .balancer
                .choose(flow, &mut PickState::default(), &active, tried),
        }
    }

    fn current(&mut self, pool: &Arc<PoolRt>) -> Option<&mut Live> {
        self.pools
            .get_mut(pool.index)
            .filter(|l| Arc::ptr_eq(&l.pool, pool))
    }
}
