//! Gives every amphora its own heartbeat key and keeps its agent holding
//! it: a key is made for each amphora that has none, pushed over mutual
//! TLS until the agent took it (retried with back-off), and pushed again
//! whenever the agent shows it lost it (it signs with the bootstrap key).
//! [`rotate`] makes a new key and keeps the old one valid for the grace
//! window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;

use crate::model::{AmphoraStatus, RetiredKey, MAX_OLDER_KEYS};
use crate::{Controller, Job};

/// Makes keys for amphorae without one, and starts a push for each whose
/// agent is not known to hold its key.
pub async fn provision(ctl: &Arc<Controller>) {
    let made = ctl
        .db
        .write(|s, tx| -> Result<usize, crate::store::StoreError> {
            let mut n = 0;
            for a in s.amphorae.values().filter(|a| a.heartbeat_key.is_none()) {
                match crate::heartbeat_keys::generate(1) {
                    Ok(k) => {
                        let mut a = a.clone();
                        a.heartbeat_key = Some(k);
                        a.heartbeat_key_acked = false;
                        tx.put(a);
                        n += 1;
                    }
                    Err(e) => tracing::error!(error = %e, "no heartbeat key made"),
                }
            }
            Ok(n)
        })
        .await;
    if let Err(e) = made {
        tracing::error!(error = %e, "heartbeat keys not stored");
    }
    let now = Instant::now();
    let due: Vec<String> = ctl.db.read(|s| {
        let view = ctl.liveness.view(now);
        s.amphorae
            .values()
            // A failed-over amphora gets its key once it is wiped.
            .filter(|a| a.status != AmphoraStatus::Error)
            .filter(|a| {
                let l = view.get(&a.id);
                (!a.heartbeat_key_acked || l.is_some_and(|l| l.rekey))
                    && l.and_then(|l| l.key_next_try).is_none_or(|t| now >= t)
            })
            .map(|a| a.id.clone())
            .collect()
    });
    for id in due {
        let Some(claim) = ctl.claim(Job::Key(id.clone())).await else {
            continue;
        };
        let ctl = ctl.clone();
        tokio::spawn(claim.run(async move {
            push_key(&ctl, &id).await;
        }));
    }
}

async fn push_key(ctl: &Controller, id: &str) {
    let Some((a, k)) = ctl.db.read(|s| {
        let a = s.amphorae.get(id)?;
        Some((a.clone(), a.heartbeat_key.clone()?))
    }) else {
        return;
    };
    let body = match serde_json::to_vec(&k) {
        Ok(b) => b,
        Err(e) => return tracing::error!(error = %e, "heartbeat key not serialised"),
    };
    let r = crate::provision::push(ctl, &a, Method::PUT, "/v1/heartbeat-key", body, 1).await;
    let wait = ctl
        .liveness
        .key_pushed(id, r.is_ok(), Instant::now(), |n| ctl.policy.backoff(n));
    match r {
        Ok(_) => {
            let _ = ctl
                .db
                .write(|s, tx| -> Result<(), crate::store::StoreError> {
                    if let Some(a) = s.amphorae.get(id) {
                        if a.heartbeat_key.as_ref().map(|k| k.key_id) == Some(k.key_id) {
                            let mut a = a.clone();
                            a.heartbeat_key_acked = true;
                            tx.put(a);
                        }
                    }
                    Ok(())
                })
                .await;
            tracing::info!(amphora = %id, key_id = k.key_id, "heartbeat key pushed");
        }
        Err(e) => {
            let wait = wait.unwrap_or_default();
            tracing::debug!(amphora = %id, error = %e, next_attempt_in_ms = wait.as_millis() as u64, "heartbeat key not pushed yet");
        }
    }
}

/// The amphora's agent signed with the bootstrap key although it was
/// given its own: it may have lost it, so push it again. Nothing else
/// changes: the bootstrap key still does not speak for it (whoever sent
/// this may hold the bootstrap key and not be that amphora).
pub fn request_key(ctl: &Controller, id: &str) {
    if ctl.liveness.request_key(id) {
        tracing::warn!(amphora = %id, "a heartbeat signed with the bootstrap key for an amphora that holds its own: pushing its key again");
    }
}

/// A new key for `id`; the current one stays valid for `grace`, and so do
/// the ones retired before it that are still in their own grace window (a
/// rotation faster than the agent took the last key must not leave the
/// key it signs with behind).
pub fn rotate(
    s: &crate::model::State,
    tx: &mut crate::store::Tx,
    id: &str,
    grace: Duration,
) -> Result<u32, String> {
    let a = s
        .amphorae
        .get(id)
        .ok_or_else(|| format!("Amphora {id} could not be found."))?;
    let next = a
        .heartbeat_key
        .as_ref()
        .map_or(1, |k| k.key_id.saturating_add(1));
    let key = crate::heartbeat_keys::generate(next)?;
    let mut a = a.clone();
    let now = crate::now();
    if let (Some(key), Some(valid_until)) = (
        a.previous_heartbeat_key.take(),
        a.previous_key_valid_until.take(),
    ) {
        a.older_heartbeat_keys.push(RetiredKey { key, valid_until });
    }
    a.older_heartbeat_keys.retain(|k| k.valid_until > now);
    let extra = a.older_heartbeat_keys.len().saturating_sub(MAX_OLDER_KEYS);
    a.older_heartbeat_keys.drain(..extra);
    a.previous_heartbeat_key = a.heartbeat_key.take();
    a.previous_key_valid_until = a
        .previous_heartbeat_key
        .as_ref()
        .map(|_| crate::stamp_in(grace));
    a.heartbeat_key = Some(key);
    a.own_key_held |= a.heartbeat_key_acked;
    a.heartbeat_key_acked = false;
    a.updated_at = Some(crate::now());
    tx.put(a);
    Ok(next)
}
