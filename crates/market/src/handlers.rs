//! The market's NATS handlers.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use syntropism_contracts::market::{admin, agent, internal};
use syntropism_contracts::subjects::{market_events, services};
use syntropism_contracts::{RequestContext, RpcError, RpcServer, events, pb};
use syntropism_platform::outbox::PendingEvent;

use crate::config::{MarketSection, catalogue_problems};
use crate::pricing::{
    Bounds, Bundle, Prices, RoundOutcome, Winner, discover, rule_named, utilisation_ppm,
    value_micros,
};
use crate::store::{Catalogue, Decision, Round, RoundWrite, Store};

/// The market's request handling, shared by every handler task.
#[derive(Debug)]
pub struct Market {
    store: Store,
    config: MarketSection,
}

/// Subscribes every market method on `rpc`.
pub async fn register(
    rpc: &mut RpcServer,
    market: Arc<Market>,
) -> Result<(), async_nats::SubscribeError> {
    macro_rules! serve {
        ($method:ty, $handler:ident) => {{
            let market = market.clone();
            rpc.serve::<$method, _, _>(move |ctx, request| {
                let market = market.clone();
                async move { market.$handler(ctx, request).await }
            })
            .await?;
        }};
    }
    serve!(internal::Catalogue, catalogue);
    serve!(internal::Quote, quote);
    serve!(internal::ReportRound, report_round);
    serve!(agent::State, state);
    serve!(admin::State, state);
    serve!(admin::UpdateCatalogue, update_catalogue);
    Ok(())
}

// ---- wire conversions ----

pub fn supply_vector(supply: &pb::Supply) -> [u64; 4] {
    [
        supply.cpu_millicores,
        supply.memory_mib,
        supply.llm_tokens,
        supply.attention_slots,
    ]
}

pub fn supply_message(v: &[u64; 4]) -> pb::Supply {
    pb::Supply {
        cpu_millicores: v[0],
        memory_mib: v[1],
        llm_tokens: v[2],
        attention_slots: v[3],
    }
}

pub fn prices_message(p: &Prices) -> pb::UnitPrices {
    let signed = |v: u64| v.min(i64::MAX as u64) as i64;
    pb::UnitPrices {
        cpu_nanos_per_millicore_second: signed(p.0[0]),
        memory_nanos_per_mib_second: signed(p.0[1]),
        llm_token_nanos: signed(p.0[2]),
        attention_slot_nanos: signed(p.0[3]),
    }
}

fn prices_from(message: &pb::UnitPrices, field: &'static str) -> Result<Prices, RpcError> {
    let values = [
        message.cpu_nanos_per_millicore_second,
        message.memory_nanos_per_mib_second,
        message.llm_token_nanos,
        message.attention_slot_nanos,
    ];
    if values.iter().any(|v| *v < 0) {
        return Err(
            RpcError::invalid_argument(format!("{field}: prices must not be negative"))
                .with_reason("negative_price")
                .with_detail("field", field),
        );
    }
    Ok(Prices(values.map(|v| v as u64)))
}

pub fn bundle_from(message: &pb::Bundle) -> Bundle {
    Bundle {
        cpu_millicores: message.cpu_millicores,
        memory_mib: message.memory_mib,
        duration_ms: message.duration_ms,
        tokens: message.llm_tokens,
        attention_slots: message.attention_slots,
    }
}

fn utilisation_message(ppm: &[u64; 4]) -> pb::Utilisation {
    let p = |v: u64| v.min(1_000_000) as u32;
    pb::Utilisation {
        cpu_ppm: p(ppm[0]),
        memory_ppm: p(ppm[1]),
        llm_tokens_ppm: p(ppm[2]),
        attention_slots_ppm: p(ppm[3]),
    }
}

fn catalogue_message(c: &Catalogue) -> pb::Catalogue {
    pb::Catalogue {
        supply: Some(supply_message(&c.supply)),
        max_window_ms: c.max_window_ms,
        reserve: Some(prices_message(&c.reserve)),
        floor: Some(prices_message(&c.floor)),
        ceiling: Some(prices_message(&c.ceiling)),
        price_rule: c.price_rule.clone(),
        version: c.version,
    }
}

