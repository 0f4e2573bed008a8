"""Purge (or delete) a big queue while another connection keeps doing round
trips: prints the time to purge-ok / delete-ok and the worst round trip the
other connection saw meanwhile (and for 3 s after).

    python3 examples/bench/purge_stall.py URL QUEUE [purge|delete]

Fill the queue first, e.g. with the perf example's --consumers 0 --keep-queue.
"""

import json
import sys
import threading
import time

import pika


def main():
    url, queue = sys.argv[1], sys.argv[2]
    how = sys.argv[3] if len(sys.argv) > 3 else "purge"
    stop = threading.Event()
    worst = [0.0]

    def probe():
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.queue_declare(queue="bench.probe", auto_delete=True)
        while not stop.is_set():
            started = time.monotonic()
            ch.queue_declare(queue="bench.probe", passive=True)
            worst[0] = max(worst[0], time.monotonic() - started)
            time.sleep(0.005)
        conn.close()

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(1.0)
    baseline = worst[0]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    count = ch.queue_declare(queue=queue, passive=True).method.message_count
    started = time.monotonic()
    if how == "delete":
        ch.queue_delete(queue=queue)
    else:
        ch.queue_purge(queue=queue)
    took = time.monotonic() - started
    time.sleep(3.0)
    stop.set()
    thread.join()
    conn.close()
    print(json.dumps({
        "operation": how,
        "messages": count,
        "reply_seconds": round(took, 4),
        "worst_round_trip_ms": round(worst[0] * 1000, 2),
        "baseline_round_trip_ms": round(baseline * 1000, 2),
    }))


if __name__ == "__main__":
    main()
