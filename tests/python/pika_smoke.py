#!/usr/bin/env python3
"""Smoke test of the broker through pika, the most used Python AMQP client.

Usage: pika_smoke.py AMQP_URL

Hare must be a drop-in replacement for RabbitMQ, so besides our Rust clients
we check that an independent, widely deployed client library gets exactly the
answers it expects: every basic property and header field type survives the
round trip bit for bit, confirms and mandatory returns reach pika's blocking
API, broker-side errors surface as pika's exceptions with RabbitMQ's reply
codes and texts, and requeued messages come back flagged as redelivered.

Run it against RabbitMQ (amqp://guest:guest@127.0.0.1:5680/%2f) to see the
reference behaviour. Exits 0 on success; on failure prints what differed and
exits 1. A watchdog alarm makes a hanging broker fail instead of blocking CI.
"""

import datetime
import decimal
import os
import signal
import struct
import sys
import time
import traceback

import pika
import pika.data
import pika.exceptions

# Upper bound for the whole script, so a broker that never answers fails it.
WATCHDOG_SECONDS = 60
# Upper bound for any single wait for deliveries.
WAIT_SECONDS = 5


def _patch_pika_float_support():
    """Teach pika 1.x to encode and decode AMQP doubles faithfully.

    pika cannot encode a Python float in a field table at all, and decodes
    'd'/'f' values through int(), silently truncating them. Other clients
    (Java, .NET, lapin) send doubles, so the broker must carry them intact;
    we extend pika's codec so that is what this test checks, not pika's bug.
    """
    original_encode = pika.data.encode_value
    original_decode = pika.data.decode_value

    def encode_value(pieces, value):
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return original_encode(pieces, value)

    def decode_value(encoded, offset):
        kind = encoded[offset : offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return original_decode(encoded, offset)

    # encode_table / decode_table (and the value codecs themselves, for nested
    # tables and arrays) look these names up in the module at call time.
    pika.data.encode_value = encode_value
    pika.data.decode_value = decode_value


class Failure(Exception):
    """A behaviour that differs from RabbitMQ's."""


def check(condition, message):
    if not condition:
        raise Failure(message)


def same_kind(actual, expected):
    """Equal values of the same type (pika returns 64-bit ints as its own int
    subclass `long`; a bool must stay a bool, not become 1)."""
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(same_kind(a, e) for a, e in zip(actual, expected))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and sorted(actual) == sorted(expected)
            and all(same_kind(actual[k], v) for k, v in expected.items())
        )
    if isinstance(expected, int) and not isinstance(expected, bool):
        return isinstance(actual, int) and not isinstance(actual, bool) and actual == expected
    return type(actual) is type(expected) and actual == expected


def check_eq(actual, expected, what):
    if not same_kind(actual, expected):
        raise Failure(
            f"{what}: expected {expected!r} ({type(expected).__name__}), "
            f"got {actual!r} ({type(actual).__name__})"
        )


def step(name):
    print(f"ok: {name}", flush=True)


def unique(prefix):
    return f"hare-test.pika.{prefix}.{os.getpid()}.{time.time_ns()}"


def as_naive_utc(value):
    """pika 1.3 decodes timestamps as naive UTC datetimes, 1.4 as aware ones."""
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


# Header values covering every field type pika can send (plus doubles, see
# _patch_pika_float_support), with the value pika hands back for each.
TIMESTAMP_HEADER = datetime.datetime(2024, 2, 29, 23, 59, 58)
HEADERS = {
    "str": "hello wörld ✓",
    "empty-str": "",
    "int": 42,
    "negative-int": -7,
    "int64": 2**40 + 3,
    "min-int64": -(2**63),
    "float": 3.14159265358979,
    "negative-float": -0.1,
    "true": True,
    "false": False,
    "nested": {
        "inner-str": "x",
        "inner-int": 1,
        "deeper": {"list": [1, "two", None]},
    },
    "list": ["a", 2, 2.5, True, None, {"k": "v"}, [1, [2]], b"\x00\x01"],
    "empty-list": [],
    "bytes": bytes(range(256)),
    "none": None,
    "decimal": decimal.Decimal("123.45"),
    "negative-decimal": decimal.Decimal("-0.001"),
    "timestamp": TIMESTAMP_HEADER,
}


def full_properties():
    return pika.BasicProperties(
        content_type="application/x-hare-test",
        content_encoding="identity",
        headers=HEADERS,
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1234",
        reply_to="amq.rabbitmq.reply-to.fake",
        expiration="3600000",
        message_id="msg-ä-1",
        timestamp=1_700_000_000,
        type="hare.smoke",
        user_id="guest",
        app_id="pika-smoke",
    )


# Body with every byte value, long enough to span several frames (128 KiB frames).
BODY = bytes(range(256)) * 1200 + b"\xce\x00end"


