#!/usr/bin/env python3
"""Celery's side of the hare-worker Celery interop tests (tests/worker_sdk/celery.rs).

Two roles, both with the real `celery` package and its `rpc://` result backend:

- A Celery app whose worker serves `py.*` tasks to a Rust client:
      HARE_CELERY_BROKER=amqp://… HARE_CELERY_QUEUE=q \
          python3 -m celery -A celery_interop worker -P solo -Q q
- A Python caller of the Rust worker's `rust.*` tasks:
      HARE_CELERY_BROKER=amqp://… HARE_CELERY_QUEUE=q python3 celery_interop.py
  It exits 0 when every check passed, else prints what differed and exits 1.

Only the JSON serializer is accepted for results, as hare-worker only speaks JSON.
"""

import datetime
import os
import signal
import sys
import time
import traceback

from celery import Celery, chain
from celery.exceptions import NotRegistered, TaskRevokedError

BROKER = os.environ.get("HARE_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("HARE_CELERY_QUEUE", "celery")
# Upper bound for one result, and for the whole script.
WAIT_SECONDS = 15
WATCHDOG_SECONDS = 90

app = Celery("celery_interop", broker=BROKER, backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)


# --- tasks a Rust client calls ----------------------------------------------


@app.task(name="py.add")
def add(x, y):
    return x + y


@app.task(name="py.divide")
def divide(x, y):
    return x / y


@app.task(name="py.touch")
def touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return path


# --- checks of a Rust worker ------------------------------------------------


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def step(name):
    print(f"ok: {name}", flush=True)


def send(name, args=None, kwargs=None, **options):
    return app.send_task(name, args=args, kwargs=kwargs, queue=QUEUE, **options)


def expect_raise(result, exc_type, text, **get_options):
    """`result.get()` raises `exc_type` whose message contains `text`."""
    try:
        value = result.get(timeout=WAIT_SECONDS, **get_options)
    except exc_type as err:
        check(text in str(err), f"{exc_type.__name__} without {text!r}: {err!r}")
        check(result.state in ("FAILURE", "REVOKED"), f"state {result.state}")
        return err
    except Exception as err:
        raise Failure(f"expected {exc_type.__name__}({text!r}), got {err!r}")
    raise Failure(f"expected {exc_type.__name__}({text!r}), got the value {value!r}")


def run_checks():
    r = send("rust.add", args=[2, 3])
    check(r.get(timeout=WAIT_SECONDS) == 5, "add(2, 3)")
    check(r.state == "SUCCESS", f"state {r.state}")
    step("send_task with args: AsyncResult.get() returns the Rust handler's value")

    r = send("rust.add", args=[2], kwargs={"y": 40})
    check(r.get(timeout=WAIT_SECONDS) == 42, "add(2, y=40)")
    r = send("rust.add", kwargs={"x": 1, "y": 2})
    check(r.get(timeout=WAIT_SECONDS) == 3, "add(x=1, y=2)")
    step("keyword arguments bind to the struct's fields")

    r = send("rust.describe", args=["celery", [1, 2, 3]])
    check(
        r.get(timeout=WAIT_SECONDS) == {"name": "celery", "total": 6, "task_id": r.id},
        f"describe: {r.result!r}",
    )
    step("structured results; the handler's job id is Celery's task id")

    expect_raise(send("rust.fail", args=["the input is corrupt"]), RuntimeError, "the input is corrupt")
    step("a fatal error in the handler raises RuntimeError in Python")

    r = send("rust.flaky")
    check(r.get(timeout=WAIT_SECONDS) == 2, f"flaky: {r.result!r}")
    step("a retryable error is retried by the worker; the caller gets the retry's value")

    expect_raise(send("rust.add", args=[1, 2, 3]), TypeError, "positional")
    step("arguments that do not bind raise TypeError")

    expect_raise(send("rust.nope"), NotRegistered, "rust.nope")
    step("a task the worker does not know raises NotRegistered")

    sigs = chain(
        app.signature("rust.add", args=(1, 2), queue=QUEUE),
        app.signature("rust.add", args=(3,), queue=QUEUE),
    )
    r = sigs.apply_async()
    # The refused first task's failure, and the one it passes down the chain
    # (as Celery's own workers do), so that waiting on the chain never hangs.
    expect_raise(r.parent, NotImplementedError, "chain")
    expect_raise(r, NotImplementedError, "canvas", follow_parents=False)
    step("a chain is refused: both of its results raise NotImplementedError")

    expect_raise(send("rust.add", args=[2, 3], serializer="pickle"), NotImplementedError, "pickle")
    step("a pickled task is refused with NotImplementedError")

    began = time.monotonic()
    r = send("rust.add", args=[20, 22], countdown=1)
    check(r.get(timeout=WAIT_SECONDS) == 42, "countdown")
    waited = time.monotonic() - began
    check(waited >= 0.9, f"countdown=1 ran after {waited:.2f}s")
    step(f"countdown=1 runs after {waited:.2f}s")

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    expect_raise(send("rust.add", args=[1, 1], expires=past), TaskRevokedError, "expired")
    step("an expired task is revoked, not run")

    states = []
    r = send("rust.progress", args=[7])
    value = r.get(timeout=WAIT_SECONDS, on_message=lambda meta: states.append(meta["status"]))
    check(value == 49, f"progress: {value!r}")
    check("PROGRESS" in states and states[-1] == "SUCCESS", f"states {states}")
    step("progress arrives as a PROGRESS state before SUCCESS")


def main():
    def on_alarm(signum, frame):
        raise Failure(f"watchdog: the checks took over {WATCHDOG_SECONDS}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(WATCHDOG_SECONDS)
    import celery

    print(f"celery {celery.__version__} against {BROKER}, queue {QUEUE}", flush=True)
    try:
        run_checks()
    except Failure as err:
        print(f"FAIL: {err}", file=sys.stderr)
        traceback.print_exc()
        return 1
    except Exception as err:
        print(f"FAIL: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        return 1
    print("celery checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
