//! Spare amphorae: which are handed out, and which a scale-in releases.

use std::collections::HashSet;

use thiserror::Error;

use crate::decide::Policy;
use crate::liveness::View;
use crate::model::{Amphora, AmphoraStatus, LoadBalancer, State};

/// Fewer spare amphorae than a load balancer needs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("No spare amphora available: {needed} needed, {ready} READY. Register amphorae in the controller config or with POST /v2/octavia/amphorae.")]
pub struct NoSpare {
    pub needed: usize,
    pub ready: usize,
}

/// Every spare (`READY`, carrying nothing), the most recently heard
/// first (the likeliest alive), then by id.
pub fn all<'a>(s: &'a State, view: &View) -> Vec<&'a Amphora> {
    let mut ready: Vec<&Amphora> = s
        .amphorae
        .values()
        .filter(|a| a.status == AmphoraStatus::Ready && a.load_balancer_id.is_none())
        .collect();
    ready.sort_by(|a, b| {
        view.last_heard(&b.id)
            .cmp(&view.last_heard(&a.id))
            .then_with(|| a.id.cmp(&b.id))
    });
    ready
}

/// The `n` best spares, or how many there are.
pub fn take<'a>(s: &'a State, view: &View, n: usize) -> Result<Vec<&'a Amphora>, NoSpare> {
    let mut ready = all(s, view);
    if ready.len() < n {
        return Err(NoSpare {
            needed: n,
            ready: ready.len(),
        });
    }
    ready.truncate(n);
    Ok(ready)
}

/// A spare for each of `failed` (in order) while there are spares, none
/// of them in `taken` (handed out earlier in the same change): pairs of
/// (failed amphora, its replacement).
pub fn replacements(
    s: &State,
    view: &View,
    failed: &[String],
    taken: &HashSet<String>,
) -> Vec<(String, String)> {
    let free = all(s, view)
        .into_iter()
        .filter(|a| !failed.contains(&a.id) && !taken.contains(&a.id));
    failed
        .iter()
        .filter(|id| s.amphorae.contains_key(*id))
        .cloned()
        .zip(free.map(|a| a.id.clone()))
        .collect()
}

/// What a change of a load balancer's amphora count does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scale {
    /// Scale-out: these spares join it.
    Take(Vec<String>),
    /// Scale-in: these leave it (emptied once no VIP traffic reaches
    /// them, then spares again).
    Release(Vec<String>),
}

