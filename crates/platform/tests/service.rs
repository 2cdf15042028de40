//! The service platform against real Postgres and nats-server.

use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use syntropism_contracts::{events, pb, rpc_method};
use syntropism_platform::outbox::{self, PendingEvent};
use syntropism_platform::{PlatformConfig, Service};
use syntropism_test_support::{Nats, Postgres, http_get};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default, serde::Deserialize)]
struct NoSection {}

impl syntropism_platform::Validate for NoSection {
    fn validate(&self, _: &mut syntropism_platform::Problems) {}
}

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("tests/migrations/demo");

fn config(nats: &Nats, pg: &Postgres, admin: bool) -> PlatformConfig {
    let mut env = vec![
        ("SYNTROPISM__NATS__URL".to_owned(), nats.url()),
        (
            "SYNTROPISM__DATABASE__URL".to_owned(),
            pg.url_for("demo", "demo-pass"),
        ),
        (
            "SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".to_owned(),
            "50".to_owned(),
        ),
        (
            "SYNTROPISM__NATS__CONNECT_ATTEMPTS".to_owned(),
            "2".to_owned(),
        ),
    ];
    if admin {
        env.push(("SYNTROPISM__DATABASE__ADMIN_URL".to_owned(), pg.admin_url()));
    }
    syntropism_platform::config::load_from::<NoSection>("demo", &[], None, env)
        .expect("config")
        .platform
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(pg: &Postgres, sql: &str) -> i64 {
    let mut db = AsyncPgConnection::establish(&pg.admin_url()).await.unwrap();
    diesel::sql_query(sql)
        .get_result::<Count>(&mut db)
        .await
        .unwrap()
        .n
}

async fn stream_messages(nats: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(nats.clone());
    js.get_stream("EVENTS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_create_role_schema_and_migrate_once() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let config = config(&nats, &pg, true);
    let stop = CancellationToken::new();
    let starts = (0..3).map(|_| Service::start("demo", &config, MIGRATIONS, stop.clone()));
    let services: Vec<Service> = futures::future::try_join_all(starts)
        .await
        .expect("all replicas start");
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) AS n FROM demo.__diesel_schema_migrations"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pg, "SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'demo' AND pg_get_userbyid(nspowner) = 'demo'").await,
        1,
        "the schema belongs to the service's role"
    );
    stop.cancel();
    for service in services {
        service.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_admin_rights_a_missing_schema_is_a_clear_error() {
    let nats = Nats::start();
    // Make sure the role exists (roles are cluster-wide), then try a database without the schema.
    let first = Postgres::fresh_database().await;
    let stop = CancellationToken::new();
    Service::start(
        "demo",
        &config(&nats, &first, true),
        MIGRATIONS,
        stop.clone(),
    )
    .await
    .unwrap()
    .run_stopped(&stop)
    .await;
    let second = Postgres::fresh_database().await;
    let error = Service::start(
        "demo",
        &config(&nats, &second, false),
        MIGRATIONS,
        stop.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("database.admin_url"),
        "{error:#}"
    );
    // And an unreachable NATS names the key.
    let mut unreachable = config(&nats, &second, true);
    unreachable.nats.url = "nats://127.0.0.1:1".into();
    let error = Service::start("demo", &unreachable, MIGRATIONS, stop.clone())
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("nats.url"), "{error:#}");
}

trait RunStopped {
    async fn run_stopped(self, stop: &CancellationToken);
}

impl RunStopped for Service {
    async fn run_stopped(self, stop: &CancellationToken) {
        stop.cancel();
        self.run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publishes_committed_events_once_and_never_rolled_back_ones() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let stop = CancellationToken::new();
    let service = Service::start("demo", &config(&nats, &pg, true), MIGRATIONS, stop.clone())
        .await
        .unwrap();
    let (pool, wake) = (service.pool.clone(), service.outbox.clone());
    let task = tokio::spawn(service.run());
    let observer = async_nats::connect(nats.url()).await.unwrap();
    let event = |text: &str| PendingEvent {
        subject: "events.demo.noted".into(),
        envelope: events::envelope(
            "demo",
            &pb::OpenAccountOp {
                agent_id: text.into(),
            },
            "corr",
            "cause",
        ),
    };

    // Committed: published.
    let mut conn = pool.get().await.unwrap();
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        diesel::sql_query("INSERT INTO notes (text) VALUES ('one')")
            .execute(conn)
            .await?;
        outbox::enqueue(conn, &[event("one")]).await
    })
    .await
    .unwrap();
    wake.notify_one();
    // Rolled back: never published.
    let rolled_back = conn
        .transaction::<(), diesel::result::Error, _>(async |conn| {
            outbox::enqueue(conn, &[event("never")]).await?;
            Err(diesel::result::Error::RollbackTransaction)
        })
        .await;
    assert!(rolled_back.is_err());

    let wait_for = |n: u64| {
        let observer = observer.clone();
        async move {
            for _ in 0..100 {
                if stream_messages(&observer).await >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("stream never reached {n} messages");
        }
    };
    wait_for(1).await;

    // A relay that published but crashed before deleting the row: the row is relayed again
    // with the same message id, and JetStream drops the duplicate.
    let crashed = event("crashed");
    outbox::enqueue(&mut conn, std::slice::from_ref(&crashed))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(observer.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", crashed.envelope.event_id.as_str());
    js.publish_with_headers(
        "events.demo.noted",
        headers,
        prost::Message::encode_to_vec(&crashed.envelope).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wake.notify_one();
    for _ in 0..100 {
        if count(&pg, "SELECT count(*) AS n FROM demo.outbox").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&pg, "SELECT count(*) AS n FROM demo.outbox").await,
        0,
        "relayed rows are removed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stream_messages(&observer).await,
        2,
        "one + crashed, each exactly once; the rolled-back event never"
    );

    // The envelope carries what DESIGN.md §3 asks of every event.
    let stream = js.get_stream("EVENTS").await.unwrap();
    let first = stream.get_raw_message(1).await.unwrap();
    let envelope: pb::EventEnvelope = prost::Message::decode(first.payload).unwrap();
    assert_eq!(
        (
            envelope.correlation_id.as_str(),
            envelope.causation_id.as_str()
        ),
        ("corr", "cause")
    );
    assert!(envelope.time.is_some() && !envelope.event_id.is_empty());
    assert_eq!(envelope.r#type, "syntropism.v1.OpenAccountOp");
    assert_eq!(
        events::open::<pb::OpenAccountOp>(&envelope)
            .unwrap()
            .agent_id,
        "one"
    );
    #[derive(diesel::QueryableByName)]
    struct Note {
        #[diesel(sql_type = Text)]
        text: String,
    }
    let notes: Vec<Note> = diesel::sql_query("SELECT text FROM notes")
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        notes.iter().map(|n| n.text.as_str()).collect::<Vec<_>>(),
        ["one"]
    );
    drop(conn);
    stop.cancel();
    task.await.unwrap();
}

rpc_method!(Ping: Internal "demo"."ping", pb::AuditRequest => pb::AuditRequest);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served_over_http() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let stop = CancellationToken::new();
    let mut service = Service::start("demo", &config(&nats, &pg, true), MIGRATIONS, stop.clone())
        .await
        .unwrap();
    service
        .rpc
        .serve::<Ping, _, _>(|_ctx, request| async move { Ok(request) })
        .await
        .unwrap();
    let address = service.http_address.expect("http on by default");
    let client = service.client();
    let task = tokio::spawn(service.run());

    assert_eq!(http_get(address, "/healthz").await.unwrap().0, 200);
    let (status, body) = http_get(address, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("nats: ok") && body.contains("postgres: ok"),
        "{body}"
    );
    client.call::<Ping>(&pb::AuditRequest {}).await.unwrap();
    let (status, body) = http_get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("syntropism_rpc_requests_total"), "{body}");
    assert!(body.contains("demo.ping"), "{body}");

    stop.cancel();
    task.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the endpoint closes on shutdown"
    );
}
