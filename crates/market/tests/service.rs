//! The market end to end: real nats-server, real Postgres, the service in-process.

use std::time::Duration;

use syntropism_contracts::market::{admin, agent, internal};
use syntropism_contracts::{AgentId, ErrorCode, RpcClient, pb};
use syntropism_market::MarketConfig;
use syntropism_market::pricing::{self, Bounds, Prices, RoundOutcome, Winner};
use syntropism_test_support::{Nats, Postgres, assert_garbage_refused, subject_of};
use tokio_util::sync::CancellationToken;

fn config(nats: &Nats, pg: &Postgres, extra: &[(&str, &str)]) -> MarketConfig {
    let mut env = vec![
        ("SYNTROPISM__NATS__URL".to_owned(), nats.url()),
        (
            "SYNTROPISM__DATABASE__URL".to_owned(),
            pg.url_for("market", "market"),
        ),
        ("SYNTROPISM__DATABASE__ADMIN_URL".to_owned(), pg.admin_url()),
        ("SYNTROPISM__DATABASE__POOL_SIZE".to_owned(), "4".to_owned()),
        (
            "SYNTROPISM__HTTP__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "SYNTROPISM__OUTBOX__POLL_INTERVAL_MS".to_owned(),
            "50".to_owned(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    syntropism_platform::config::load_from(
        syntropism_market::config::SECTION,
        syntropism_market::config::DEFAULTS,
        None,
        env,
    )
    .expect("test config")
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: &MarketConfig) -> Running {
    let stop = CancellationToken::new();
    let service = syntropism_market::start(config, stop.clone())
        .await
        .expect("market starts");
    let task = tokio::spawn(service.run());
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn client(nats: &Nats) -> RpcClient {
    RpcClient::new(async_nats::connect(nats.url()).await.unwrap())
        .with_timeout(Duration::from_secs(10))
}

fn bundle(cpu: u64, memory: u64, duration_ms: u64, tokens: u64, attention: u64) -> pb::Bundle {
    pb::Bundle {
        cpu_millicores: cpu,
        memory_mib: memory,
        duration_ms,
        llm_tokens: tokens,
        attention_slots: attention,
    }
}

fn prices(p: &pb::UnitPrices) -> Prices {
    Prices([
        p.cpu_nanos_per_millicore_second as u64,
        p.memory_nanos_per_mib_second as u64,
        p.llm_token_nanos as u64,
        p.attention_slot_nanos as u64,
    ])
}

/// Every event payload of type `M` in the EVENTS stream, waiting until there are `at_least`.
async fn events<M: prost::Message + prost::Name + Default>(nats: &Nats, at_least: usize) -> Vec<M> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    for _ in 0..100 {
        let mut found = Vec::new();
        if let Ok(mut stream) = js.get_stream("EVENTS").await {
            let count = stream.info().await.unwrap().state.messages;
            for sequence in 1..=count {
                let message = stream.get_raw_message(sequence).await.unwrap();
                let envelope: pb::EventEnvelope = prost::Message::decode(message.payload).unwrap();
                if let Ok(payload) = syntropism_contracts::events::open::<M>(&envelope) {
                    found.push(payload);
                }
            }
        }
        if found.len() >= at_least {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {at_least} {} events", M::full_name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_rounds_prices_and_operator_changes() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let config = config(
        &nats,
        &pg,
        &[("SYNTROPISM__MARKET__SUPPLY__CPU_MILLICORES", "2000")],
    );
    let market = start(&config).await;
    let client = client(&nats).await;

    // Seeded from configuration, and announced.
    let catalogue = client
        .call::<internal::Catalogue>(&pb::CatalogueRequest {})
        .await
        .unwrap()
        .catalogue
        .unwrap();
    assert_eq!(catalogue.version, 1);
    assert_eq!(catalogue.supply.unwrap().cpu_millicores, 2000);
    let seeded = events::<pb::CatalogueChanged>(&nats, 1).await;
    assert_eq!(seeded[0].changed_by, "config");

    // A quote is the bundle's value at the reserve prices, rounded up to micro-credits.
    let reserve = prices(catalogue.reserve.as_ref().unwrap());
    let b = bundle(1000, 512, 60_000, 10_000, 0);
    let quote = client
        .call::<internal::Quote>(&pb::QuoteRequest { bundle: Some(b) })
        .await
        .unwrap();
    let expected =
        pricing::value_micros(&syntropism_market::handlers::bundle_from(&b), &reserve).unwrap();
    assert_eq!(quote.reserve_micros as u64, expected);
    assert!(expected > 0);
    for (bad, reason) in [
        (Some(bundle(1000, 512, 0, 0, 0)), "invalid_duration"),
        (Some(bundle(1000, 512, 300_001, 0, 0)), "invalid_duration"),
        (
            Some(bundle(u64::MAX, u64::MAX, 300_000, u64::MAX, u64::MAX)),
            "bundle_too_large",
        ),
        (None, "missing_field"),
    ] {
        let error = client
            .call::<internal::Quote>(&pb::QuoteRequest { bundle: bad })
            .await
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidArgument);
        assert_eq!(error.reason, reason);
    }

    // A round: one winner used half the cpu and paid twice its reserve value.
    let supply = pb::Supply {
        cpu_millicores: 2000,
        memory_mib: 8192,
        llm_tokens: 200_000,
        attention_slots: 1,
    };
    let report = pb::ReportRoundRequest {
        round: 1,
        cleared_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        bids_due: 3,
        supply: Some(supply),
        winners: vec![pb::RoundWinner {
            bundle: Some(b),
            paid_micros: 2 * expected as i64,
        }],
    };
    let summary = client
        .call::<internal::ReportRound>(&report)
        .await
        .unwrap()
        .summary
        .unwrap();
    assert_eq!(summary.winners, 1);
    assert_eq!(summary.utilisation.unwrap().cpu_ppm, 500_000);
    let winners = [Winner {
        bundle: syntropism_market::handlers::bundle_from(&b),
        paid_micros: 2 * expected,
    }];
    let discovered = pricing::discover(
        &pricing::Discovery,
        &reserve,
        &reserve,
        &Bounds {
            floor: prices(catalogue.floor.as_ref().unwrap()),
            ceiling: prices(catalogue.ceiling.as_ref().unwrap()),
        },
        &RoundOutcome {
            winners: &winners,
            utilisation_ppm: [500_000, 62_500, 50_000, 0],
        },
    );
    assert_eq!(prices(summary.discovered.as_ref().unwrap()), discovered);
    // Paid twice the reserve: cpu, memory and tokens were discovered at about twice theirs.
    for i in 0..3 {
        assert!(discovered.0[i] >= 2 * reserve.0[i] - 2, "resource {i}");
    }
    assert_eq!(
        discovered.0[3], reserve.0[3],
        "no attention sold: price kept"
    );
    // Reporting the same round again answers the same; different results are refused.
    let again = client.call::<internal::ReportRound>(&report).await.unwrap();
    assert_eq!(again.summary.unwrap(), summary);
    let mut different = report.clone();
    different.bids_due = 4;
    let error = client
        .call::<internal::ReportRound>(&different)
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(error.reason, "round_already_reported");
    let mut over = report.clone();
    over.round = 2;
    over.winners.push(over.winners[0]);
    over.winners.push(over.winners[0]);
    let error = client
        .call::<internal::ReportRound>(&over)
        .await
        .unwrap_err();
    assert_eq!(error.reason, "over_supply");

    // What agents see.
    let alice = AgentId::random();
    let state = client
        .call_as::<agent::State>(&alice, &pb::MarketStateRequest { rounds: 0 })
        .await
        .unwrap();
    assert_eq!(state.recent_rounds.len(), 1);
    assert_eq!(state.recent_rounds[0], summary);
    assert_eq!(prices(state.discovered.as_ref().unwrap()), discovered);
    assert_eq!(state.utilisation.unwrap().cpu_ppm, 500_000);

    // The operator: a stale version and a bad rule are refused and change nothing.
    let stale = client
        .call::<admin::UpdateCatalogue>(&pb::UpdateCatalogueRequest {
            max_window_ms: Some(1000),
            expected_version: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (stale.code, stale.reason.as_str()),
        (ErrorCode::Conflict, "version_mismatch")
    );
    let bad = client
        .call::<admin::UpdateCatalogue>(&pb::UpdateCatalogueRequest {
            price_rule: Some("astrology".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (bad.code, bad.reason.as_str()),
        (ErrorCode::InvalidArgument, "invalid_catalogue")
    );
    let negative = client
        .call::<admin::UpdateCatalogue>(&pb::UpdateCatalogueRequest {
            reserve: Some(pb::UnitPrices {
                cpu_nanos_per_millicore_second: -1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(negative.reason, "negative_price");
    // A good change: the threshold rule and more attention.
    let changed = client
        .call::<admin::UpdateCatalogue>(&pb::UpdateCatalogueRequest {
            price_rule: Some("utilisation_threshold".into()),
            supply: Some(pb::Supply {
                attention_slots: 2,
                ..supply
            }),
            expected_version: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .catalogue
        .unwrap();
    assert_eq!(changed.version, 2);
    assert_eq!(changed.price_rule, "utilisation_threshold");
    let announced = events::<pb::CatalogueChanged>(&nats, 2).await;
    assert_eq!(announced[1].changed_by, "operator");
    assert_eq!(announced[1].catalogue.as_ref().unwrap().version, 2);

    // Under the threshold rule a busy resource gets dearer, an idle one cheaper.
    let busy = pb::ReportRoundRequest {
        round: 2,
        cleared_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_060,
            nanos: 0,
        }),
        bids_due: 1,
        supply: Some(supply),
        winners: vec![pb::RoundWinner {
            bundle: Some(bundle(1900, 100, 60_000, 0, 0)),
            paid_micros: 10,
        }],
    };
    let after = client
        .call::<internal::ReportRound>(&busy)
        .await
        .unwrap()
        .summary
        .unwrap();
    let after = prices(after.discovered.as_ref().unwrap());
    assert!(after.0[0] > discovered.0[0], "cpu 95% used: dearer");
    assert_eq!(
        after.0[1],
        (discovered.0[1] * 95 / 100).max(reserve.0[1]),
        "memory idle: cheaper, not below the floor"
    );
    let recorded = events::<pb::RoundRecorded>(&nats, 2).await;
    assert_eq!(
        recorded.len(),
        2,
        "one event per recorded round, none for the retry"
    );
    market.stop().await;

    // A restart keeps the operator's catalogue: configuration only seeds an empty database.
    let market = start(&config).await;
    let catalogue = client
        .call::<internal::Catalogue>(&pb::CatalogueRequest {})
        .await
        .unwrap()
        .catalogue
        .unwrap();
    assert_eq!(catalogue.version, 2);
    assert_eq!(catalogue.price_rule, "utilisation_threshold");
    market.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_subject_gets_an_error_and_changes_nothing() {
    let nats = Nats::start();
    let pg = Postgres::fresh_database().await;
    let market = start(&config(&nats, &pg, &[])).await;
    let client = client(&nats).await;
    let alice = AgentId::random();
    let subjects = [
        subject_of::<internal::Catalogue>(&alice),
        subject_of::<internal::Quote>(&alice),
        subject_of::<internal::ReportRound>(&alice),
        subject_of::<agent::State>(&alice),
        subject_of::<admin::UpdateCatalogue>(&alice),
    ];
    assert_garbage_refused(&client, &subjects).await;
    // Hostile but well-formed: an overflowing round, a negative payment, an inverted bound.
    let overflow = pb::ReportRoundRequest {
        round: 9,
        cleared_at: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        supply: Some(pb::Supply {
            cpu_millicores: u64::MAX,
            ..Default::default()
        }),
        winners: vec![
            pb::RoundWinner {
                bundle: Some(bundle(u64::MAX, 0, 1, 0, 0)),
                paid_micros: 1,
            },
            pb::RoundWinner {
                bundle: Some(bundle(1, 0, 1, 0, 0)),
                paid_micros: 1,
            },
        ],
        ..Default::default()
    };
    assert_eq!(
        client
            .call::<internal::ReportRound>(&overflow)
            .await
            .unwrap_err()
            .reason,
        "overflow"
    );
    let negative = pb::ReportRoundRequest {
        winners: vec![pb::RoundWinner {
            bundle: Some(bundle(1, 0, 1, 0, 0)),
            paid_micros: -5,
        }],
        ..overflow.clone()
    };
    assert_eq!(
        client
            .call::<internal::ReportRound>(&negative)
            .await
            .unwrap_err()
            .reason,
        "negative_amount"
    );
    let no_time = pb::ReportRoundRequest {
        cleared_at: None,
        winners: vec![],
        ..overflow.clone()
    };
    assert_eq!(
        client
            .call::<internal::ReportRound>(&no_time)
            .await
            .unwrap_err()
            .reason,
        "invalid_time"
    );
    let inverted = client
        .call::<admin::UpdateCatalogue>(&pb::UpdateCatalogueRequest {
            floor: Some(pb::UnitPrices {
                cpu_nanos_per_millicore_second: i64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(inverted.reason, "invalid_catalogue");
    // Nothing changed and the service still answers.
    let state = client
        .call_as::<agent::State>(&alice, &pb::MarketStateRequest { rounds: 1000 })
        .await
        .unwrap();
    assert!(state.recent_rounds.is_empty());
    assert_eq!(state.catalogue.unwrap().version, 1);
    market.stop().await;
}