def check_headers(headers, where):
    check(isinstance(headers, dict), f"{where}: headers missing: {headers!r}")
    check_eq(sorted(headers), sorted(HEADERS), f"{where}: header names")
    for key, expected in HEADERS.items():
        actual = headers[key]
        if key == "timestamp":
            actual = as_naive_utc(actual)
        if key == "decimal" or key == "negative-decimal":
            check(
                isinstance(actual, decimal.Decimal) and actual == expected,
                f"{where}: header {key}: expected {expected!r}, got {actual!r}",
            )
            continue
        check_eq(actual, expected, f"{where}: header {key}")


def check_properties(props, where):
    expected = full_properties()
    for name in (
        "content_type",
        "content_encoding",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    ):
        check_eq(getattr(props, name), getattr(expected, name), f"{where}: {name}")
    check_eq(props.cluster_id, None, f"{where}: cluster_id")
    check_headers(props.headers, where)


def wait_for_deliveries(connection, channel, queue, count, handler, auto_ack=False):
    """Consumes from `queue` with a blocking consumer until `handler` has seen
    `count` deliveries; fails after WAIT_SECONDS instead of waiting forever."""
    seen = []
    timed_out = []

    def on_message(ch, method, properties, body):
        seen.append((method, properties, body))
        handler(ch, method, properties, body)
        if len(seen) >= count:
            ch.stop_consuming()

    def on_timeout():
        timed_out.append(True)
        channel.stop_consuming()

    tag = channel.basic_consume(queue, on_message, auto_ack=auto_ack)
    timer = connection.call_later(WAIT_SECONDS, on_timeout)
    channel.start_consuming()
    connection.remove_timeout(timer)
    channel.basic_cancel(tag)
    check(
        not timed_out,
        f"consumer on {queue} got {len(seen)} of {count} deliveries in {WAIT_SECONDS}s",
    )
    return seen