use syntropism_contracts::time::timestamp;

fn summary_message(r: &Round) -> pb::RoundSummary {
    pb::RoundSummary {
        round: r.round,
        cleared_at: Some(timestamp(r.cleared_at)),
        bids_due: r.bids_due,
        winners: r.winners,
        supply: Some(supply_message(&r.supply)),
        used: Some(supply_message(&r.used)),
        utilisation: Some(utilisation_message(&r.utilisation_ppm)),
        paid_micros: r.paid_micros.min(i64::MAX as u64) as i64,
        discovered: Some(prices_message(&r.discovered)),
    }
}

fn event<M: prost::Message + prost::Name>(
    subject: &str,
    payload: &M,
    ctx: &RequestContext,
    cause: &str,
) -> PendingEvent {
    PendingEvent {
        subject: subject.into(),
        envelope: events::envelope(services::MARKET, payload, &ctx.correlation_id, cause),
    }
}

impl Market {
    pub fn new(store: Store, config: MarketSection) -> Self {
        Self { store, config }
    }

    /// The catalogue the configuration describes (what seeds an empty database).
    pub fn configured_catalogue(config: &MarketSection) -> Catalogue {
        Catalogue {
            supply: config.supply.vector(),
            max_window_ms: config.max_window_ms,
            reserve: config.reserve.prices(),
            floor: config.floor.prices(),
            ceiling: config.ceiling.prices(),
            discovered: config.reserve.prices(),
            price_rule: config.price_rule.clone(),
            version: 1,
        }
    }

    async fn catalogue(
        &self,
        _ctx: RequestContext,
        _request: pb::CatalogueRequest,
    ) -> Result<pb::CatalogueResponse, RpcError> {
        let catalogue = self.store.catalogue().await?;
        Ok(pb::CatalogueResponse {
            catalogue: Some(catalogue_message(&catalogue)),
        })
    }

    async fn quote(
        &self,
        _ctx: RequestContext,
        request: pb::QuoteRequest,
    ) -> Result<pb::QuoteResponse, RpcError> {
        let bundle = request.bundle.ok_or_else(|| {
            RpcError::invalid_argument("bundle is required")
                .with_reason("missing_field")
                .with_detail("field", "bundle")
        })?;
        let catalogue = self.store.catalogue().await?;
        let reserve = reserve_value(&bundle, &catalogue)?;
        Ok(pb::QuoteResponse {
            reserve_micros: reserve as i64,
            catalogue_version: catalogue.version,
        })
    }

