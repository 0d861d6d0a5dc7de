//! `siphon-control copy-store`: a single-node install's SQLite store into
//! the (empty) PostgreSQL database several controllers will share.
//!
//! Documents go through the same writes as the controller's (with their
//! change-log rows); counters and heartbeat records are copied row for
//! row, their reported baselines included, so the next heartbeat adds
//! only what is new.

use sqlx::Row;

use super::{sql, Database, Kind, Op, Store, StoreError};

/// What a copy moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub objects: usize,
    pub stats: usize,
    pub heard: usize,
}

const STATS_COLUMNS: &str = "listener_id, amphora_id, bytes_in, bytes_out, active_connections, \
     total_connections, request_errors, raw_bytes_in, raw_bytes_out, raw_total_connections, \
     raw_request_errors, seq";

/// Copies everything in `from` into `to`, which must hold no load
/// balancer and no amphora. Both are migrated to this release's schema
/// first (as starting a controller on them would).
pub async fn copy(from: &Database, to: &Database) -> Result<Copied, StoreError> {
    let src = Store::open(from).await?;
    let dst = Store::open(to).await?;
    let mut tx = dst.begin_write().await?;
    for kind in [Kind::LoadBalancer, Kind::Amphora] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", kind.table()))
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            return Err(StoreError::NotEmpty {
                name: dst.name().to_owned(),
                table: kind.table(),
                rows: n,
            });
        }
    }
    let mut read = src.begin_read().await?;
    let (_, state) = sql::load(&mut read).await?;
    // Parents before children, as the foreign keys want.
    let mut ops: Vec<Op> = Vec::new();
    ops.extend(state.load_balancers.values().cloned().map(Op::put));
    ops.extend(state.listeners.values().cloned().map(Op::put));
    ops.extend(state.pools.values().cloned().map(Op::put));
    ops.extend(state.members.values().cloned().map(Op::put));
    ops.extend(state.health_monitors.values().cloned().map(Op::put));
    ops.extend(state.amphorae.values().cloned().map(Op::put));
    let objects = ops.len();
    sql::write_ops(&mut tx, &ops).await?;
    let stats = sqlx::query(&format!("SELECT {STATS_COLUMNS} FROM listener_stats"))
        .fetch_all(&mut *read)
        .await?;
    let insert = format!(
        "INSERT INTO listener_stats ({STATS_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    );
    for r in &stats {
        let mut q = sqlx::query(&insert)
            .bind(r.try_get::<String, _>(0)?)
            .bind(r.try_get::<String, _>(1)?);
        for i in 2..12 {
            q = q.bind(r.try_get::<i64, _>(i)?);
        }
        q.execute(&mut *tx).await?;
    }
    let heard = sqlx::query("SELECT amphora_id, controller, seq, heard_at FROM heard")
        .fetch_all(&mut *read)
        .await?;
    for r in &heard {
        sqlx::query(
            "INSERT INTO heard (amphora_id, controller, seq, heard_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(r.try_get::<String, _>(0)?)
        .bind(r.try_get::<String, _>(1)?)
        .bind(r.try_get::<i64, _>(2)?)
        .bind(r.try_get::<i64, _>(3)?)
        .execute(&mut *tx)
        .await?;
    }
    read.commit().await?;
    tx.commit().await?;
    Ok(Copied {
        objects,
        stats: stats.len(),
        heard: heard.len(),
    })
}
