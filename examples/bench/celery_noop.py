"""Celery's side of the worker benchmark: a no-op task run by a Celery worker
(threads pool, acks late, prefetch = concurrency), timed from the first task
to the last, on the same broker `worker_bench` uses.

    python3 examples/bench/celery_noop.py URL TASKS CONCURRENCY
"""
import os
import sys
import threading
import time

from celery import Celery

url, total, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app = Celery("bench", broker=url)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="bench.celery",
    broker_connection_retry_on_startup=True,
)
lock = threading.Lock()
state = {"done": 0, "first": None}


@app.task(name="bench.noop")
def noop(n):
    with lock:
        if state["first"] is None:
            state["first"] = time.monotonic()
        state["done"] += 1
        if state["done"] == total:
            took = time.monotonic() - state["first"]
            print(f"celery {concurrency} {total} {took:.2f} {total / took:.0f}", flush=True)
            os._exit(0)


if __name__ == "__main__":
    for i in range(total):
        noop.apply_async((i,))
    app.Worker(pool="threads", concurrency=concurrency, loglevel="WARNING", quiet=True).start()
