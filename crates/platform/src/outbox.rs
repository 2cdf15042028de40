//! The transactional outbox: a service writes its events into its own `outbox` table in the same
//! transaction as the change they describe; the relay publishes them to the `EVENTS` JetStream
//! stream with the event id as `Nats-Msg-Id`, and deletes them only after JetStream acknowledged.
//! A relay that crashes between publishing and deleting publishes again after restart, and
//! JetStream's duplicate window drops the copy: no event is lost or invented.
//!
//! Each service's migrations create the table:
//! `CREATE TABLE outbox (id bigserial PRIMARY KEY, event_id text NOT NULL,
//!  subject text NOT NULL, envelope bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use diesel::sql_types::{Array, BigInt, Bytea, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use syntropism_contracts::{headers, pb, subjects};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::OutboxConfig;
use crate::db::Pool;
use crate::sql::{Statement, sql};

/// How long JetStream remembers message ids for de-duplication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// An event to publish once the surrounding transaction commits.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub subject: String,
    pub envelope: pb::EventEnvelope,
}

/// The statement that writes `events` to the outbox (a no-op for none). Run it inside the
/// business transaction, alone or pipelined with the transaction's other writes.
pub fn insert(events: &[PendingEvent]) -> Statement {
    let ids: Vec<String> = events.iter().map(|e| e.envelope.event_id.clone()).collect();
    let subjects: Vec<String> = events.iter().map(|e| e.subject.clone()).collect();
    let bodies: Vec<Vec<u8>> = events.iter().map(|e| e.envelope.encode_to_vec()).collect();
    sql("INSERT INTO outbox (event_id, subject, envelope) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])")
    .bind::<Array<Text>, _>(ids)
    .bind::<Array<Text>, _>(subjects)
    .bind::<Array<Bytea>, _>(bodies)
}

/// Writes `events` to the outbox on `conn`, which must be inside the business transaction.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    events: &[PendingEvent],
) -> diesel::QueryResult<()> {
    if !events.is_empty() {
        insert(events).execute(conn).await?;
    }
    Ok(())
}

/// Creates the `EVENTS` stream if it does not exist yet (idempotent; safe from every replica).
pub async fn ensure_stream(nats: &async_nats::Client) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let config = jetstream::stream::Config {
        name: subjects::EVENTS_STREAM.into(),
        subjects: vec![subjects::EVENTS_WILDCARD.into()],
        duplicate_window: DUPLICATE_WINDOW,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let mut last = None;
    for _ in 0..5 {
        match js.get_or_create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            // Another replica may have created it between our lookup and our create.
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("unknown error")))
    .context("cannot create the EVENTS stream")
}

#[derive(diesel::QueryableByName)]
struct OutboxRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = Text)]
    subject: String,
    #[diesel(sql_type = Bytea)]
    envelope: Vec<u8>,
}

/// Moves committed events from the outbox to JetStream. Every replica runs one; rows are claimed
/// with `FOR UPDATE SKIP LOCKED`, so replicas share the work without publishing a row twice
/// (and if they ever do, JetStream de-duplicates by event id).
#[derive(Clone)]
pub struct Relay {
    pool: Pool,
    jetstream: jetstream::Context,
    wake: Arc<Notify>,
    config: OutboxConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(pool: Pool, nats: async_nats::Client, config: OutboxConfig) -> Self {
        Self {
            pool,
            jetstream: jetstream::new(nats),
            wake: Arc::new(Notify::new()),
            config,
        }
    }

    /// Notify this after committing events so they go out without waiting for the next poll.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes up to one batch; returns how many events went out.
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        let mut conn = self
            .pool
            .get()
            .await
            .context("outbox: no database connection")?;
        let limit = self.config.batch_size as i64;
        let jetstream = &self.jetstream;
        conn.transaction::<usize, anyhow::Error, _>(async |conn| {
            // Losing this transaction's commit in a crash only means its events are published
            // again, and JetStream (by message id) and consumers (by event id) drop repeats: no
            // need to wait for the WAL flush, which would double the fsyncs per committed change.
            sql("SET LOCAL synchronous_commit = off")
                .execute(conn)
                .await?;
            let rows: Vec<OutboxRow> = sql("SELECT id, event_id, subject, envelope FROM outbox \
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED")
            .bind::<BigInt, _>(limit)
            .load(conn)
            .await?;
            if rows.is_empty() {
                return Ok(0);
            }
            let mut acks = Vec::with_capacity(rows.len());
            for row in &rows {
                let mut message_headers = async_nats::HeaderMap::new();
                message_headers.insert(headers::NATS_MSG_ID, row.event_id.as_str());
                if let Ok(envelope) = pb::EventEnvelope::decode(row.envelope.as_slice())
                    && !envelope.traceparent.is_empty()
                {
                    message_headers.insert(headers::TRACEPARENT, envelope.traceparent.as_str());
                }
                let ack = jetstream
                    .publish_with_headers(
                        row.subject.clone(),
                        message_headers,
                        row.envelope.clone().into(),
                    )
                    .await
                    .context("outbox: publish failed")?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.context("outbox: JetStream did not acknowledge")?;
            }
            metrics::counter!("syntropism_outbox_published_total").increment(rows.len() as u64);
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            sql("DELETE FROM outbox WHERE id = ANY($1)")
                .bind::<Array<BigInt>, _>(ids)
                .execute(conn)
                .await?;
            Ok(rows.len())
        })
        .await
    }

    /// Relays until `stop`, then makes one last pass so committed events leave before exit.
    pub async fn run(self, stop: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = poll;
        loop {
            match self.relay_once().await {
                Ok(n) if n == self.config.batch_size => continue,
                Ok(_) => backoff = poll,
                Err(error) => {
                    metrics::counter!("syntropism_outbox_relay_failures_total").increment(1);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "outbox relay failed; will retry"
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {
                    tokio::time::sleep(Duration::from_millis(self.config.linger_ms)).await;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        loop {
            match self.relay_once().await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "final outbox pass failed; events stay for the next replica"
                    );
                    break;
                }
            }
        }
    }
}
