"""MQTT (v5, paho-mqtt 2.x): a source of sensor readings, a sink for outputs and a dead-letter topic.

- ``MqttSource`` subscribes to a topic pattern; the levels its wildcards match name the stream
  (``stream_id_of``). QoS 1 with a persistent session is **at-least-once**: messages are acknowledged in
  ``commit()``, after the pipeline saved the state covering them, so whatever a crash interrupts is
  redelivered by the broker to the same client id (and dropped downstream by ``(stream, timestamp)`` when
  the restored state already holds it). QoS 0 is best-effort.
- ``MqttSink`` publishes each output as JSON to ``scores/{stream}``; ``MqttDeadLetters`` publishes rejected
  input as JSON to ``deadletters/{stream}``. Both wait for the broker's acknowledgements in ``flush()``
  (the checkpoint) and block ``write`` while too many publishes are unacknowledged (backpressure).

Every client connects with ``clean_start=False`` and a session expiry, reconnects by itself with
exponential backoff (``reconnect_backoff_s``), and logs an outage once (not once per attempt). A client id
names a session: two processes must not share one (the broker would disconnect them in turn).
"""

from __future__ import annotations

import logging
import math
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from connectors.base import Assignment, DeadLetter, Guarantee, Message, Output
from connectors.codec import encode_document

log = logging.getLogger(__name__)


