//! Claims: one task, on one controller, works on a [`Job`] at a time.
//!
//! A claim is taken twice: in this process (a set of busy jobs, so two
//! passes never start the same job), and in the database, so that of
//! several controllers sharing it exactly one works on the job. The
//! database claim expires (`cluster.claim_ttl_ms`, on the database's
//! clock, so controllers' clocks do not matter) unless its holder renews
//! it, which it does every third of that while it works: a controller
//! that dies mid-action has its job taken over by another within the
//! expiry, and the action finishes there.
//!
//! Each taking of a claim gets a new fencing number. Work runs under
//! [`Claim::run`], which fences every store write made inside it: the
//! write commits only while the claim is still this holder's with that
//! number, so a controller that stalled past its expiry (a long GC-like
//! pause, a partition) cannot overwrite the outcome of the one that took
//! over. (Pushes themselves are fenced by the dataplane: it refuses a
//! generation older than the one it runs, and generations come from the
//! database.)

use std::future::Future;
use std::sync::Arc;

use crate::store::Fence;
use crate::Controller;

/// What the background tasks work on: one task at a time per job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Job {
    /// Bring a load balancer's amphorae in line with the store (a push,
    /// a repair's re-push).
    LoadBalancer(String),
    /// Empty an amphora taken out of service and return it to the spares.
    Wipe(String),
    /// Push an amphora its own heartbeat key.
    Key(String),
}

impl Job {
    /// The claim's key in the database.
    pub fn key(&self) -> String {
        match self {
            Job::LoadBalancer(id) => format!("loadbalancer:{id}"),
            Job::Wipe(id) => format!("wipe:{id}"),
            Job::Key(id) => format!("key:{id}"),
        }
    }
}

/// A claimed [`Job`]: released, and the provisioner woken to look again,
/// when dropped.
#[derive(Debug)]
pub struct Claim {
    ctl: Arc<Controller>,
    job: Job,
    fence: Option<Fence>,
    renew: Option<tokio::task::JoinHandle<()>>,
}

impl Controller {
    /// Claims `job` for the calling task, or `None` when another task
    /// (here or at another controller) has it, or the database cannot be
    /// reached: the next pass sees the job again.
    pub async fn claim(self: &Arc<Self>, job: Job) -> Option<Claim> {
        let fresh = self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.clone());
        if !fresh {
            return None;
        }
        // From here, dropping `claim` gives the job back.
        let mut claim = Claim {
            ctl: self.clone(),
            job,
            fence: None,
            renew: None,
        };
        let key = claim.job.key();
        let ttl = self.config.cluster.claim_ttl();
        let fence = match self.db.store().take_claim(&key, &self.name, ttl).await {
            Ok(Some(number)) => Fence {
                job: key,
                holder: self.name.clone(),
                number,
            },
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(job = %key, error = %e, "claim not taken");
                return None;
            }
        };
        let ctl = self.clone();
        let held = fence.clone();
        claim.renew = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match ctl.db.store().renew_claim(&held, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(job = %held.job, fence = held.number, "claim taken over by another controller; this one's writes for it are refused");
                        return;
                    }
                    // Renewed at the next turn, or it expires and
                    // another controller takes the job over.
                    Err(e) => tracing::warn!(job = %held.job, error = %e, "claim not renewed"),
                }
            }
        }));
        claim.fence = Some(fence);
        Some(claim)
    }
}

impl Claim {
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Runs `work` with every store write inside it fenced by this claim,
    /// then gives the claim back.
    pub async fn run<F: Future>(self, work: F) -> F::Output {
        match self.fence.clone() {
            Some(f) => crate::store::FENCE.scope(f, work).await,
            None => work.await,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        if let Some(fence) = self.fence.take() {
            // Released at once rather than left to expire, so the next
            // change of the job (here or elsewhere) need not wait.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let ctl = self.ctl.clone();
                rt.spawn(async move {
                    if let Err(e) = ctl.db.store().release_claim(&fence).await {
                        tracing::debug!(job = %fence.job, error = %e, "claim left to expire");
                    }
                });
            }
        }
        self.ctl
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.job);
        self.ctl.wake.notify_one();
    }
}

/// This controller's name in claims and logs, when the config gives
/// none: the host's name, the process id, and a random tag (a restarted
/// controller in a container may get the same pid).
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "controller".into());
    let tag = &crate::new_id()[..8];
    format!("{host}/{}/{tag}", std::process::id())
}
