//! The ledger's invariants are enforced by the database too: a bug in the service (or a person
//! at a psql prompt with the service's role) cannot break them.

mod common;

use common::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

async fn as_service(h: &Harness) -> AsyncPgConnection {
    let url = format!(
        "{}?options=-csearch_path%3Deconomy",
        h.pg.url_for("economy", "economy")
    );
    AsyncPgConnection::establish(&url)
        .await
        .expect("connect as the economy role")
}

async fn refused(conn: &mut AsyncPgConnection, sql: &str) -> String {
    match diesel::sql_query(sql).execute(conn).await {
        Ok(rows) => panic!("{sql} was accepted ({rows} rows)"),
        Err(error) => error.to_string(),
    }
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_what_would_break_the_ledger() {
    let h = Harness::start().await;
    let alice = h.funded_agent(10 * CREDIT).await;
    let bob = h.funded_agent(0).await;
    h.transfer("t", alice, agent_ref(bob), CREDIT)
        .await
        .unwrap();
    let mut db = as_service(&h).await;
    let alice_id: Id = diesel::sql_query(format!(
        "SELECT id FROM accounts WHERE agent_id = '{alice}'"
    ))
    .get_result(&mut db)
    .await
    .unwrap();
    let bob_id: Id = diesel::sql_query(format!("SELECT id FROM accounts WHERE agent_id = '{bob}'"))
        .get_result(&mut db)
        .await
        .unwrap();
    let (a, b) = (alice_id.id, bob_id.id);

    let error = refused(
        &mut db,
        &format!("UPDATE accounts SET balance = balance + 5 WHERE id = {a}"),
    )
    .await;
    assert!(error.contains("only through transfers"), "{error}");
    let error = refused(&mut db, "INSERT INTO accounts (id, kind, agent_id, balance) VALUES (99999, 'agent', gen_random_uuid(), 5)").await;
    assert!(error.contains("zero balance"), "{error}");
    let error = refused(&mut db, &format!("DELETE FROM accounts WHERE id = {b}")).await;
    assert!(error.contains("never deleted"), "{error}");
    for sql in [
        "UPDATE transfers SET amount = amount + 1",
        "DELETE FROM transfers",
        "TRUNCATE transfers CASCADE",
    ] {
        let error = refused(&mut db, sql).await;
        assert!(error.contains("immutable"), "{sql}: {error}");
    }
    // Overdrawing through a hand-written transfer row: the available-balance check stops it.
    let overdraw = format!(
        "INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, request_key, created_at) \
         VALUES (nextval('transfer_ids'), {a}, 0, {b}, 0, {}, 'transfer', 'psql', now())",
        100 * CREDIT
    );
    let error = refused(&mut db, &overdraw).await;
    assert!(error.contains("available_not_negative"), "{error}");
    // Pointing a transfer at a missing shard would make money vanish: refused.
    let vanish = format!(
        "INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, request_key, created_at) \
         VALUES (nextval('transfer_ids'), {a}, 0, 2, 99, 1, 'transfer', 'psql', now())"
    );
    refused(&mut db, &vanish).await;
    let mint_without_reason = format!(
        "INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, request_key, created_at) \
         VALUES (nextval('transfer_ids'), 1, 0, {a}, 0, 1, 'mint', 'psql', now())"
    );
    assert!(
        refused(&mut db, &mint_without_reason)
            .await
            .contains("mint_has_reason")
    );

    // A well-formed hand-written transfer moves both sides: the books still balance.
    diesel::sql_query(format!(
        "INSERT INTO transfers (id, debit_id, debit_shard, credit_id, credit_shard, amount, kind, request_key, created_at) \
         VALUES (nextval('transfer_ids'), {a}, 0, {b}, 0, 7, 'transfer', 'psql', now())"
    ))
    .execute(&mut db)
    .await
    .unwrap();
    // Holds: amounts and accounts never change, and only pending → posted | voided.
    let hold = h.hold("h", alice, burn_ref(), CREDIT).await.unwrap();
    let error = refused(
        &mut db,
        &format!("UPDATE holds SET amount = 1 WHERE id = {}", hold.id),
    )
    .await;
    assert!(error.contains("pending to posted or voided"), "{error}");
    diesel::sql_query(format!(
        "UPDATE holds SET status = 'voided', resolved_at = now() WHERE id = {}",
        hold.id
    ))
    .execute(&mut db)
    .await
    .unwrap();
    let error = refused(
        &mut db,
        &format!(
            "UPDATE holds SET status = 'pending', resolved_at = NULL WHERE id = {}",
            hold.id
        ),
    )
    .await;
    assert!(error.contains("pending to posted or voided"), "{error}");

    let audit = h.audit().await;
    assert!(audit.ok, "{:?}", audit.violations);
    assert_eq!(h.balance(bob).await.balance_micros, CREDIT + 7);
    assert_eq!(
        h.balance(alice).await.pending_micros,
        0,
        "voiding released the reservation"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_role_touches_only_its_own_schema() {
    let h = Harness::start().await;
    let mut admin = AsyncPgConnection::establish(&h.pg.admin_url())
        .await
        .unwrap();
    admin
        .batch_execute("CREATE SCHEMA other; CREATE TABLE other.secrets (x int); INSERT INTO other.secrets VALUES (1)")
        .await
        .unwrap();
    let mut db = as_service(&h).await;
    let error = refused(&mut db, "SELECT * FROM other.secrets").await;
    assert!(error.contains("permission denied"), "{error}");
    let error = refused(&mut db, "CREATE TABLE public.sneaky (x int)").await;
    assert!(error.contains("permission denied"), "{error}");
    h.stop().await;
}
