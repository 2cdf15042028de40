//! Three economy replicas (separate processes and connections, one queue group) under
//! concurrent random transfers, holds, posts and voids from many clients, with retries of the
//! same idempotency ids, and one replica killed mid-run. Afterwards: the sum is exactly zero,
//! no available balance is negative, and every acknowledged operation exists exactly once.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use syntropism_contracts::economy::internal;
use syntropism_contracts::{AgentId, ErrorCode, RpcClient, RpcError, pb};
use syntropism_test_support::{Nats, Postgres};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const AGENTS: usize = 12;
const CLIENTS: usize = 12;
const OPS_PER_CLIENT: usize = 60;

fn spawn_replica(nats: &Nats, pg: &Postgres, index: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_economy"))
        .env("SYNTROPISM__NATS__URL", nats.url())
        .env(
            "SYNTROPISM__DATABASE__URL",
            pg.url_for("economy", "economy"),
        )
        .env("SYNTROPISM__DATABASE__ADMIN_URL", pg.admin_url())
        .env("SYNTROPISM__DATABASE__POOL_SIZE", "6")
        .env("SYNTROPISM__HTTP__ENABLED", "false")
        .env("SYNTROPISM__OUTBOX__POLL_INTERVAL_MS", "50")
        .env("SYNTROPISM__TELEMETRY__LOG_FILTER", "warn")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start replica {index}: {e}"))
}

/// What a client was told about one idempotency id.
#[derive(Debug, Clone)]
enum Ack {
    Transfer(pb::Transfer),
    Hold(pb::Hold),
    Posted(pb::Transfer),
    Voided,
    Refused(ErrorCode),
}

#[derive(Debug, Clone)]
enum Request {
    Transfer(pb::TransferRequest),
    Hold(pb::HoldRequest),
    Post(pb::PostHoldRequest),
    Void(pb::VoidHoldRequest),
}

async fn send(client: &RpcClient, request: &Request) -> Result<Ack, RpcError> {
    match request {
        Request::Transfer(r) => client
            .call::<internal::Transfer>(r)
            .await
            .map(|r| Ack::Transfer(r.transfer.unwrap())),
        Request::Hold(r) => client
            .call::<internal::Hold>(r)
            .await
            .map(|r| Ack::Hold(r.hold.unwrap())),
        Request::Post(r) => client
            .call::<internal::PostHold>(r)
            .await
            .map(|r| Ack::Posted(r.transfer.unwrap())),
        Request::Void(r) => client
            .call::<internal::VoidHold>(r)
            .await
            .map(|_| Ack::Voided),
    }
}

