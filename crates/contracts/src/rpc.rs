//! The one typed request/reply layer over NATS.
//!
//! A [`Method`] names a subject and its request and response types. [`RpcServer::serve`] answers a
//! method in a queue group (size check → decode → handler → encode, errors as `pb::Error` with a
//! stable code, W3C trace context both ways); [`RpcClient::call`] sends a typed request with a
//! timeout and turns error replies and transport failures into [`RpcError`]s.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, RequestErrorKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use opentelemetry::trace::TraceContextExt;
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::{ErrorCode, RpcError};
use crate::headers;
use crate::ids::AgentId;

/// Default cap on a request body; methods that take more say so.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Default time a client waits for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may call a method, which decides its subject shape (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `<service>.<method>`: other services only.
    Internal,
    /// `agent.<agent_id>.<service>.<method>`: the agent id in the subject is the caller.
    Agent,
    /// `admin.<service>.<method>`: the gateway and CLI, for the human operator.
    Admin,
}

/// Where a method lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub scope: Scope,
    pub service: &'static str,
    pub method: &'static str,
}

impl Endpoint {
    /// A stable name for logs and metrics, e.g. `economy.transfer` or `agent.economy.balance`.
    pub fn name(&self) -> String {
        match self.scope {
            Scope::Internal => format!("{}.{}", self.service, self.method),
            Scope::Agent => format!("agent.{}.{}", self.service, self.method),
            Scope::Admin => format!("admin.{}.{}", self.service, self.method),
        }
    }

    /// The subject a server subscribes to (agent-facing methods take any agent id).
    pub fn serve_subject(&self) -> String {
        match self.scope {
            Scope::Internal => format!("{}.{}", self.service, self.method),
            Scope::Agent => format!("agent.*.{}.{}", self.service, self.method),
            Scope::Admin => format!("admin.{}.{}", self.service, self.method),
        }
    }

    /// The subject a client publishes to; agent-facing methods need the calling agent.
    pub fn subject(&self, agent: Option<&AgentId>) -> Result<String, RpcError> {
        match (self.scope, agent) {
            (Scope::Agent, Some(agent)) => {
                Ok(format!("agent.{agent}.{}.{}", self.service, self.method))
            }
            (Scope::Agent, None) => Err(RpcError::invalid_argument(format!(
                "{} is agent-facing: call it as an agent",
                self.name()
            ))),
            (_, None) => Ok(self.serve_subject()),
            (_, Some(_)) => Err(RpcError::invalid_argument(format!(
                "{} is not agent-facing",
                self.name()
            ))),
        }
    }
}

/// One typed RPC: a subject and its request and response messages.
pub trait Method: Send + Sync + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Default + Send + 'static;
    const ENDPOINT: Endpoint;
    /// Requests larger than this are refused with `PAYLOAD_TOO_LARGE` (by client and server).
    const MAX_REQUEST_BYTES: usize = DEFAULT_MAX_REQUEST_BYTES;
}

/// Declares RPC methods as unit types implementing [`Method`].
#[macro_export]
macro_rules! rpc_method {
    ($(#[$doc:meta])* $name:ident: $scope:ident $service:literal . $method:literal,
     $req:ty => $resp:ty $(, max_request_bytes = $max:expr)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl $crate::rpc::Method for $name {
            type Request = $req;
            type Response = $resp;
            const ENDPOINT: $crate::rpc::Endpoint = $crate::rpc::Endpoint {
                scope: $crate::rpc::Scope::$scope,
                service: $service,
                method: $method,
            };
            $(const MAX_REQUEST_BYTES: usize = $max;)?
        }
    };
}

/// What a handler knows about the request besides its body.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub subject: String,
    /// The calling agent, for agent-facing methods (taken from the subject).
    pub agent: Option<AgentId>,
    /// The flow this request belongs to (from the header, or new).
    pub correlation_id: String,
}