    async fn report_round(
        &self,
        ctx: RequestContext,
        request: pb::ReportRoundRequest,
    ) -> Result<pb::ReportRoundResponse, RpcError> {
        if request.round > i64::MAX as u64 {
            return Err(RpcError::invalid_argument("round is too large")
                .with_reason("invalid_field")
                .with_detail("field", "round"));
        }
        let supply = supply_vector(request.supply.as_ref().ok_or_else(|| {
            RpcError::invalid_argument("supply is required")
                .with_reason("missing_field")
                .with_detail("field", "supply")
        })?);
        let cleared_at = request
            .cleared_at
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .ok_or_else(|| {
                RpcError::invalid_argument("cleared_at is required and must be a valid time")
                    .with_reason("invalid_time")
                    .with_detail("field", "cleared_at")
            })?;
        let mut winners = Vec::with_capacity(request.winners.len());
        let mut used = [0u64; 4];
        let mut paid = 0u64;
        for (i, winner) in request.winners.iter().enumerate() {
            let bundle = bundle_from(winner.bundle.as_ref().ok_or_else(|| {
                RpcError::invalid_argument(format!("winners[{i}].bundle is required"))
                    .with_reason("missing_field")
            })?);
            if winner.paid_micros < 0 {
                return Err(RpcError::invalid_argument(format!(
                    "winners[{i}].paid_micros must not be negative"
                ))
                .with_reason("negative_amount"));
            }
            let demand = [
                bundle.cpu_millicores,
                bundle.memory_mib,
                bundle.tokens,
                bundle.attention_slots,
            ];
            for (total, d) in used.iter_mut().zip(demand) {
                *total = total.checked_add(d).ok_or_else(|| {
                    RpcError::invalid_argument("the winners' bundles overflow")
                        .with_reason("overflow")
                })?;
            }
            paid = paid.checked_add(winner.paid_micros as u64).ok_or_else(|| {
                RpcError::invalid_argument("the winners' payments overflow").with_reason("overflow")
            })?;
            winners.push(Winner {
                bundle,
                paid_micros: winner.paid_micros as u64,
            });
        }
        if let Some(r) = crate::pricing::RESOURCES
            .iter()
            .enumerate()
            .find(|(i, _)| used[*i] > supply[*i])
        {
            return Err(RpcError::invalid_argument(format!(
                "the winners use more {} than the round supplied",
                r.1
            ))
            .with_reason("over_supply"));
        }
        let request_hash = {
            let mut hash = Sha256::new();
            hash.update(prost::Message::encode_to_vec(&request));
            hash.finalize().to_vec()
        };
        let round = request.round;
        let bids_due = request.bids_due;
        let winner_count = winners.len() as u32;
        let record = self
            .store
            .record_round(round, |catalogue, earlier| {
                if let Some(earlier) = earlier {
                    return if earlier.request_hash == request_hash {
                        Ok(RoundWrite::Known(earlier))
                    } else {
                        Err(RpcError::conflict(format!(
                            "round {round} was already reported with different results"
                        ))
                        .with_reason("round_already_reported"))
                    };
                }
                let utilisation: [u64; 4] =
                    std::array::from_fn(|i| u64::from(utilisation_ppm(used[i], supply[i])));
                let rule = rule_named(&catalogue.price_rule).ok_or_else(|| {
                    RpcError::internal("the catalogue names an unknown price rule")
                })?;
                let outcome = RoundOutcome {
                    winners: &winners,
                    utilisation_ppm: utilisation.map(|u| u as u32),
                };
                let bounds = Bounds {
                    floor: catalogue.floor,
                    ceiling: catalogue.ceiling,
                };
                let discovered = discover(
                    rule,
                    &catalogue.discovered,
                    &catalogue.reserve,
                    &bounds,
                    &outcome,
                );
                let record = Round {
                    round,
                    cleared_at,
                    bids_due,
                    winners: winner_count,
                    supply,
                    used,
                    utilisation_ppm: utilisation,
                    paid_micros: paid,
                    discovered,
                    price_rule: catalogue.price_rule.clone(),
                    request_hash: request_hash.clone(),
                };
                let payload = pb::RoundRecorded {
                    summary: Some(summary_message(&record)),
                };
                let events = vec![event(
                    market_events::ROUND_RECORDED,
                    &payload,
                    &ctx,
                    &format!("round/{round}"),
                )];
                Ok(RoundWrite::New(record, events))
            })
            .await?;
        Ok(pb::ReportRoundResponse {
            summary: Some(summary_message(&record)),
        })
    }

    async fn state(
        &self,
        _ctx: RequestContext,
        request: pb::MarketStateRequest,
    ) -> Result<pb::MarketStateResponse, RpcError> {
        let limit = match request.rounds {
            0 => self.config.state_rounds_default,
            n => n.min(self.config.state_rounds_max),
        };
        let catalogue = self.store.catalogue().await?;
        let rounds = self.store.recent_rounds(limit).await?;
        Ok(pb::MarketStateResponse {
            catalogue: Some(catalogue_message(&catalogue)),
            discovered: Some(prices_message(&catalogue.discovered)),
            utilisation: rounds
                .first()
                .map(|r| utilisation_message(&r.utilisation_ppm)),
            recent_rounds: rounds.iter().map(summary_message).collect(),
        })
    }

