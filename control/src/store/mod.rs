//! The controller's store: SQLite (embedded, one file, nothing to
//! install) or PostgreSQL (several controllers), through one query layer
//! ([`sql`]).
//!
//! The database is the source of truth; each controller keeps the whole
//! state in memory ([`Db`]) as a cache that knows the number of the last
//! change it holds. Every change is a list of [`Op`]s written in one
//! transaction, after catching the cache up and *before* the cache moves,
//! so a failed write changes nothing anywhere; reads catch up first too
//! ([`Db::refresh`]), so any controller reads its own and everyone else's
//! committed writes. Schema changes are numbered migrations in
//! `control/migrations/`, applied in order and recorded in
//! `schema_version`.

mod copy;
mod location;
pub mod sql;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::ConfigError;
use crate::model::{Amphora, Counters, HealthMonitor, Listener, LoadBalancer, Member, Pool, State};

pub use copy::{copy, Copied};
pub use location::Database;
pub use sql::{Followed, Heard, Store};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database {name}: {source}")]
    Open { name: String, source: sqlx::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database schema version {found} is newer than this controller knows ({known})")]
    TooNew { found: i64, known: i64 },
    /// The database cannot be reached (down, restarting, network): the
    /// write did not happen; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// An API read did not get an answer in time.
    #[error("database did not answer within {0:?}")]
    Slow(Duration),
    /// The database is known lost and another read tried it within the
    /// last second.
    #[error("database unreachable; tried again within a second")]
    Lost,
    #[error("database: {0}")]
    Sql(sqlx::Error),
    /// The write was made under a claim another controller has taken
    /// over since: its outcome is the other's to write.
    #[error("claim on {job} was taken over (fence {fence}); nothing written")]
    ClaimLost { job: String, fence: i64 },
    #[error(
        "database {name} is not empty ({rows} rows in {table}): copy only into a new database"
    )]
    NotEmpty {
        name: String,
        table: &'static str,
        rows: i64,
    },
    #[error("database holds a document that does not parse ({table} {id}): {message}")]
    Corrupt {
        table: &'static str,
        id: String,
        message: String,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        if unreachable(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Sql(e)
        }
    }
}

/// Errors that say the database is not there, as opposed to a statement
/// it refused.
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // PostgreSQL's classes 08 (connection exception), 57P (operator
        // intervention: shutdown, starting up) and 53300 (too many
        // connections).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Slow(_) | StoreError::Lost
        )
    }
}

/// A claim as the database knows it ([`crate::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub job: String,
    pub holder: String,
    /// Bumped at every taking of the claim.
    pub number: i64,
}

tokio::task_local! {
    /// The claim the current task works under: its writes are fenced.
    pub static FENCE: Fence;
}

/// One stored object.
#[derive(Debug, Clone)]
pub enum Object {
    LoadBalancer(LoadBalancer),
    Listener(Listener),
    Pool(Pool),
    Member(Member),
    HealthMonitor(HealthMonitor),
    Amphora(Amphora),
}

/// The tables objects live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    LoadBalancer,
    Listener,
    Pool,
    Member,
    HealthMonitor,
    Amphora,
}

impl Kind {
    pub fn table(self) -> &'static str {
        match self {
            Kind::LoadBalancer => "load_balancer",
            Kind::Listener => "listener",
            Kind::Pool => "pool",
            Kind::Member => "member",
            Kind::HealthMonitor => "health_monitor",
            Kind::Amphora => "amphora",
        }
    }
}

/// One change.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Box<Object>),
    Delete(Kind, String),
    /// Counters as `amphora`'s dataplane reported them in heartbeat
    /// `seq` (totals move by the difference, in the database).
    Stats {
        listener: String,
        amphora: String,
        seq: u64,
        raw: Counters,
    },
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::LoadBalancer(_) => Kind::LoadBalancer,
            Object::Listener(_) => Kind::Listener,
            Object::Pool(_) => Kind::Pool,
            Object::Member(_) => Kind::Member,
            Object::HealthMonitor(_) => Kind::HealthMonitor,
            Object::Amphora(_) => Kind::Amphora,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Object::LoadBalancer(v) => &v.common.id,
            Object::Listener(v) => &v.common.id,
            Object::Pool(v) => &v.common.id,
            Object::Member(v) => &v.common.id,
            Object::HealthMonitor(v) => &v.common.id,
            Object::Amphora(v) => &v.id,
        }
    }
}

impl Op {
    pub fn put(o: impl Into<Object>) -> Op {
        Op::Put(Box::new(o.into()))
    }
}