impl RequestContext {
    /// The calling agent; only `None` if a non-agent method asks, which is a programming error.
    pub fn caller(&self) -> Result<AgentId, RpcError> {
        self.agent
            .ok_or_else(|| RpcError::internal("method is not agent-facing"))
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// How many items of a paged reply fit in `budget` bytes, given their encoded `sizes` in order
/// (each counted with 8 bytes of framing); at least one, so a page always makes progress.
pub fn fitting(sizes: impl IntoIterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for size in sizes {
        total = total.saturating_add(size + 8);
        if total > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// How many times [`RpcClient::call_retrying`] sends a request.
pub const RETRY_ATTEMPTS: u32 = 5;

/// Runs `call` until it succeeds, fails for good, or has been tried [`RETRY_ATTEMPTS`] times,
/// waiting 100 ms more after each retryable failure.
pub async fn retrying<T, F, Fut>(call: F) -> Result<T, RpcError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RpcError>>,
{
    retrying_with(RETRY_ATTEMPTS, Duration::from_millis(100), call).await
}

/// Runs `call` until it succeeds, fails for good, or has been tried `attempts` times, waiting
/// `step` more after each retryable failure (`step`, `2 × step`, …). For callers on a latency
/// budget (a handler answering an agent) that cannot afford [`retrying`]'s five attempts.
pub async fn retrying_with<T, F, Fut>(
    attempts: u32,
    step: Duration,
    mut call: F,
) -> Result<T, RpcError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RpcError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Err(error) if error.is_retryable() && attempt < attempts => {
                tokio::time::sleep(step * attempt).await;
            }
            result => return result,
        }
    }
}

/// Typed calls over a NATS connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RpcClient {
    nats: Client,
    timeout: Duration,
    correlation_id: Option<String>,
    traceparent: Option<String>,
}

impl RpcClient {
    pub fn new(nats: Client) -> Self {
        Self {
            nats,
            timeout: DEFAULT_TIMEOUT,
            correlation_id: None,
            traceparent: None,
        }
    }

    /// Continues this W3C trace context on every call made outside any traced span (e.g. an
    /// agent's `TRACEPARENT`); a call inside a traced span carries that span's context.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Tags every call made through the returned client with this correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    pub fn nats(&self) -> &Client {
        &self.nats
    }

    /// Calls an internal or admin method.
    pub async fn call<M: Method>(&self, request: &M::Request) -> Result<M::Response, RpcError> {
        let subject = M::ENDPOINT.subject(None)?;
        self.call_on::<M>(subject, request).await
    }

    /// [`RpcClient::call`], sent again on retryable failures (up to [`RETRY_ATTEMPTS`] times,
    /// backing off). Only for requests that are safe to repeat: reads, and mutations that carry
    /// an idempotency id.
    pub async fn call_retrying<M: Method>(
        &self,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        retrying(|| self.call::<M>(request)).await
    }

    /// [`RpcClient::call_as`], sent again on retryable failures like
    /// [`RpcClient::call_retrying`].
    pub async fn call_as_retrying<M: Method>(
        &self,
        agent: &AgentId,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        retrying(|| self.call_as::<M>(agent, request)).await
    }

    /// Calls an agent-facing method as `agent`.
    pub async fn call_as<M: Method>(
        &self,
        agent: &AgentId,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        let subject = M::ENDPOINT.subject(Some(agent))?;
        self.call_on::<M>(subject, request).await
    }

    async fn call_on<M: Method>(
        &self,
        subject: String,
        request: &M::Request,
    ) -> Result<M::Response, RpcError> {
        let span = tracing::info_span!(
            "rpc.client",
            otel.name = %M::ENDPOINT.name(),
            otel.kind = "client",
            rpc.system = "nats",
            error.code = field::Empty,
        );
        async {
            let payload = request.encode_to_vec();
            if payload.len() > M::MAX_REQUEST_BYTES {
                return Err(too_large(payload.len(), M::MAX_REQUEST_BYTES));
            }
            let reply = self
                .request_raw(&subject, HeaderMap::new(), payload.into())
                .await?;
            decode_reply::<M::Response>(reply)
        }
        .instrument(span.clone())
        .await
        .inspect_err(|e| {
            span.record("error.code", e.code.name());
        })
    }

    /// Sends raw bytes to any subject with the standard headers (trace context, correlation id)
    /// and returns the raw reply; transport failures become [`RpcError`]s. Used by typed calls
    /// and by tests that must send what no typed client would.
    pub async fn request_raw(
        &self,
        subject: &str,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Message, RpcError> {
        crate::trace::inject(&crate::trace::current_context(), &mut headers);
        if headers.get(headers::TRACEPARENT).is_none()
            && let Some(traceparent) = &self.traceparent
        {
            headers.insert(headers::TRACEPARENT, traceparent.as_str());
        }
        if headers.get(headers::CORRELATION_ID).is_none() {
            let correlation = self
                .correlation_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            headers.insert(headers::CORRELATION_ID, correlation.as_str());
        }
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(headers)
            .timeout(Some(self.timeout));
        self.nats
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|error| match error.kind() {
                RequestErrorKind::TimedOut => RpcError::deadline_exceeded(format!(
                    "no reply on {subject} within {:?}",
                    self.timeout
                )),
                RequestErrorKind::NoResponders => {
                    RpcError::unavailable(format!("no service is answering {subject}"))
                        .with_reason("no_responders")
                }
                RequestErrorKind::MaxPayloadExceeded => {
                    RpcError::payload_too_large(error.to_string())
                }
                RequestErrorKind::InvalidSubject => RpcError::invalid_argument(error.to_string()),
                RequestErrorKind::Other => RpcError::unavailable(error.to_string()),
            })
    }
}

