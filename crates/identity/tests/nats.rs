//! Operator-mode authorisation on a real nats-server: what an execution's credentials allow,
//! and what the server refuses.

use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use futures::StreamExt;
use syntropism_identity::{Authority, Credentials, ExecutionGrant};
use syntropism_test_support::Nats;
use tokio::sync::mpsc;

const ALICE: &str = "0193a5c4-0000-7000-8000-00000000a11c";
const BOB: &str = "0193a5c4-0000-7000-8000-000000000b0b";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn grant(agent: &str, execution: &str, seconds: i64) -> ExecutionGrant {
    ExecutionGrant {
        agent_id: agent.into(),
        inbox_prefix: ExecutionGrant::inbox_prefix_for(agent, execution),
        expires_at: now() + seconds,
        name: execution.into(),
    }
}

/// Connects with `credentials`; returns the client and the server errors it reports.
async fn connect(
    nats: &Nats,
    credentials: &Credentials,
    inbox_prefix: Option<&str>,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>), async_nats::ConnectError> {
    let (events, errors) = mpsc::unbounded_channel();
    let mut options = ConnectOptions::with_credentials(&credentials.to_creds_file())
        .expect("credentials parse")
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let text = match event {
                    Event::ServerError(error) => format!("server error: {error}"),
                    Event::Disconnected => "disconnected".into(),
                    other => format!("{other}"),
                };
                let _ = events.send(text);
            }
        })
        .max_reconnects(Some(1))
        .connection_timeout(Duration::from_secs(3));
    if let Some(prefix) = inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    options
        .connect(nats.url())
        .await
        .map(|client| (client, errors))
}

async fn server_with_authority() -> (Nats, Authority) {
    let authority = Authority::generate();
    let nats = Nats::start_with_config(&authority.server_config().unwrap());
    (nats, authority)
}

async fn expect_error(errors: &mut mpsc::UnboundedReceiver<String>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let event = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} error reported"))
            .expect("events");
        if event.to_lowercase().contains(&needle.to_lowercase()) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_nothing_connects_and_services_get_everything() {
    let (nats, authority) = server_with_authority().await;
    assert!(
        async_nats::ConnectOptions::new()
            .max_reconnects(Some(1))
            .connect(nats.url())
            .await
            .is_err(),
        "anonymous connections are refused"
    );
    let (service, _) = connect(&nats, &authority.service("economy").unwrap(), None)
        .await
        .unwrap();
    // Services use JetStream in the application account.
    let js = async_nats::jetstream::new(service.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        ..Default::default()
    })
    .await
    .expect("JetStream is enabled for the application account");
    let reply = service.request("nobody.there", "x".into()).await;
    assert!(reply.is_err(), "no responders, but allowed to ask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_publishes_only_as_its_agent_and_hears_only_its_inbox() {
    let (nats, authority) = server_with_authority().await;
    let (service, _) = connect(&nats, &authority.service("economy").unwrap(), None)
        .await
        .unwrap();
    // A service answering every agent's requests.
    let mut requests = service.subscribe("agent.*.economy.balance").await.unwrap();
    let responder = service.clone();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                let who = message
                    .subject
                    .split('.')
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                responder.publish(reply, who.into()).await.unwrap();
            }
        }
    });
    // Everything published under another agent's name lands here (it must stay empty).
    let mut spoofed = service.subscribe(format!("agent.{BOB}.>")).await.unwrap();
    service.flush().await.unwrap();

    let alice_grant = grant(ALICE, "exec-1", 60);
    let (alice, mut errors) = connect(
        &nats,
        &authority.execution(&alice_grant).unwrap(),
        Some(&alice_grant.inbox_prefix),
    )
    .await
    .unwrap();
    // Its own requests work, replies come to its inbox, and the subject names it.
    let answer = alice
        .request(format!("agent.{ALICE}.economy.balance"), "".into())
        .await
        .expect("own request answered");
    assert_eq!(answer.payload.as_ref(), ALICE.as_bytes());

    // Publishing as Bob, or to internal and admin subjects, is refused by the server.
    for subject in [
        format!("agent.{BOB}.economy.transfer"),
        "economy.mint".into(),
        "admin.market.update_catalogue".into(),
        "events.economy.transfers_posted".into(),
    ] {
        alice.publish(subject.clone(), "x".into()).await.unwrap();
        alice.flush().await.unwrap();
        expect_error(&mut errors, "permissions violation for publish").await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), spoofed.next())
            .await
            .is_err(),
        "nothing published as Bob arrived"
    );

    // Subscribing to Bob's inbox or to everything is refused.
    let bob_inbox = ExecutionGrant::inbox_prefix_for(BOB, "exec-2");
    for subject in [format!("{bob_inbox}.>"), ">".into(), "agent.>".into()] {
        let mut sub = alice.subscribe(subject.clone()).await.unwrap();
        expect_error(&mut errors, "permissions violation for subscription").await;
        service
            .publish(format!("{bob_inbox}.x"), "secret".into())
            .await
            .unwrap();
        service
            .publish(format!("agent.{BOB}.y"), "secret".into())
            .await
            .unwrap();
        service.flush().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.next())
                .await
                .map_or(true, |m| m.is_none()),
            "{subject}: nothing delivered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_stop_working_at_the_deadline() {
    let (nats, authority) = server_with_authority().await;
    // Already expired: refused at connect.
    let expired = grant(ALICE, "old", -5);
    assert!(
        connect(
            &nats,
            &authority.execution(&expired).unwrap(),
            Some(&expired.inbox_prefix)
        )
        .await
        .is_err(),
        "expired credentials are refused"
    );
    // Expiring in two seconds: the server disconnects the execution then, and it cannot
    // come back.
    let short = grant(ALICE, "short", 2);
    let (client, mut events) = connect(
        &nats,
        &authority.execution(&short).unwrap(),
        Some(&short.inbox_prefix),
    )
    .await
    .expect("valid until the deadline");
    client
        .publish(format!("agent.{ALICE}.x"), "ok".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_error(&mut events, "disconnected").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        client.flush().await.is_err()
            || client.connection_state() != async_nats::connection::State::Connected,
        "the expired execution stays disconnected"
    );
    // Credentials signed by another authority are refused too.
    let other = Authority::generate();
    let forged = grant(ALICE, "forged", 60);
    assert!(
        connect(
            &nats,
            &other.execution(&forged).unwrap(),
            Some(&forged.inbox_prefix)
        )
        .await
        .is_err(),
        "credentials from another authority are refused"
    );
}

#[test]
fn keys_persist_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::load_or_generate(dir.path()).unwrap();
    let second = Authority::load_or_generate(dir.path()).unwrap();
    assert_eq!(first.account_public_key(), second.account_public_key());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("operator.nk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "seeds are readable by their owner only");
    }
}