/// Sends until the service gives a definite answer, always with the same idempotency id.
async fn send_until_answered(client: &RpcClient, request: &Request, retries: &AtomicUsize) -> Ack {
    for attempt in 0..60 {
        match send(client, request).await {
            Ok(ack) => return ack,
            Err(error) if error.is_retryable() => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 * (attempt + 1).min(10))).await;
            }
            Err(error) => return Ack::Refused(error.code),
        }
    }
    panic!("no definite answer for {request:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_a_kill_and_every_acknowledged_operation_exists_exactly_once() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let mut replicas: Vec<Child> = (0..3).map(|i| spawn_replica(&nats, &pg, i)).collect();
    let connection = async_nats::connect(nats.url()).await.unwrap();
    let client = RpcClient::new(connection).with_timeout(Duration::from_secs(2));

    // Wait until the replicas answer, then open and fund the agents in one batch.
    let agents: Vec<AgentId> = (0..AGENTS).map(|_| AgentId::random()).collect();
    let mut ops = Vec::new();
    for agent in &agents {
        ops.push(pb::LedgerOp {
            op: Some(pb::ledger_op::Op::OpenAccount(pb::OpenAccountOp {
                agent_id: agent.to_string(),
            })),
        });
        ops.push(pb::LedgerOp {
            op: Some(pb::ledger_op::Op::Mint(pb::MintOp {
                agent_id: agent.to_string(),
                amount_micros: 1_000 * CREDIT,
                reason: pb::MintReason::GenesisGrant as i32,
                memo: String::new(),
            })),
        });
    }
    let setup = pb::BatchRequest {
        idempotency_id: "setup".into(),
        ops,
    };
    let mut ready = false;
    for _ in 0..300 {
        match client.call::<internal::Batch>(&setup).await {
            Ok(_) => {
                ready = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(ready, "replicas never answered");

    let acks: Arc<Mutex<HashMap<String, (Request, Ack)>>> = Arc::default();
    let retries = Arc::new(AtomicUsize::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, agents, acks, retries, replays, done) = (
            client.clone(),
            agents.clone(),
            acks.clone(),
            retries.clone(),
            replays.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut my_holds: Vec<i64> = Vec::new();
            for i in 0..OPS_PER_CLIENT {
                let key = format!("c{c}-op{i}");
                let from_index = rng.random_range(0..AGENTS);
                let from = agents[from_index];
                let to = if rng.random_bool(0.2) {
                    burn_ref()
                } else {
                    agent_ref(agents[(from_index + rng.random_range(1..AGENTS)) % AGENTS])
                };
                let amount = rng.random_range(1..=150) * CREDIT;
                let request = match rng.random_range(0..10) {
                    0..=3 => Request::Transfer(pb::TransferRequest {
                        idempotency_id: key.clone(),
                        op: Some(pb::TransferOp {
                            from: Some(agent_ref(from)),
                            to: Some(to),
                            amount_micros: amount,
                            memo: key.clone(),
                        }),
                    }),
                    4..=6 => Request::Hold(pb::HoldRequest {
                        idempotency_id: key.clone(),
                        op: Some(pb::HoldOp {
                            from: Some(agent_ref(from)),
                            to: Some(to),
                            amount_micros: amount,
                            memo: key.clone(),
                        }),
                    }),
                    7..=8 if !my_holds.is_empty() => {
                        let hold_id = my_holds.swap_remove(rng.random_range(0..my_holds.len()));
                        let part = rng.random_bool(0.5).then(|| rng.random_range(1..=CREDIT));
                        Request::Post(pb::PostHoldRequest {
                            idempotency_id: key.clone(),
                            op: Some(pb::PostHoldOp {
                                hold_id,
                                amount_micros: part,
                            }),
                        })
                    }
                    _ if !my_holds.is_empty() => {
                        let hold_id = my_holds.swap_remove(rng.random_range(0..my_holds.len()));
                        Request::Void(pb::VoidHoldRequest {
                            idempotency_id: key.clone(),
                            op: Some(pb::VoidHoldOp { hold_id }),
                        })
                    }
                    _ => Request::Transfer(pb::TransferRequest {
                        idempotency_id: key.clone(),
                        op: Some(pb::TransferOp {
                            from: Some(agent_ref(from)),
                            to: Some(to),
                            amount_micros: amount,
                            memo: key.clone(),
                        }),
                    }),
                };
                let ack = send_until_answered(&client, &request, &retries).await;
                if let Ack::Hold(hold) = &ack {
                    my_holds.push(hold.id);
                }
                // Sometimes retry an acknowledged id on purpose: it must replay, not re-apply.
                if rng.random_bool(0.15) {
                    let again = send_until_answered(&client, &request, &retries).await;
                    assert_eq!(
                        format!("{again:?}"),
                        format!("{ack:?}"),
                        "a retry of {key} changed its outcome"
                    );
                    replays.fetch_add(1, Ordering::Relaxed);
                }
                acks.lock().await.insert(key, (request, ack));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Kill one replica once a third of the work is done, without warning.
    while done.load(Ordering::Relaxed) < CLIENTS * OPS_PER_CLIENT / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replicas[1].start_kill().unwrap();
    let killed_at = done.load(Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client task");
    }

    // The books, through the service...
    let audit = client
        .call::<internal::Audit>(&pb::AuditRequest {})
        .await
        .unwrap();
    assert!(audit.ok, "{:?}", audit.violations);
    assert_eq!(audit.sum_micros, 0);

    // ...and straight from the database.
    let books = read_books(&pg).await;
    assert_eq!(books.sum, 0, "the sum of all accounts is exactly zero");
    assert_eq!(books.negative, 0, "no available balance is negative");
    let (transfers, holds) = (books.transfers, books.holds);
    let acks = acks.lock().await;
    assert_eq!(acks.len(), CLIENTS * OPS_PER_CLIENT);
    let (mut applied, mut refused) = (0, 0);
    for (key, (request, ack)) in acks.iter() {
        let row_key = format!("internal/{key}");
        let (t, t_id) = transfers.get(&row_key).copied().unwrap_or((0, 0));
        let (h, h_id) = holds.get(&row_key).copied().unwrap_or((0, 0));
        let expected = match ack {
            Ack::Transfer(transfer) | Ack::Posted(transfer) => (1, transfer.id, 0, 0),
            Ack::Hold(hold) => (0, 0, 1, hold.id),
            Ack::Voided | Ack::Refused(_) => (0, 0, 0, 0),
        };
        assert_eq!(
            (t, t_id, h, h_id),
            expected,
            "{key}: {request:?} acknowledged as {ack:?}"
        );
        if let Ack::Refused(code) = ack {
            assert!(
                matches!(
                    code,
                    ErrorCode::InsufficientFunds | ErrorCode::FailedPrecondition
                ),
                "{key}: unexpected refusal {code:?}"
            );
            refused += 1;
        } else {
            applied += 1;
        }
    }
    let stray = transfers
        .keys()
        .chain(holds.keys())
        .filter(|k| k.as_str() != "internal/setup")
        .filter(|k| !acks.contains_key(k.trim_start_matches("internal/")));
    assert_eq!(
        stray.count(),
        0,
        "rows exist only for acknowledged operations"
    );
    eprintln!(
        "{} operations ({applied} applied, {refused} refused), {} retries, {} deliberate replays; replica killed after {killed_at}",
        acks.len(),
        retries.load(Ordering::Relaxed),
        replays.load(Ordering::Relaxed),
    );
    assert!(applied > acks.len() / 2, "most operations should succeed");

    // The survivors shut down gracefully on SIGTERM.
    for (i, replica) in replicas.iter_mut().enumerate() {
        if i == 1 {
            let _ = replica.wait().await;
            continue;
        }
        let pid = replica.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(20), replica.wait())
            .await
            .expect("exits on SIGTERM")
            .unwrap();
        assert!(exit.success(), "replica {i} exited with {exit}");
    }
    // The fixed locking order means no transaction ever waited in a cycle. Connections flush
    // their statistics when they close, which the replicas' exits just did.
    assert_eq!(
        deadlocks(&pg).await,
        0,
        "Postgres detected deadlocks during the run"
    );
}

struct Books {
    sum: i64,
    negative: i64,
    /// Rows per request key: (count, lowest id).
    transfers: HashMap<String, (i64, i64)>,
    holds: HashMap<String, (i64, i64)>,
}

async fn read_books(pg: &Postgres) -> Books {
    use diesel::sql_types::{BigInt, Text};
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = BigInt)]
        first: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct Scalar {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut db = AsyncPgConnection::establish(&pg.admin_url()).await.unwrap();
    let sum: Scalar = diesel::sql_query("SELECT sum(balance)::bigint AS n FROM economy.accounts")
        .get_result(&mut db)
        .await
        .unwrap();
    let negative: Scalar = diesel::sql_query(
        "SELECT count(*) AS n FROM economy.accounts WHERE kind = 'agent' AND balance - pending < 0",
    )
    .get_result(&mut db)
    .await
    .unwrap();
    let counts = |table: &str| {
        format!(
            "SELECT request_key AS key, count(*) AS n, min(id) AS first FROM economy.{table} GROUP BY 1"
        )
    };
    let transfers = diesel::sql_query(counts("transfers"))
        .load::<Count>(&mut db)
        .await
        .unwrap();
    let holds = diesel::sql_query(counts("holds"))
        .load::<Count>(&mut db)
        .await
        .unwrap();
    Books {
        sum: sum.n,
        negative: negative.n,
        transfers: transfers
            .into_iter()
            .map(|c| (c.key, (c.n, c.first)))
            .collect(),
        holds: holds.into_iter().map(|c| (c.key, (c.n, c.first))).collect(),
    }
}

async fn deadlocks(pg: &Postgres) -> i64 {
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Scalar {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut db = AsyncPgConnection::establish(&pg.admin_url()).await.unwrap();
    // Statistics of closed connections reach the shared counters within a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row: Scalar = diesel::sql_query(
        "SELECT deadlocks AS n FROM pg_stat_database WHERE datname = current_database()",
    )
    .get_result(&mut db)
    .await
    .unwrap();
    row.n
}