/// Turns a reply into the typed response, or the error it carries.
pub fn decode_reply<T: prost::Message + Default>(reply: Message) -> Result<T, RpcError> {
    let is_error = reply
        .headers
        .as_ref()
        .is_some_and(|h| h.get(headers::ERROR).is_some());
    if is_error {
        let error = prost::Message::decode(reply.payload)
            .map_err(|e| RpcError::internal(format!("undecodable error reply: {e}")))?;
        return Err(RpcError::from_proto(error));
    }
    T::decode(reply.payload).map_err(|e| RpcError::internal(format!("undecodable reply: {e}")))
}

fn too_large(size: usize, limit: usize) -> RpcError {
    RpcError::payload_too_large(format!(
        "request of {size} bytes exceeds the {limit}-byte limit"
    ))
    .with_detail("limit_bytes", limit)
}

// ---------------------------------------------------------------------------------------------
// Server

/// Serves typed methods in a queue group; every replica of a service runs one.
///
/// Shutdown ([`RpcServer::shutdown`]) drains: subscriptions stop taking new requests, requests
/// already delivered are answered, in-flight handlers finish, then the connection is flushed.
#[derive(Debug)]
pub struct RpcServer {
    nats: Client,
    queue_group: String,
    in_flight: Arc<Semaphore>,
    handlers: TaskTracker,
    loops: JoinSet<()>,
    stop: CancellationToken,
}

impl RpcServer {
    /// Default bound on concurrently running handlers per server.
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

