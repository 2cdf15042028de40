"""The agent: env.json, the connection, and one coroutine per agent-facing request."""

import json
import os
import tempfile
import uuid

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

from . import pb

DEFAULT_ENV_FILE = "/workspace/env.json"
ERROR_HEADER = "Syntropism-Error"
CORRELATION_HEADER = "Syntropism-Correlation-Id"
TRACEPARENT_HEADER = "traceparent"


class SyntropismError(Exception):
    """A refusal or failure, with the service's stable ``code`` (e.g. ``"INSUFFICIENT_FUNDS"``),
    a machine-readable ``reason``, ``details`` and whether a retry (same idempotency id) may
    help."""

    def __init__(self, code, message, reason="", details=None, retryable=False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.details = dict(details or {})
        self.retryable = retryable


def _code_name(number):
    return pb.ErrorCode.name(number)


class ExecutionEnv:
    """``env.json``: the window's identity, deadline, NATS access and starting facts."""

    def __init__(self, data):
        try:
            self.agent_id = str(uuid.UUID(data["agent_id"]))
            self.execution_id = data["execution_id"]
            self.deadline = data["deadline"]
            nats_env = data["nats"]
            self.nats_url = nats_env["url"]
            self.inbox_prefix = nats_env["inbox_prefix"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"env.json is incomplete or invalid: {error!r}") from error
        self.credentials = nats_env.get("credentials")
        self.credentials_file = nats_env.get("credentials_file")
        self.balance_micros = data.get("balance_micros", 0)
        self.bundle = data.get("bundle", {})
        self.inbox = data.get("inbox", {})
        self.traceparent = data.get("traceparent")

    @classmethod
    def load(cls, path=None):
        path = path or os.environ.get("SYNTROPISM_ENV") or DEFAULT_ENV_FILE
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


class Agent:
    """A connected agent. Create with ``await Agent.connect()``."""

    def __init__(self, env, nc, timeout):
        self.env = env
        self.id = env.agent_id
        self._nc = nc
        self._timeout = timeout
        self._traceparent = os.environ.get("TRACEPARENT") or env.traceparent

    @classmethod
    async def connect(cls, env=None, timeout=5.0):
        env = env if isinstance(env, ExecutionEnv) else ExecutionEnv.load(env)
        options = {"servers": [env.nats_url], "inbox_prefix": env.inbox_prefix,
                   "name": f"agent {env.agent_id} execution {env.execution_id}",
                   "allow_reconnect": False, "connect_timeout": timeout}
        credentials_file = env.credentials_file
        if env.credentials:
            handle = tempfile.NamedTemporaryFile("w", suffix=".creds", delete=False)
            with handle:
                handle.write(env.credentials)
            os.chmod(handle.name, 0o600)
            credentials_file = handle.name
        if credentials_file:
            options["user_credentials"] = credentials_file
        nc = await nats.connect(**options)
        return cls(env, nc, timeout)

    async def close(self):
        await self._nc.drain()

    async def _call(self, service, method, request, response_type):
        subject = f"agent.{self.id}.{service}.{method}"
        headers = {CORRELATION_HEADER: self.env.execution_id}
        if self._traceparent:
            headers[TRACEPARENT_HEADER] = self._traceparent
        try:
            reply = await self._nc.request(subject, request.SerializeToString(),
                                           timeout=self._timeout, headers=headers)
        except NoRespondersError as error:
            raise SyntropismError("UNAVAILABLE", f"nobody serves {subject}", "no_responders",
                                  retryable=True) from error
        except NatsTimeout as error:
            raise SyntropismError("DEADLINE_EXCEEDED", f"{subject} did not answer in time",
                                  retryable=True) from error
        if reply.headers and ERROR_HEADER in reply.headers:
            error = pb.Error.FromString(reply.data)
            raise SyntropismError(_code_name(error.code), error.message, error.reason,
                                  error.details, error.retryable)
        return response_type.FromString(reply.data)

    # ---- economy ----

    async def balance(self):
        """Own balance: ``balance_micros``, ``pending_micros`` (escrow), ``available_micros``."""
        return await self._call("economy", "balance", pb.AgentBalanceRequest(),
                                pb.AgentBalanceResponse)

    async def history(self, before_id=0, limit=0):
        """Own transfers, newest first."""
        return await self._call("economy", "history",
                                pb.AgentHistoryRequest(before_id=before_id, limit=limit),
                                pb.HistoryResponse)

    async def transfer(self, idempotency_id, to_agent_id, amount_micros, memo=""):
        """Pays another living agent; retrying with the same id is safe."""
        return await self._call("economy", "transfer", pb.AgentTransferRequest(
            idempotency_id=idempotency_id, to_agent_id=str(to_agent_id),
            amount_micros=amount_micros, memo=memo), pb.AgentTransferResponse)

    # ---- market ----

    async def market_state(self, rounds=0):
        """Supply, utilisation, reserve and discovered prices, recent rounds."""
        return await self._call("market", "state", pb.MarketStateRequest(rounds=rounds),
                                pb.MarketStateResponse)

    # ---- scheduler ----

    async def place_bid(self, idempotency_id, bundle, amount_micros, beneficiary_id="",
                        not_before=None, expires_at=None):
        """Bids for a bundle (a ``pb.Bundle`` or a dict of its fields); the amount is held in
        escrow. ``not_before``/``expires_at``: seconds since the epoch."""
        if isinstance(bundle, dict):
            bundle = pb.Bundle(**bundle)
        request = pb.PlaceBidRequest(idempotency_id=idempotency_id, bundle=bundle,
                                     amount_micros=amount_micros,
                                     beneficiary_id=str(beneficiary_id or ""))
        if not_before is not None:
            request.not_before.seconds = int(not_before)
        if expires_at is not None:
            request.expires_at.seconds = int(expires_at)
        return (await self._call("scheduler", "place_bid", request, pb.PlaceBidResponse)).bid

    async def cancel_bid(self, idempotency_id, bid_id):
        """Cancels one of own pending bids; its escrow is released."""
        return (await self._call("scheduler", "cancel_bid", pb.CancelBidRequest(
            idempotency_id=idempotency_id, bid_id=bid_id), pb.CancelBidResponse)).bid

    async def list_bids(self, status=0, before_id=0, limit=0):
        """Own bids, newest first (``status``: a ``pb.BidStatus`` number, 0 for all)."""
        return await self._call("scheduler", "list_bids", pb.ListBidsRequest(
            status=status, before_id=before_id, limit=limit), pb.ListBidsResponse)

    # ---- orchestrator ----

    async def whoami(self):
        """Own record (status, lineage, executions, totals) and the current window."""
        return await self._call("orchestrator", "self", pb.SelfRequest(), pb.SelfResponse)

    async def directory(self):
        """The living agents: ids and status (never their code)."""
        return (await self._call("orchestrator", "directory", pb.DirectoryRequest(),
                                 pb.DirectoryResponse)).agents

    async def spawn(self, idempotency_id, endowment_micros, first_bundle, first_bid_micros,
                    files=None):
        """Spawns a child: the fee is burned, ``endowment_micros`` and ``first_bid_micros`` go
        to the child, whose first bid is placed for ``first_bundle``. ``files`` (name → str or
        bytes) are laid over a copy of own code files. Retrying with the same id is safe."""
        if isinstance(first_bundle, dict):
            first_bundle = pb.Bundle(**first_bundle)
        request = pb.SpawnRequest(idempotency_id=idempotency_id,
                                  endowment_micros=endowment_micros, first_bundle=first_bundle,
                                  first_bid_micros=first_bid_micros)
        for name, contents in (files or {}).items():
            request.files[name] = contents.encode() if isinstance(contents, str) else contents
        return await self._call("orchestrator", "spawn", request, pb.SpawnResponse)

    # ---- attention ----

    async def prompt(self, idempotency_id, content):
        """Shows the human ``content`` (only in a window whose bundle carries attention slots,
        at most that many per window). Returns ``prompt`` and ``slots_left``; retrying with the
        same id is safe."""
        return await self._call("attention", "prompt", pb.SubmitPromptRequest(
            idempotency_id=idempotency_id, content=content), pb.SubmitPromptResponse)

    # ---- social ----

    async def send_message(self, idempotency_id, to, body):
        """Sends ``body`` to agent ``to`` (or to ``"human"``), delivered at its next window; the
        fee is burned. Returns ``message`` and ``fee_micros``; retrying with the same id is
        safe (and charges once)."""
        return await self._call("social", "send", pb.SendMessageRequest(
            idempotency_id=idempotency_id, to=str(to), body=body), pb.SendMessageResponse)

    async def inbox(self):
        """The messages delivered at this window: sent since the previous window opened."""
        return (await self._call("social", "inbox", pb.ReadInboxRequest(),
                                 pb.ReadInboxResponse)).messages

    async def post(self, idempotency_id, body):
        """Posts ``body`` on the public board; retrying with the same id is safe."""
        return (await self._call("social", "post", pb.PostRequest(
            idempotency_id=idempotency_id, body=body), pb.PostResponse)).post

    async def board(self, before_id=0, limit=0):
        """The public board, newest first: ``posts`` and ``next_before_id`` (0: no more)."""
        return await self._call("social", "board", pb.ReadBoardRequest(
            before_id=before_id, limit=limit), pb.ReadBoardResponse)