/// Scale-out takes the best spares (all or none). Scale-in releases
/// first the amphorae not serving (silent, not `ALLOCATED`, or not yet
/// holding the VIP), then the most recently registered: the ones kept
/// are the longest-serving healthy ones.
pub fn scale(
    s: &State,
    view: &View,
    p: &Policy,
    lb: &LoadBalancer,
    n: u32,
) -> Result<Scale, NoSpare> {
    let serving = |a: &Amphora| {
        a.status == AmphoraStatus::Allocated
            && a.vips.contains(&lb.vip_address)
            && !p.silent(view, &a.id)
    };
    let mut mine: Vec<&Amphora> = s.amphorae_of(&lb.common.id).collect();
    let n = n as usize;
    if n > mine.len() {
        let got = take(s, view, n - mine.len())?;
        return Ok(Scale::Take(got.into_iter().map(|a| a.id.clone()).collect()));
    }
    mine.sort_by_key(|a| (!serving(a), a.created_at.clone(), a.id.clone()));
    Ok(Scale::Release(
        mine.into_iter().skip(n).map(|a| a.id.clone()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{policy, World, SEC};

    fn ids(v: Vec<&Amphora>) -> Vec<&str> {
        v.into_iter().map(|a| a.id.as_str()).collect()
    }

    #[test]
    fn the_most_recently_heard_spare_goes_first_then_by_id() {
        let mut w = World::new();
        w.lb("lb", 1, 1).amp("busy", Some("lb"), Some(SEC));
        w.amp("old", None, Some(50 * SEC))
            .amp("fresh", None, Some(SEC))
            .amp("b-never", None, None)
            .amp("a-never", None, None);
        assert_eq!(
            ids(all(&w.state, &w.view)),
            ["fresh", "old", "a-never", "b-never"]
        );
    }

    #[test]
    fn only_ready_amphorae_carrying_nothing_are_spares() {
        let mut w = World::new();
        w.amp("booting", None, None)
            .amp("error", None, None)
            .amp("stopped", None, None)
            .amp("ready", None, None);
        w.amphora("booting", |a| a.status = AmphoraStatus::Booting);
        w.amphora("error", |a| a.status = AmphoraStatus::Error);
        w.amphora("stopped", |a| a.status = AmphoraStatus::FailoverStopped);
        assert_eq!(ids(all(&w.state, &w.view)), ["ready"]);
    }

    #[test]
    fn taking_more_spares_than_there_are_takes_none_and_says_how_many() {
        let mut w = World::new();
        w.amp("s1", None, Some(SEC)).amp("s2", None, Some(2 * SEC));
        assert_eq!(ids(take(&w.state, &w.view, 1).unwrap()), ["s1"]);
        assert_eq!(
            take(&w.state, &w.view, 3).unwrap_err(),
            NoSpare {
                needed: 3,
                ready: 2
            }
        );
    }

    #[test]
    fn replacements_skip_spares_already_taken_and_stop_when_none_is_left() {
        let mut w = World::new();
        w.lb("lb", 1, 3)
            .amp("a1", Some("lb"), None)
            .amp("a2", Some("lb"), None)
            .amp("a3", Some("lb"), None)
            .amp("s1", None, Some(SEC))
            .amp("s2", None, Some(2 * SEC));
        let failed = ["a1".to_owned(), "a2".to_owned(), "a3".to_owned()];
        let taken: HashSet<String> = ["s1".to_owned()].into();
        assert_eq!(
            replacements(&w.state, &w.view, &failed, &taken),
            [("a1".to_owned(), "s2".to_owned())]
        );
        assert_eq!(
            replacements(&w.state, &w.view, &failed, &HashSet::new()),
            [("a1".into(), "s1".into()), ("a2".into(), "s2".into())]
        );
    }

    #[test]
    fn scale_out_takes_the_best_spares_or_none() {
        let mut w = World::new();
        w.lb("lb", 1, 1)
            .amp("a1", Some("lb"), Some(SEC))
            .amp("s1", None, Some(9 * SEC))
            .amp("s2", None, Some(SEC))
            .amp("s3", None, None);
        let lb = w.state.load_balancers["lb"].clone();
        let p = policy();
        assert_eq!(
            scale(&w.state, &w.view, &p, &lb, 3),
            Ok(Scale::Take(vec!["s2".into(), "s1".into()]))
        );
        assert_eq!(
            scale(&w.state, &w.view, &p, &lb, 5),
            Err(NoSpare {
                needed: 4,
                ready: 3
            })
        );
    }

    #[test]
    fn scale_in_releases_the_silent_and_unpushed_first_then_the_newest() {
        let mut w = World::new();
        w.lb("lb", 1, 5)
            .amp("oldest", Some("lb"), Some(SEC))
            .amp("silent", Some("lb"), Some(10 * SEC))
            .amp("middle", Some("lb"), Some(SEC))
            .amp("unpushed", Some("lb"), Some(SEC))
            .amp("newest", Some("lb"), Some(SEC));
        w.amphora("unpushed", |a| a.vips.clear());
        let lb = w.state.load_balancers["lb"].clone();
        let p = policy();
        let release = |n| match scale(&w.state, &w.view, &p, &lb, n) {
            Ok(Scale::Release(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(release(3), ["silent", "unpushed"]);
        assert_eq!(release(2), ["newest", "silent", "unpushed"]);
        assert_eq!(release(1), ["middle", "newest", "silent", "unpushed"]);
        assert_eq!(release(5), Vec::<String>::new());
    }
}