    pub fn new(nats: Client, queue_group: impl Into<String>) -> Self {
        Self {
            nats,
            queue_group: queue_group.into(),
            in_flight: Arc::new(Semaphore::new(Self::DEFAULT_MAX_IN_FLIGHT)),
            handlers: TaskTracker::new(),
            loops: JoinSet::new(),
            stop: CancellationToken::new(),
        }
    }

    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Arc::new(Semaphore::new(max.max(1)));
        self
    }

    /// Subscribes `M`'s subject in the queue group and answers each request with `handler`.
    pub async fn serve<M, H, Fut>(&mut self, handler: H) -> Result<(), async_nats::SubscribeError>
    where
        M: Method,
        H: Fn(RequestContext, M::Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Response, RpcError>> + Send + 'static,
    {
        let subject = M::ENDPOINT.serve_subject();
        let mut subscription = self
            .nats
            .queue_subscribe(subject.clone(), self.queue_group.clone())
            .await?;
        // A round trip to the server, so that when `serve` returns the subject is reachable.
        if let Err(error) = round_trip(&self.nats).await {
            tracing::warn!(%subject, %error, "no round trip to the server after subscribing");
        }
        let handler = Arc::new(handler);
        let (nats, in_flight, handlers, stop) = (
            self.nats.clone(),
            self.in_flight.clone(),
            self.handlers.clone(),
            self.stop.clone(),
        );
        tracing::debug!(%subject, queue_group = %self.queue_group, "serving");
        self.loops.spawn(async move {
            let mut draining = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled(), if !draining => {
                        draining = true;
                        if let Err(error) = subscription.drain().await {
                            tracing::warn!(%subject, %error, "drain failed");
                            break;
                        }
                    }
                    message = subscription.next() => {
                        let Some(message) = message else { break };
                        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                        let (nats, handler) = (nats.clone(), handler.clone());
                        handlers.spawn(async move {
                            answer::<M, H, Fut>(nats, handler, message).await;
                            drop(permit);
                        });
                    }
                }
            }
        });
        Ok(())
    }

    /// Stops taking requests, answers those already received, and waits for in-flight handlers.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.loops.join_next().await.is_some() {}
        self.handlers.close();
        self.handlers.wait().await;
        if let Err(error) = self.nats.flush().await {
            tracing::warn!(%error, "flush after shutdown failed");
        }
    }
}

/// Returns once the server has processed everything sent on `nats` before it. `flush` only
/// writes the buffer out (async-nats has no public PING), so this sends a message to an inbox of
/// our own: the server handles a connection's commands in order, and the message comes back only
/// after the subscriptions sent before it are in place.
pub async fn round_trip(nats: &Client) -> Result<(), RpcError> {
    let failed = |what: &str, error: &dyn std::fmt::Display| {
        RpcError::unavailable(format!("round trip to NATS: {what}: {error}"))
    };
    let inbox = nats.new_inbox();
    let mut echo = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| failed("subscribe", &e))?;
    nats.publish(inbox, Bytes::new())
        .await
        .map_err(|e| failed("publish", &e))?;
    nats.flush().await.map_err(|e| failed("flush", &e))?;
    let back = tokio::time::timeout(Duration::from_secs(10), echo.next()).await;
    let _ = echo.unsubscribe().await;
    match back {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(failed("echo", &"the subscription ended")),
        Err(_) => Err(failed("echo", &"no answer within 10 s")),
    }
}