    async fn update_catalogue(
        &self,
        ctx: RequestContext,
        request: pb::UpdateCatalogueRequest,
    ) -> Result<pb::UpdateCatalogueResponse, RpcError> {
        if request.supply.is_none()
            && request.max_window_ms.is_none()
            && request.reserve.is_none()
            && request.floor.is_none()
            && request.ceiling.is_none()
            && request.price_rule.is_none()
        {
            return Err(RpcError::invalid_argument("the update changes nothing")
                .with_reason("empty_update"));
        }
        let reserve = request
            .reserve
            .as_ref()
            .map(|p| prices_from(p, "reserve"))
            .transpose()?;
        let floor = request
            .floor
            .as_ref()
            .map(|p| prices_from(p, "floor"))
            .transpose()?;
        let ceiling = request
            .ceiling
            .as_ref()
            .map(|p| prices_from(p, "ceiling"))
            .transpose()?;
        let catalogue = self
            .store
            .update_catalogue(|current| {
                if let Some(expected) = request.expected_version
                    && expected != current.version
                {
                    return Decision::Refuse(
                        RpcError::conflict(format!(
                            "the catalogue is at version {}, not {expected}",
                            current.version
                        ))
                        .with_reason("version_mismatch"),
                    );
                }
                let mut next = current.clone();
                if let Some(supply) = &request.supply {
                    next.supply = supply_vector(supply);
                }
                if let Some(max) = request.max_window_ms {
                    next.max_window_ms = max;
                }
                if let Some(reserve) = reserve {
                    next.reserve = reserve;
                }
                if let Some(floor) = floor {
                    next.floor = floor;
                }
                if let Some(ceiling) = ceiling {
                    next.ceiling = ceiling;
                }
                if let Some(rule) = &request.price_rule {
                    next.price_rule = rule.clone();
                }
                let problems = catalogue_problems(
                    &next.supply,
                    next.max_window_ms,
                    &next.reserve,
                    &next.floor,
                    &next.ceiling,
                    &next.price_rule,
                );
                if let Some((key, message)) = problems.into_iter().next() {
                    return Decision::Refuse(
                        RpcError::invalid_argument(format!("{key}: {message}"))
                            .with_reason("invalid_catalogue")
                            .with_detail("field", key),
                    );
                }
                // Discovered prices follow the new bounds at once.
                next.discovered = Bounds {
                    floor: next.floor,
                    ceiling: next.ceiling,
                }
                .clamp(next.discovered);
                next.version = current.version + 1;
                let payload = pb::CatalogueChanged {
                    catalogue: Some(catalogue_message(&next)),
                    changed_by: "operator".into(),
                };
                let events = vec![event(
                    market_events::CATALOGUE_CHANGED,
                    &payload,
                    &ctx,
                    &format!("catalogue/{}", next.version),
                )];
                Decision::Commit(next, events)
            })
            .await?;
        Ok(pb::UpdateCatalogueResponse {
            catalogue: Some(catalogue_message(&catalogue)),
        })
    }
}

/// A bundle's reserve value (µcr) under `catalogue`, or why the bundle cannot be sold.
pub fn reserve_value(bundle: &pb::Bundle, catalogue: &Catalogue) -> Result<u64, RpcError> {
    if bundle.duration_ms == 0 || bundle.duration_ms > catalogue.max_window_ms {
        return Err(RpcError::invalid_argument(format!(
            "duration_ms must be between 1 and the maximum window, {} ms",
            catalogue.max_window_ms
        ))
        .with_reason("invalid_duration")
        .with_detail("field", "duration_ms"));
    }
    value_micros(&bundle_from(bundle), &catalogue.reserve).map_err(|_| {
        RpcError::invalid_argument("the bundle is too large to price")
            .with_reason("bundle_too_large")
            .with_detail("field", "bundle")
    })
}

/// The catalogue-changed event for a catalogue seeded from configuration.
pub fn seeded_event(catalogue: &Catalogue) -> pb::CatalogueChanged {
    pb::CatalogueChanged {
        catalogue: Some(catalogue_message(catalogue)),
        changed_by: "config".into(),
    }
}