def run(url):
    params = pika.URLParameters(url)
    params.socket_timeout = WAIT_SECONDS
    params.blocked_connection_timeout = WAIT_SECONDS
    params.connection_attempts = 1
    vhost = params.virtual_host

    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    exchange = unique("topic")
    queue = unique("queue")
    try:
        # --- topology -------------------------------------------------------
        channel.exchange_declare(exchange, exchange_type="topic")
        declared = channel.queue_declare(queue)
        check_eq(declared.method.queue, queue, "queue.declare-ok queue name")
        check_eq(declared.method.message_count, 0, "fresh queue message count")
        channel.queue_bind(queue, exchange, routing_key="smoke.#")
        step("declare topic exchange, queue, binding")

        # --- full properties round trip through basic.get ---------------------
        channel.basic_publish(exchange, "smoke.props.get", BODY, full_properties())
        channel.basic_publish(exchange, "smoke.props.consume", BODY, full_properties())
        channel.basic_publish(exchange, "other.unbound", b"dropped")
        method, props, body = None, None, None
        deadline = time.monotonic() + WAIT_SECONDS
        while method is None and time.monotonic() < deadline:
            method, props, body = channel.basic_get(queue, auto_ack=True)
        check(method is not None, "basic.get found no message")
        check_eq(method.exchange, exchange, "get: exchange")
        check_eq(method.routing_key, "smoke.props.get", "get: routing key")
        check_eq(method.redelivered, False, "get: redelivered")
        check_eq(method.message_count, 1, "get: message_count (messages left)")
        check_eq(body, BODY, "get: body")
        check_properties(props, "get")
        step("basic.get: body and every property and header type round-trip")

        # --- blocking consumer ------------------------------------------------
        deliveries = wait_for_deliveries(
            connection, channel, queue, 1, lambda *args: None, auto_ack=True
        )
        method, props, body = deliveries[0]
        check_eq(method.routing_key, "smoke.props.consume", "consume: routing key")
        check_eq(method.exchange, exchange, "consume: exchange")
        check_eq(method.redelivered, False, "consume: redelivered")
        check_eq(body, BODY, "consume: body")
        check_properties(props, "consume")
        check_eq(
            channel.queue_declare(queue, passive=True).method.message_count,
            0,
            "unbound routing key must not have been delivered",
        )
        step("blocking consumer: body and properties round-trip")

        # --- publisher confirms and mandatory returns ------------------------
        channel.confirm_delivery()
        channel.basic_publish(exchange, "smoke.confirmed", b"confirmed", mandatory=True)
        try:
            channel.basic_publish(
                exchange, "nowhere.at.all", b"unroutable", mandatory=True
            )
        except pika.exceptions.UnroutableError as err:
            check_eq(len(err.messages), 1, "returned messages")
            returned = err.messages[0]
            check_eq(returned.method.reply_code, 312, "basic.return reply code")
            check_eq(returned.method.reply_text, "NO_ROUTE", "basic.return reply text")
            check_eq(returned.method.exchange, exchange, "basic.return exchange")
            check_eq(returned.method.routing_key, "nowhere.at.all", "basic.return key")
            check_eq(returned.body, b"unroutable", "basic.return body")
        else:
            raise Failure("mandatory unroutable publish did not raise UnroutableError")
        # Non-mandatory unroutable messages are confirmed (and dropped) silently.
        channel.basic_publish(exchange, "nowhere.at.all", b"dropped")
        method, _, body = channel.basic_get(queue, auto_ack=True)
        check(method is not None, "confirmed message not in queue")
        check_eq(body, b"confirmed", "confirmed message body")
        check_eq(method.message_count, 0, "only the confirmed message was queued")
        step("publisher confirms; mandatory unroutable raises UnroutableError (312 NO_ROUTE)")

        # --- reject / nack / ack with requeue ---------------------------------
        for text in (b"first", b"second", b"third"):
            channel.basic_publish(exchange, "smoke.acks", text)

        method, _, body = channel.basic_get(queue)
        check_eq((body, method.redelivered), (b"first", False), "get first")
        channel.basic_reject(method.delivery_tag, requeue=True)
        # RabbitMQ puts a requeued message back at its original position.
        method, _, body = channel.basic_get(queue)
        check_eq((body, method.redelivered), (b"first", True), "first after reject")
        check_eq(method.message_count, 2, "messages left after re-get")
        channel.basic_ack(method.delivery_tag)

        method, _, body = channel.basic_get(queue)
        check_eq((body, method.redelivered), (b"second", False), "get second")
        channel.basic_nack(method.delivery_tag, requeue=True)
        method, _, body = channel.basic_get(queue)
        check_eq((body, method.redelivered), (b"second", True), "second after nack")
        channel.basic_reject(method.delivery_tag, requeue=False)

        method, _, body = channel.basic_get(queue)
        check_eq((body, method.redelivered), (b"third", False), "get third")
        channel.basic_nack(method.delivery_tag, requeue=False)
        method, _, _ = channel.basic_get(queue)
        check(method is None, "rejected/nacked without requeue must be gone")
        step("basic.get with reject/nack requeue=True (redelivered) and requeue=False (dropped)")

        # Same through a consumer, with a multiple nack.
        for text in (b"c1", b"c2", b"c3"):
            channel.basic_publish(exchange, "smoke.consumer", text)
        first_round = []

        def nack_all_at_third(ch, method, props, body):
            first_round.append((body, method.redelivered))
            if len(first_round) == 3:
                ch.basic_nack(method.delivery_tag, multiple=True, requeue=True)

        wait_for_deliveries(connection, channel, queue, 3, nack_all_at_third)
        check_eq(
            first_round,
            [(b"c1", False), (b"c2", False), (b"c3", False)],
            "consumer first round",
        )
        second_round = []

        def ack(ch, method, props, body):
            second_round.append((body, method.redelivered))
            ch.basic_ack(method.delivery_tag)

        wait_for_deliveries(connection, channel, queue, 3, ack)
        check_eq(
            second_round,
            [(b"c1", True), (b"c2", True), (b"c3", True)],
            "consumer redeliveries after multiple nack",
        )
        check_eq(
            channel.queue_declare(queue, passive=True).method.message_count,
            0,
            "queue empty after acks",
        )
        step("consumer nack(multiple, requeue) redelivers in order with redelivered=True")

        # --- broker errors surface as pika exceptions -------------------------
        missing = unique("missing")
        try:
            channel.queue_declare(missing, passive=True)
        except pika.exceptions.ChannelClosedByBroker as err:
            check_eq(err.reply_code, 404, "passive declare reply code")
            check_eq(
                err.reply_text,
                f"NOT_FOUND - no queue '{missing}' in vhost '{vhost}'",
                "passive declare reply text",
            )
        else:
            raise Failure("passive declare of a missing queue did not fail")
        check(channel.is_closed, "channel should be closed after a 404")
        check(connection.is_open, "a channel error must not close the connection")
        channel = connection.channel()
        check_eq(
            channel.queue_declare(queue, passive=True).method.message_count,
            0,
            "new channel works after a channel error",
        )
        step("passive declare of a missing queue: ChannelClosedByBroker 404")
    finally:
        if connection.is_open:
            if channel.is_closed:
                channel = connection.channel()
            channel.queue_delete(queue)
            channel.exchange_delete(exchange)
            connection.close()
    step("cleanup and connection.close")


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} AMQP_URL", file=sys.stderr)
        return 2

    def on_alarm(signum, frame):
        raise Failure(f"watchdog: the whole smoke test took over {WATCHDOG_SECONDS}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(WATCHDOG_SECONDS)
    _patch_pika_float_support()
    print(f"pika {pika.__version__} against {sys.argv[1]}", flush=True)
    try:
        run(sys.argv[1])
    except Failure as err:
        print(f"FAIL: {err}", file=sys.stderr)
        traceback.print_exc()
        return 1
    except Exception as err:  # any client error (closed connection, timeout...)
        print(f"FAIL: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print("pika smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