async fn answer<M, H, Fut>(nats: Client, handler: Arc<H>, message: Message)
where
    M: Method,
    H: Fn(RequestContext, M::Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Response, RpcError>> + Send + 'static,
{
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "ignoring a message without a reply subject");
        return;
    };
    let started = Instant::now();
    let method = M::ENDPOINT.name();
    let parent = crate::trace::extract(message.headers.as_ref());
    let span = tracing::info_span!(
        "rpc.server",
        otel.name = %method,
        otel.kind = "server",
        rpc.system = "nats",
        error.code = field::Empty,
    );
    // A remote parent links this span into the caller's trace; without one it starts a trace.
    let _ = span.set_parent(parent.clone());

    let outcome = AssertUnwindSafe(handle_request::<M, H, Fut>(&handler, &message))
        .catch_unwind()
        .instrument(span.clone())
        .await
        .unwrap_or_else(|panic| Err(panic_to_error(panic)));

    let mut reply_headers = HeaderMap::new();
    let span_cx = span.context();
    if span_cx.span().span_context().is_valid() {
        crate::trace::inject(&span_cx, &mut reply_headers);
    } else {
        // No OpenTelemetry layer installed: still hand the caller's trace back.
        crate::trace::inject(&parent, &mut reply_headers);
    }
    let max_payload = nats.server_info().max_payload;
    let outcome = outcome.and_then(|response| {
        let body = response.encode_to_vec();
        // A reply NATS would refuse must not vanish: the caller gets an error instead.
        if body.len() > max_payload.saturating_sub(1024) {
            return Err(RpcError::internal(format!(
                "the reply ({} bytes) exceeds what NATS carries ({max_payload} bytes)",
                body.len()
            ))
            .with_reason("reply_too_large"));
        }
        Ok(body)
    });
    let (code, body) = match outcome {
        Ok(body) => ("OK", body),
        Err(error) => {
            if error.code == ErrorCode::Internal {
                tracing::error!(parent: &span, %error, "request failed");
            } else {
                tracing::debug!(parent: &span, %error, "request refused");
            }
            span.record("error.code", error.code.name());
            reply_headers.insert(headers::ERROR, error.code.name());
            (error.code.name(), error.to_proto().encode_to_vec())
        }
    };
    if let Err(error) = nats
        .publish_with_headers(reply_to, reply_headers, body.into())
        .await
    {
        tracing::warn!(parent: &span, %error, "could not publish reply");
    }
    metrics::counter!("syntropism_rpc_requests_total", "method" => method.clone(), "code" => code)
        .increment(1);
    metrics::histogram!("syntropism_rpc_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}

async fn handle_request<M, H, Fut>(handler: &H, message: &Message) -> Result<M::Response, RpcError>
where
    M: Method,
    H: Fn(RequestContext, M::Request) -> Fut,
    Fut: Future<Output = Result<M::Response, RpcError>>,
{
    if message.payload.len() > M::MAX_REQUEST_BYTES {
        return Err(too_large(message.payload.len(), M::MAX_REQUEST_BYTES));
    }
    let agent = match M::ENDPOINT.scope {
        Scope::Agent => {
            // agent.<id>.<service>.<method>: the server subscribed with exactly this shape.
            let token = message.subject.split('.').nth(1).unwrap_or_default();
            Some(AgentId::parse(token, "subject").map_err(RpcError::from)?)
        }
        Scope::Internal | Scope::Admin => None,
    };
    let request = M::Request::decode(message.payload.clone()).map_err(|error| {
        RpcError::invalid_argument(format!("malformed {} request: {error}", M::ENDPOINT.name()))
            .with_reason("malformed_request")
    })?;
    let correlation_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CORRELATION_ID))
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let context = RequestContext {
        subject: message.subject.to_string(),
        agent,
        correlation_id,
    };
    handler(context, request).await
}

fn panic_to_error(panic: Box<dyn Any + Send>) -> RpcError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %what, "handler panicked");
    RpcError::internal("the handler failed unexpectedly").with_reason("panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_holds_what_fits_and_at_least_one() {
        assert_eq!(fitting([10, 10, 10], 1000), 3);
        assert_eq!(fitting([100, 100, 100], 250), 2);
        assert_eq!(fitting([5000], 10), 1);
        assert_eq!(fitting(std::iter::empty(), 10), 0);
    }

    #[test]
    fn subjects_follow_the_design() {
        let agent = AgentId::random();
        let internal = Endpoint {
            scope: Scope::Internal,
            service: "economy",
            method: "transfer",
        };
        assert_eq!(internal.subject(None).unwrap(), "economy.transfer");
        assert!(internal.subject(Some(&agent)).is_err());
        let agent_facing = Endpoint {
            scope: Scope::Agent,
            service: "economy",
            method: "balance",
        };
        assert_eq!(agent_facing.serve_subject(), "agent.*.economy.balance");
        assert_eq!(
            agent_facing.subject(Some(&agent)).unwrap(),
            format!("agent.{agent}.economy.balance")
        );
        assert!(agent_facing.subject(None).is_err());
        let admin = Endpoint {
            scope: Scope::Admin,
            service: "market",
            method: "set_supply",
        };
        assert_eq!(admin.subject(None).unwrap(), "admin.market.set_supply");
    }
}