class _QuietReconnects(logging.Filter):
    """paho logs an error on every pass of its loop while reconnecting; the outage is logged once here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


paho_log = logging.getLogger(f"{__name__}.paho")
paho_log.addFilter(_QuietReconnects())

RECEIVE_MAXIMUM = 65_535
"""Unacknowledged QoS 1 messages the broker may send us (the protocol's maximum): a checkpoint interval's
worth of messages is acknowledged at once, in ``commit``."""
SYNC_FILTER = "$rnnstream/sync"
"""A topic filter nobody subscribes to: unsubscribing from it is a round trip to the broker."""
SYNC_TIMEOUT_S = 2.0
PAHO_MAX_INFLIGHT = 100
"""Publishes paho keeps in flight at once. paho rescans its in-flight messages on every acknowledgement:
measured here with 30,000 QoS 1 publishes, 22.8k/s were acknowledged with 100 in flight, 8.4k/s with
1,000 and 1.2k/s with 20,000. More unacknowledged publishes (``max_unacked``) wait in paho's queue."""
OUTAGE_LOG_S = 30.0
"""While publishes wait for a broker that does not acknowledge, a warning this often (seconds)."""
MAX_UNACKED = 60_000
"""Unacknowledged publishes a sink may have at most (packet ids are 16 bits and must stay unique)."""
MAX_POLL = 10_000
"""Messages one ``poll`` returns at most."""


class MqttError(RuntimeError):
    """The broker could not be reached, refused us, or did not acknowledge publishes in time."""


@dataclass(frozen=True)
class Tls:
    """TLS to the broker, passed to paho's ``tls_set``: ``ca_file`` (PEM CA certificates the broker's
    certificate must chain to; None: the system's), ``cert_file`` / ``key_file`` / ``key_password`` (a
    client certificate, for mutual TLS), ``check_hostname`` (the certificate must name the broker's host)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True


@dataclass(frozen=True)
class Connection:
    """How a client reaches the broker.

    - ``broker``: ``"host:port"``; ``client_id``: names the persistent session (unique per process).
    - ``session_expiry_s``: seconds the broker keeps the session (subscriptions, unacknowledged messages)
      after a disconnect. ``keepalive_s``: seconds between pings.
    - ``reconnect_backoff_s``: ``(first, max)`` delay between reconnect attempts, doubling (seconds).
    - ``connect_timeout_s``: how long the first connection may take before ``MqttError`` (seconds).
    - ``tls``: connect over TLS (None: plaintext); a failed handshake (an unknown CA, a certificate that
      does not name the host, a plaintext port) fails ``start`` at once, naming the TLS error.
    """

    broker: str
    client_id: str
    session_expiry_s: int = 86_400
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_backoff_s: tuple[float, float] = (0.1, 10.0)
    connect_timeout_s: float = 30.0
    tls: Tls | None = None

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.broker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"broker must be 'host:port', got {self.broker!r}")
        return host, int(port)


class _Link:
    """One paho client with a persistent session, run by paho's network thread.

    Counts and logs connection trouble: ``disconnects`` (once per outage), ``reconnects``,
    ``connect_failures`` (attempts refused or unreachable). ``ready`` is set by ``on_connected`` (default:
    on every successful CONNACK); ``start`` waits for it.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        max_inflight: int = 20,
        on_connected: Callable[[mqtt.Client, bool], None] | None = None,
        on_dropped: Callable[[], None] | None = None,
        callbacks: Mapping[str, Callable[..., None]] | None = None,
    ) -> None:
        self.conn = conn
        self.ready = threading.Event()
        self.counts = {"disconnects": 0, "reconnects": 0, "connect_failures": 0}
        self._on_connected = on_connected
        self._on_dropped = on_dropped
        self._outage_since: float | None = None
        self._refused: str | None = None
        self._stopping = False
        self._synced = threading.Condition()
        self.server_receive_maximum = RECEIVE_MAXIMUM  # QoS > 0 publishes the broker takes unacknowledged
        self._unsubacked: set[int] = set()
        self._settings = (manual_ack, receive_maximum, max_inflight, dict(callbacks or {}))
        self.client = self._build()
        self._started = False

    def _build(self) -> mqtt.Client:
        """A paho client: one per ``start`` (paho leaks a socket pair when a stopped loop starts again)."""
        manual_ack, receive_maximum, max_inflight, callbacks = self._settings
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.conn.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        c.enable_logger(paho_log)
        c.suppress_exceptions = True  # a bug in a callback is logged, not fatal to the network thread
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # unbounded in paho: the sink bounds what is unacknowledged itself
        c.reconnect_delay_set(*self.conn.reconnect_backoff_s)  # type: ignore[arg-type]  (floats work)
        if self.conn.username is not None:
            c.username_pw_set(self.conn.username, self.conn.password)
        if self.conn.tls is not None:
            _set_tls(c, self.conn.tls)
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_connect_fail = self._connect_failed
        c.on_unsubscribe = self._unsubscribed
        for name, callback in callbacks.items():
            setattr(c, name, callback)
        self._properties = Properties(PacketTypes.CONNECT)
        self._properties.SessionExpiryInterval = self.conn.session_expiry_s
        if receive_maximum is not None:
            self._properties.ReceiveMaximum = receive_maximum
        return c

    def start(self) -> None:
        """Connect (in the background, retrying) and wait until ``ready``; ``MqttError`` naming the broker
        after ``connect_timeout_s`` or at once when the broker refuses us."""
        host, port = self.conn.host_port()
        if self._started:
            self.client = self._build()
        self._started = True
        self.ready.clear()
        self._refused, self._stopping = None, False
        self.client.connect_async(
            host, port, self.conn.keepalive_s, clean_start=False, properties=self._properties
        )
        self.client.loop_start()
        deadline = time.monotonic() + self.conn.connect_timeout_s
        while not self.ready.wait(0.05):
            if self._refused is not None or time.monotonic() > deadline:
                self.stop()
                why = self._refused or f"no connection within {self.conn.connect_timeout_s:g} s"
                raise MqttError(f"MQTT broker {self.conn.broker} (client id {self.conn.client_id!r}): {why}")

    def stop(self) -> None:
        """Disconnect (the broker keeps the session) and stop the network thread. Waits (at most
        ``SYNC_TIMEOUT_S``) until the broker has read what we sent: mosquitto drops the unread input of a
        connection that a newer one with the same client id takes over, acknowledgements included."""
        self._stopping = True
        if self.client.is_connected():
            self.sync(SYNC_TIMEOUT_S)
        self.client.disconnect()
        self.client.loop_stop()

    def sync(self, timeout_s: float) -> bool:
        """One round trip (an UNSUBSCRIBE of a filter nobody uses): True once the broker answered, having
        processed every packet sent before it; False after ``timeout_s`` seconds."""
        rc, mid = self.client.unsubscribe(SYNC_FILTER)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._synced:
            done = self._synced.wait_for(lambda: mid in self._unsubacked, timeout_s)
            self._unsubacked.discard(mid)
        return done

    def _unsubscribed(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with self._synced:
            self._unsubacked.add(mid)
            self._synced.notify_all()

    def _connected(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self.counts["connect_failures"] += 1
            self._refused = f"connection refused: {reason}"
            log.error("MQTT broker %s refused %r: %s", self.conn.broker, self.conn.client_id, reason)
            return
        if self._outage_since is not None:
            self.counts["reconnects"] += 1
            log.warning(
                "MQTT %r reconnected to %s after %.1f s (%s)",
                self.conn.client_id,
                self.conn.broker,
                time.monotonic() - self._outage_since,
                "session resumed" if flags.session_present else "the broker lost the session",
            )
            self._outage_since = None
        self.server_receive_maximum = getattr(props, "ReceiveMaximum", RECEIVE_MAXIMUM)
        if self._on_connected is not None:
            self._on_connected(client, bool(flags.session_present))
        else:
            self.ready.set()

    def _disconnected(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        if self._on_dropped is not None:
            self._on_dropped()
        if self._outage_since is None and self.ready.is_set() and not self._stopping:
            self._outage_since = time.monotonic()
            self.counts["disconnects"] += 1
            log.warning(
                "MQTT %r lost the connection to %s (%s): reconnecting",
                self.conn.client_id,
                self.conn.broker,
                reason,
            )

    def refuse(self, why: str) -> None:
        """Make a waiting ``start`` fail with ``why`` (a refused subscription...)."""
        self._refused = why

    def _connect_failed(self, _c: Any, _u: Any) -> None:
        self.counts["connect_failures"] += 1
        error = sys.exc_info()[1]  # paho calls this inside its ``except OSError`` around the connect
        if isinstance(error, ssl.SSLError):  # retrying cannot help: a waiting ``start`` fails now
            self._refused = f"TLS handshake failed: {error}"
        log.debug("MQTT %r: cannot reach %s (%s), retrying", self.conn.client_id, self.conn.broker, error)


def _set_tls(client: mqtt.Client, tls: Tls) -> None:
    """Make ``client`` connect over TLS as ``tls`` says."""
    client.tls_set(
        ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file, keyfile_password=tls.key_password
    )
    client.tls_insecure_set(not tls.check_hostname)


# ---- topics ------------------------------------------------------------------------------------------
def stream_id_of(pattern: str, topic: str) -> str | None:
    """The stream a ``topic`` names under a subscription ``pattern``: the levels its wildcards match,
    joined by ``/`` (``sensors/+`` and ``sensors/dev1`` → ``dev1``; ``site/+/sensors/+`` and
    ``site/a/sensors/dev1`` → ``a/dev1``; ``#`` takes the remaining levels). A pattern without wildcards
    gives the whole topic. ``None`` when the topic does not match (or the wildcards match no level)."""
    want, got = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and want[0] in ("+", "#"):
        return None  # wildcards at the first level do not match $SYS and other $ topics
    parts: list[str] = []
    for i, level in enumerate(want):
        if level == "#":
            parts.extend(got[i:])
            break
        if i >= len(got) or (level != "+" and level != got[i]):
            return None
        if level == "+":
            parts.append(got[i])
    else:
        if len(got) != len(want):
            return None
    if "+" not in want and "#" not in want:
        return topic
    return "/".join(parts) or None


def topic_for(template: str, stream: str) -> str:
    """``template`` with ``{stream}`` replaced by ``stream``; wildcard characters (``+``, ``#``) and NUL,
    which a published topic cannot hold, become ``_``."""
    safe = stream.replace("+", "_").replace("#", "_").replace("\0", "_")
    return template.replace("{stream}", safe)


# ---- source ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Received:
    message: Message
    mid: int
    qos: int
    link: int  # which connection delivered it: only that connection may acknowledge it


class MqttSource:
    """Messages of the topics matching ``topic`` (one partition, 0). QoS 1 (``at-least-once``): acked
    in ``commit``; QoS 0 (``best-effort``): at most ``max_queued`` wait, the oldest dropped (and counted)
    beyond. ``positions`` is empty: the broker's session is the position. ``options``: the other
    ``Connection`` fields (session expiry, keepalive, credentials, reconnect backoff, connect timeout)."""

    def __init__(
        self,
        broker: str,
        topic: str = "sensors/+",
        client_id: str = "rnnstream",
        qos: int = 1,
        max_queued: int = 100_000,
        **options: Any,
    ) -> None:
        if qos not in (0, 1):
            # QoS 2 cannot wait for the checkpoint: the broker hands the message over at PUBREC
            raise ValueError(f"MqttSource qos must be 0 or 1, got {qos}")
        self.topic = topic
        self.qos = qos
        self.max_queued = max_queued
        self.guarantee: Guarantee = "at-least-once" if qos else "best-effort"
        conn = Connection(broker, client_id, **options)  # options: the other Connection fields
        self._link = _Link(
            conn,
            manual_ack=True,
            receive_maximum=RECEIVE_MAXIMUM,
            on_connected=self._subscribe,
            on_dropped=self._dropped,
            callbacks={"on_message": self._received, "on_subscribe": self._subscribed},
        )
        self._cond = threading.Condition()
        self._queue: deque[_Received] = deque()
        self._unacked: list[_Received] = []  # QoS 1 messages polled and not yet acknowledged, in order
        self._polled = 0  # QoS 1 messages polled so far (marks count them)
        self._released = 0  # ... of which acknowledged or given up (``rollback``)
        self._link_id = 0  # changes on every connect and disconnect
        self._next_position = 0
        self._overflowing = False
        self.counts = dict.fromkeys(
            ("received", "redelivered", "dropped", "acked", "ack_skipped", "subscribe_failures"), 0
        )

    # -- network thread --
    def _subscribe(self, client: mqtt.Client, session_present: bool) -> None:
        """Every connect, session or not: a broker that lost its sessions must not leave us deaf."""
        with self._cond:
            self._link_id += 1
        client.subscribe(self.topic, options=SubscribeOptions(qos=self.qos))

    def _subscribed(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            self.counts["subscribe_failures"] += 1
            self._link.refuse(f"subscription to {self.topic!r} refused: {failed[0]}")
            log.error("MQTT broker %s refused the subscription: %s", self._link.conn.broker, failed[0])
            return
        self._link.ready.set()

    def _dropped(self) -> None:
        with self._cond:
            self._link_id += 1

    def _received(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode(errors="backslashreplace")  # brokers reject such topics; be safe
        sid = stream_id_of(self.topic, topic)
        with self._cond:
            received = _Received(
                Message(msg.payload, sid, 0, self._next_position, topic, time.monotonic()),
                msg.mid,
                msg.qos,
                self._link_id,
            )
            self._next_position += 1
            self.counts["received"] += 1
            self.counts["redelivered"] += msg.dup
            if len(self._queue) >= self.max_queued and not self._make_room(received):
                return
            self._queue.append(received)
            if len(self._queue) == 1:
                self._cond.notify_all()

    def _make_room(self, received: _Received) -> bool:
        """A full queue: drop the oldest QoS 0 message (or this one); QoS 1 messages are never dropped
        (unacknowledged, they are bounded by ``RECEIVE_MAXIMUM``). True when ``received`` is to be queued."""
        if self._queue[0].qos == 0:
            self._queue.popleft()
            keep = True
        elif received.qos == 0:
            keep = False
        else:
            return True
        self.counts["dropped"] += 1
        if not self._overflowing:
            self._overflowing = True
            log.warning("MQTT source queue full (%d): dropping the oldest QoS 0 messages", self.max_queued)
        return keep

    # -- Source --
    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        """Announce partition 0, connect and subscribe; ``resume`` is unused (the session is the position).
        Raises ``MqttError`` when the broker cannot be reached within ``connect_timeout_s``."""
        assignment.assigned([0])
        self._link.start()

    def poll(self, timeout_s: float) -> list[Message]:
        """What arrived, oldest first; waits up to ``timeout_s`` seconds when nothing has."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout_s)
            n = min(len(self._queue), MAX_POLL)
            batch = [self._queue.popleft() for _ in range(n)]
            if len(self._queue) < self.max_queued // 2:
                self._overflowing = False
        unacked = [r for r in batch if r.qos > 0]
        self._unacked.extend(unacked)
        self._polled += len(unacked)
        return [r.message for r in batch]

    def mark(self) -> int:
        """A mark of every message polled so far, for ``commit(mark)``."""
        return self._polled

    @property
    def exhausted(self) -> bool:
        return False

    def positions(self) -> dict[str, Any]:
        return {}

    def commit(self, mark: int | None = None) -> None:
        """Acknowledge the QoS 1 messages polled so far (up to ``mark``, when given), in order of receipt,
        that came on the current connection; those of an earlier connection are redelivered by the broker
        instead."""
        n = len(self._unacked) if mark is None else max(0, mark - self._released)
        unacked, self._unacked = self._unacked[:n], self._unacked[n:]
        self._released += len(unacked)
        with self._cond:  # no connect or disconnect between the check and the ack
            for r in unacked:
                if r.link == self._link_id:
                    self._link.client.ack(r.mid, r.qos)
                    self.counts["acked"] += 1
                else:
                    self.counts["ack_skipped"] += 1

    def rollback(self) -> list[int]:
        """Forget what was polled or queued since the last commit and reconnect: the broker redelivers
        every unacknowledged message of the session."""
        self._link.stop()
        with self._cond:
            self._unacked, self._queue = [], deque()
            self._released = self._polled
        self._link.start()
        return [0]

    def close(self) -> None:
        """Disconnect without acknowledging anything more (the session keeps it for redelivery)."""
        self._link.stop()

    def counters(self) -> dict[str, int]:
        """``received`` (``redelivered``: with the DUP flag), ``acked``, ``ack_skipped`` (polled on an
        earlier connection), ``dropped`` (QoS 0 overflow), ``queued``, connection trouble."""
        return {**self.counts, **self._link.counts, "queued": len(self._queue)}


# ---- publishers --------------------------------------------------------------------------------------
class _Publisher:
    """Publishes with one client; tracks unacknowledged QoS > 0 publishes for ``flush`` and backpressure.

    paho keeps unacknowledged publishes in memory and resends them after a reconnect (``publish`` while
    disconnected queues too). At most ``max_unacked`` of them, and no more than the broker's Receive
    Maximum: ``publish`` waits for room.
    """

    def __init__(
        self, conn: Connection, qos: int, retain: bool, max_unacked: int, ack_timeout_s: float | None
    ) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if not 1 <= max_unacked <= MAX_UNACKED:
            raise ValueError(f"max_unacked must be in [1, {MAX_UNACKED}] (packet ids), got {max_unacked}")
        self.qos, self.retain = qos, retain
        self.max_unacked, self.ack_timeout_s = max_unacked, ack_timeout_s
        inflight = min(max_unacked, PAHO_MAX_INFLIGHT)  # the rest waits in paho's queue
        self._link = _Link(conn, max_inflight=inflight, callbacks={"on_publish": self._acked})
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # mid → publish number, oldest first
        self._published = 0  # QoS > 0 publishes so far (their numbers)
        self._early: set[int] = set()  # acked before publish() returned its mid
        self._wake_at = -1  # a thread in _wait wants waking once this few publishes are unacknowledged
        self.counts = {"published": 0, "acked": 0, "rejected": 0}
        self._link.start()

    def _acked(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        if self.qos == 0:
            return
        if reason.is_failure:
            self.counts["rejected"] += 1
            log.error("MQTT broker %s rejected a publish: %s", self._link.conn.broker, reason)
        with self._cond:
            if self._pending.pop(mid, None) is None:
                self._early.add(mid)
            self.counts["acked"] += 1
            if len(self._pending) <= self._wake_at:  # wake a waiter once, not on every acknowledgement
                self._cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue one publish; waits while too many are unacknowledged (``MqttError`` after
        ``ack_timeout_s`` seconds)."""
        if self.qos:
            room = min(self.max_unacked, self._link.server_receive_maximum)
            if len(self._pending) >= room:
                self._wait(room - 1, "waiting for room to publish")
        info = self._link.client.publish(topic, payload, self.qos, self.retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: sent on reconnect
            why = mqtt.error_string(info.rc)
            raise MqttError(f"MQTT publish to {topic!r} on {self._link.conn.broker}: {why}")
        self.counts["published"] += 1
        if self.qos:
            with self._cond:
                self._published += 1
                if info.mid in self._early:
                    self._early.discard(info.mid)
                else:
                    self._pending[info.mid] = self._published

    def mark(self) -> int:
        """A mark of everything published so far, for ``done``."""
        return self._published

    def done(self, mark: int) -> bool:
        """Whether every publish up to ``mark`` is acknowledged; never waits."""
        with self._cond:
            return not self._pending or next(iter(self._pending.values())) > mark

    def flush(self) -> None:
        """Wait until every QoS > 0 publish so far is acknowledged (``MqttError`` after ``ack_timeout_s``)."""
        self._wait(0, "flush")

    def _wait(self, most: int, what: str) -> None:
        """Until at most ``most`` publishes are unacknowledged: ``MqttError`` after ``ack_timeout_s``, or
        (``None``) for as long as the broker takes, with a warning every ``OUTAGE_LOG_S`` seconds."""
        limit = math.inf if self.ack_timeout_s is None else self.ack_timeout_s
        start = time.monotonic()
        with self._cond:
            self._wake_at = most
            try:
                while len(self._pending) > most:
                    waited = time.monotonic() - start
                    if waited >= limit:
                        raise MqttError(
                            f"MQTT broker {self._link.conn.broker} did not acknowledge {len(self._pending)} "
                            f"publishes within {self.ack_timeout_s:g} s ({what})"
                        )
                    if not self._cond.wait(min(OUTAGE_LOG_S, limit - waited)) and len(self._pending) > most:
                        log.warning(
                            "MQTT broker %s has not acknowledged %d publishes for %.0f s (%s): waiting",
                            self._link.conn.broker, len(self._pending), time.monotonic() - start, what,
                        )  # fmt: skip
            finally:
                self._wake_at = -1

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._link.stop()

    def counters(self) -> dict[str, int]:
        return {**self.counts, **self._link.counts, "unacked": len(self._pending)}


class _Publishing:
    """What ``MqttSink`` and ``MqttDeadLetters`` share: one publishing client on ``broker`` as
    ``client_id`` (``options``: the other ``Connection`` fields); ``max_unacked`` publishes may await their
    acknowledgement before ``write`` blocks; ``ack_timeout_s`` (seconds) bounds ``flush`` and that wait
    (then ``MqttError``; ``None``: wait out a broker outage, warning every ``OUTAGE_LOG_S`` seconds).
    ``flush`` waits for the broker's acknowledgements, ``close`` flushes and disconnects, ``counters``
    (``published``, ``acked``, ``rejected``, ``unacked``, connection trouble). Connects at once."""

    def __init__(
        self,
        broker: str,
        topic: str,
        client_id: str,
        qos: int,
        retain: bool,
        max_unacked: int = 10_000,
        ack_timeout_s: float | None = 30.0,
        **options: Any,
    ) -> None:
        self.topic = topic
        conn = Connection(broker, client_id, **options)
        self._pub = _Publisher(conn, qos, retain, max_unacked, ack_timeout_s)

    def flush(self) -> None:
        self._pub.flush()

    def mark(self) -> int:
        """A mark of everything written so far (for a checkpoint that must not wait: ``done``)."""
        return self._pub.mark()

    def done(self, mark: int) -> bool:
        """Whether the broker acknowledged everything written up to ``mark``; never waits."""
        return self._pub.done(mark)

    def close(self) -> None:
        self._pub.close()

    def counters(self) -> dict[str, int]:
        return self._pub.counters()


class MqttSink(_Publishing):
    """Each output as JSON (``encode_document``) to ``topic`` with ``{stream}`` → the stream id. QoS 1:
    ``flush`` returns once the broker acknowledged everything written. ``options``: ``max_unacked``,
    ``ack_timeout_s`` and the ``Connection`` fields (see ``_Publishing``)."""

    def __init__(
        self,
        broker: str,
        topic: str = "scores/{stream}",
        client_id: str = "rnnstream-out",
        qos: int = 1,
        retain: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(broker, topic, client_id, qos, retain, **options)

    def write(self, outputs: list[Output]) -> None:
        for o in outputs:
            self._pub.publish(topic_for(self.topic, o.stream_id), encode_document(o.doc))


class MqttDeadLetters(_Publishing):
    """Rejected input as JSON (``DeadLetter.document``: ``{"reason", "key", "topic", "partition",
    "position", "ts", "raw"}``) to ``topic`` with ``{stream}`` → the message key (``unknown`` without one).
    ``raw``: the input as text when it is UTF-8, else ``{"base64": ...}``. Options as for ``MqttSink``."""

    def __init__(
        self,
        broker: str,
        topic: str = "deadletters/{stream}",
        client_id: str = "rnnstream-dlq",
        qos: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(broker, topic, client_id, qos, False, **options)

    def write(self, letter: DeadLetter) -> None:
        doc = letter.document()
        stream = doc["key"] if isinstance(doc["key"], str) else "unknown"
        self._pub.publish(topic_for(self.topic, stream), encode_document(doc))