/// Applies `ops` to the in-memory state (after they were committed).
pub fn apply(state: &mut State, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put(o) => match *o {
                Object::LoadBalancer(v) => {
                    state.load_balancers.insert(v);
                }
                Object::Listener(v) => {
                    state.listeners.insert(v);
                }
                Object::Pool(v) => {
                    state.pools.insert(v);
                }
                Object::Member(v) => {
                    state.members.insert(v);
                }
                Object::HealthMonitor(v) => {
                    state.health_monitors.insert(v);
                }
                Object::Amphora(v) => {
                    state.amphorae.insert(v);
                }
            },
            Op::Delete(kind, id) => match kind {
                Kind::LoadBalancer => {
                    state.load_balancers.remove(&id);
                }
                Kind::Listener => {
                    state.listeners.remove(&id);
                    let gone: Vec<(String, String)> =
                        state.stats_of(&id).map(|(k, _)| k.clone()).collect();
                    for k in gone {
                        state.stats.remove(&k);
                    }
                }
                Kind::Pool => {
                    state.pools.remove(&id);
                }
                Kind::Member => {
                    state.members.remove(&id);
                }
                Kind::HealthMonitor => {
                    state.health_monitors.remove(&id);
                }
                Kind::Amphora => {
                    state.amphorae.remove(&id);
                }
            },
            // Totals are the database's sum: read back after the write.
            Op::Stats { .. } => {}
        }
    }
}

/// A change being built: the ops to write, in order.
#[derive(Debug, Default)]
pub struct Tx {
    ops: Vec<Op>,
}

impl Tx {
    pub fn put(&mut self, o: impl Into<Object>) {
        self.ops.push(Op::Put(Box::new(o.into())));
    }

    pub fn delete(&mut self, kind: Kind, id: &str) {
        self.ops.push(Op::Delete(kind, id.to_owned()));
    }

    pub fn stats(&mut self, listener: &str, amphora: &str, seq: u64, raw: Counters) {
        self.ops.push(Op::Stats {
            listener: listener.to_owned(),
            amphora: amphora.to_owned(),
            seq,
            raw,
        });
    }

    /// Puts a copy of row `id` of `table` changed by `f`; nothing when
    /// there is no such row.
    pub fn edit<T: Clone + Into<Object>>(
        &mut self,
        table: &crate::model::Table<T>,
        id: &str,
        f: impl FnOnce(&mut T),
    ) {
        if let Some(row) = table.get(id) {
            let mut row = row.clone();
            f(&mut row);
            self.put(row);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

macro_rules! object_from {
    ($($t:ident),*) => {
        $(impl From<$t> for Object {
            fn from(v: $t) -> Object {
                Object::$t(v)
            }
        })*
    };
}
object_from!(LoadBalancer, Listener, Pool, Member, HealthMonitor, Amphora);

/// The store and the cache of it, kept in step.
///
/// Readers share the cache (an `RwLock`), so lists and gets, which write
/// their JSON while they read, run on every core at once. Writers (and
/// catch-ups) take turns in this process (`turn`), and on PostgreSQL with
/// every other controller (an advisory lock): each catches the cache up,
/// builds its change against it, commits, and only then holds the cache
/// exclusively, for the apply alone.
#[derive(Debug)]
pub struct Db {
    store: Store,
    turn: tokio::sync::Mutex<()>,
    state: RwLock<State>,
    /// The change the cache holds (written with the cache).
    seq: AtomicI64,
    /// Since when the database has not answered (None: it does).
    lost: Mutex<Option<Instant>>,
    /// When an API read last tried the database while it was lost.
    probed: Mutex<Option<Instant>>,
    /// Woken whenever the cache moves to a newer change (followers of
    /// the changes wait on it).
    moved: tokio::sync::Notify,
}

/// How long an API read waits for the database before it answers from
/// the cache, marked stale.
pub const READ_WAIT: Duration = Duration::from_millis(500);

/// While the database is lost, one API read a second tries it.
const PROBE_EVERY: Duration = Duration::from_secs(1);

// A panic while holding a lock cannot leave the state half applied
// (commit happens first, then a plain apply), so a poisoned lock is used
// as it is.
fn unpoisoned<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

impl Db {
    pub async fn open(db: &Database) -> Result<Db, StoreError> {
        let store = Store::open(db).await?;
        let mut tx = store.begin_read().await?;
        let (seq, state) = sql::load(&mut tx).await?;
        tx.commit().await?;
        Ok(Db {
            store,
            turn: tokio::sync::Mutex::new(()),
            state: RwLock::new(state),
            seq: AtomicI64::new(seq),
            lost: Mutex::new(None),
            probed: Mutex::new(None),
            moved: tokio::sync::Notify::new(),
        })
    }

    /// Reads the cache. API reads call [`Db::refresh`] first.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let state = unpoisoned(self.state.read());
        f(&state)
    }

    /// Catches the cache up with every committed change (one query when
    /// there is none).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        self.guarded(self.try_refresh()).await
    }

    /// Runs `op` on the database: refused at once (with the cause) while
    /// the database is known lost, a pool timeout explained, and whether
    /// the database answered remembered for [`Db::stale_for`].
    async fn guarded<R>(
        &self,
        op: impl std::future::Future<Output = Result<R, StoreError>>,
    ) -> Result<R, StoreError> {
        let r = match self.reachable().await {
            Ok(()) => op.await,
            Err(e) => Err(e),
        };
        let r = match r {
            Err(e) => Err(self.explain(e).await),
            ok => ok,
        };
        self.note(r.as_ref().err());
        r
    }

    /// While the database is known lost, whether it takes a connection
    /// again (within [`READ_WAIT`]): until it does, work that needs it
    /// fails at once, with the reason, instead of waiting out the pool.
    async fn reachable(&self) -> Result<(), StoreError> {
        if self.stale_for().is_none() {
            return Ok(());
        }
        self.store.reach(READ_WAIT).await
    }

    /// A pool that timed out says nothing of why: a connection made
    /// outside it does (refused, no route). When that one succeeds, the
    /// pool's connections were all busy, and the timeout stands.
    async fn explain(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Unavailable(sqlx::Error::PoolTimedOut) => {
                match self.store.reach(READ_WAIT).await {
                    Err(why) => why,
                    Ok(()) => e,
                }
            }
            e => e,
        }
    }

    /// Records heartbeats heard ([`Store::hear`]), failing at once while
    /// the database is known lost, as writes do.
    pub async fn hear(&self, rows: &[Heard<'_>]) -> Result<(), StoreError> {
        self.guarded(self.store.hear(rows)).await
    }

    /// [`Db::refresh`] for an API read: within [`READ_WAIT`], and while
    /// the database is known lost tried by one read a second only, so
    /// reads answer from the cache at once during an outage.
    pub async fn refresh_read(&self) -> Result<(), StoreError> {
        if self.stale_for().is_some() {
            let now = Instant::now();
            let mut probed = unpoisoned(self.probed.lock());
            if probed.is_some_and(|t| now.saturating_duration_since(t) < PROBE_EVERY) {
                return Err(StoreError::Lost);
            }
            *probed = Some(now);
        }
        match tokio::time::timeout(READ_WAIT, self.refresh()).await {
            Ok(r) => r,
            Err(_) => {
                let e = StoreError::Slow(READ_WAIT);
                self.note(Some(&e));
                Err(e)
            }
        }
    }

    async fn try_refresh(&self) -> Result<(), StoreError> {
        if self.store.head().await? == self.seq.load(Ordering::Acquire) {
            return Ok(());
        }
        let _turn = self.turn.lock().await;
        let mut tx = self.store.begin_read().await?;
        self.catch_up(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn catch_up(&self, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
        let since = self.seq.load(Ordering::Acquire);
        let caught = sql::catch_up(conn, since).await?;
        let mut state = unpoisoned(self.state.write());
        match caught {
            sql::Caught::Current => {}
            sql::Caught::Whole(head, s) => {
                *state = *s;
                self.seq.store(head, Ordering::Release);
                self.moved.notify_waiters();
            }
            sql::Caught::Rows {
                head,
                puts,
                deletes,
                stats,
            } => {
                let mut ops: Vec<Op> = deletes
                    .into_iter()
                    .map(|(k, id)| Op::Delete(k, id))
                    .collect();
                ops.extend(puts.into_iter().map(|o| Op::Put(Box::new(o))));
                apply(&mut state, ops);
                replace_stats(&mut state, stats);
                self.seq.store(head, Ordering::Release);
                self.moved.notify_waiters();
            }
        }
        Ok(())
    }

    /// Runs `f` on the current state (caught up with every controller's
    /// committed changes); the ops it records are committed and applied
    /// only if it returns `Ok`, all of them or none.
    pub async fn write<R, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&State, &mut Tx) -> Result<R, E>,
    ) -> Result<R, E> {
        let r = match self.reachable().await {
            Ok(()) => self.try_write(f).await,
            Err(e) => Err(Failed::Store(e)),
        };
        let r = match r {
            Err(Failed::Store(e)) => Err(Failed::Store(self.explain(e).await)),
            r => r,
        };
        match &r {
            Err(Failed::Store(e)) => self.note(Some(e)),
            _ => self.note(None),
        }
        r.map_err(|e| match e {
            Failed::Store(e) => E::from(e),
            Failed::Refused(e) => e,
        })
    }

    async fn try_write<R, E>(
        &self,
        f: impl FnOnce(&State, &mut Tx) -> Result<R, E>,
    ) -> Result<R, Failed<E>> {
        // Writers go one at a time, so the state `f` saw is still the
        // state when its ops are applied.
        let _turn = self.turn.lock().await;
        let mut db = self.store.begin_write().await?;
        if let Ok(f) = FENCE.try_with(Fence::clone) {
            if !sql::holds(&mut db, &f).await? {
                return Err(Failed::Store(StoreError::ClaimLost {
                    job: f.job,
                    fence: f.number,
                }));
            }
        }
        self.catch_up(&mut db).await?;
        let mut tx = Tx::default();
        let r = {
            let state = unpoisoned(self.state.read());
            f(&state, &mut tx).map_err(Failed::Refused)?
        };
        if tx.ops.is_empty() {
            db.commit().await?;
            return Ok(r);
        }
        let (seq, stats) = sql::write_ops(&mut db, &tx.ops).await?;
        db.commit().await?;
        let mut state = unpoisoned(self.state.write());
        apply(&mut state, tx.ops);
        replace_stats(&mut state, stats);
        self.seq.store(seq, Ordering::Release);
        self.moved.notify_waiters();
        Ok(r)
    }

    /// Remembers whether the database answered, for [`Db::stale_for`].
    fn note(&self, failed: Option<&StoreError>) {
        let mut lost = unpoisoned(self.lost.lock());
        match failed {
            None => *lost = None,
            Some(e) if e.is_unavailable() => {
                lost.get_or_insert_with(Instant::now);
            }
            Some(_) => {}
        }
    }

    /// How long the database has been out of reach (None: it answers):
    /// reads served from the cache meanwhile say so.
    pub fn stale_for(&self) -> Option<Duration> {
        unpoisoned(self.lost.lock()).map(|t| t.elapsed())
    }

    /// The number of the change the cache holds.
    pub fn seq(&self) -> i64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Waits until the cache moves past `since` or `within` passes. The
    /// cache moves with this controller's writes at once, and with other
    /// controllers' within a second (each second the database is asked).
    pub async fn wait_past(&self, since: i64, within: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let moved = self.moved.notified();
            self.refresh_read().await?;
            let now = tokio::time::Instant::now();
            if self.seq() != since || now >= deadline {
                return Ok(());
            }
            let _ =
                tokio::time::timeout_at(deadline.min(now + Duration::from_secs(1)), moved).await;
        }
    }

    /// What changed after `since`, up to the change the cache holds (call
    /// [`Db::refresh`] first): the rows to report and that number.
    pub async fn changed_since(&self, since: i64) -> Result<(i64, Followed), StoreError> {
        let upto = self.seq();
        self.guarded(async {
            let mut tx = self.store.begin_read().await?;
            let f = sql::changed_since(&mut tx, since, upto).await?;
            tx.commit().await?;
            Ok(f)
        })
        .await
        .map(|f| (upto, f))
    }

    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.store.schema_version().await
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Each listener's stats rows as read from the database, in place of
/// the cached ones.
fn replace_stats(state: &mut State, stats: Vec<(String, Vec<(String, Counters)>)>) {
    for (listener, rows) in stats {
        let gone: Vec<(String, String)> =
            state.stats_of(&listener).map(|(k, _)| k.clone()).collect();
        for k in gone {
            state.stats.remove(&k);
        }
        for (amphora, c) in rows {
            state.stats.insert((listener.clone(), amphora), c);
        }
    }
}

/// Why a write did not happen: the database, or `f` said no.
enum Failed<E> {
    Store(StoreError),
    Refused(E),
}

impl<E> From<StoreError> for Failed<E> {
    fn from(e: StoreError) -> Failed<E> {
        Failed::Store(e)
    }
}

impl<E> From<sqlx::Error> for Failed<E> {
    fn from(e: sqlx::Error) -> Failed<E> {
        Failed::Store(e.into())
    }
}
