#!/usr/bin/env python3
"""An external errand worker in Python, standard library only.

errand hands the queues named by --external-queues to workers like this one,
over HTTP. Start a server that keeps the queue `external` for them, then
this worker, then enqueue a job of one of the kinds below:

    errand serve --external-queues=external
    python3 examples/worker.py
    curl -X POST localhost:8080/api/jobs -H 'Content-Type: application/json' \
         -d '{"queue": "external", "kind": "echo", "args": {"hello": "world"}}'

Settings, from the environment:
    ERRAND_URL        the server (default http://127.0.0.1:8080)
    ERRAND_TOKEN      its API token, if it has one
    ERRAND_QUEUES     queues to work, comma-separated (default "external")
    ERRAND_WORKER     this worker's name (default host-pid)
    ERRAND_HEARTBEAT  seconds between heartbeats (default: what the server
                      says with each job, its --heartbeat-interval)

Each job is fetched with a lease (long-polling while none is ready), run by
the handler of its kind while a thread heartbeats it, and reported with
`complete` or `fail`. A 409 means the lease was lost (the job was rescued
from a worker thought dead): the result is dropped. To add a kind, write
`def handle(args, job)` returning the detail to keep (any JSON) and add it to
HANDLERS; raise Permanent for an error not worth retrying. SIGTERM or SIGINT
stops the worker after its current job. One line per job goes to stdout.
"""

import json, os, signal, socket, sys, threading, time, urllib.error, urllib.request

URL = os.environ.get("ERRAND_URL", "http://127.0.0.1:8080").rstrip("/")
TOKEN = os.environ.get("ERRAND_TOKEN")
QUEUES = [q.strip() for q in os.environ.get("ERRAND_QUEUES", "external").split(",") if q.strip()]
WORKER = os.environ.get("ERRAND_WORKER") or f"{socket.gethostname()}-{os.getpid()}"
HEARTBEAT = os.environ.get("ERRAND_HEARTBEAT")


class Permanent(Exception):
    """An error that retrying cannot fix: the job goes to dead at once."""


def echo(args, job):
    return {"echo": args}


def sleep(args, job):
    deadline = time.monotonic() + float(args.get("seconds", 1))
    while time.monotonic() < deadline and not job["cancelled"].is_set():
        time.sleep(0.05)
    return {"slept": args.get("seconds", 1), "cancelled": job["cancelled"].is_set()}


def fail(args, job):
    raise Permanent(args.get("error", "asked to fail"))


HANDLERS = {"echo": echo, "sleep": sleep, "fail": fail}


def call(path, body, timeout=90):
    """POSTs JSON; returns (status, parsed answer)."""
    headers = {"Content-Type": "application/json"}
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    request = urllib.request.Request(URL + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def heartbeat(job, stop):
    every = float(HEARTBEAT) if HEARTBEAT else job["heartbeat_ms"] / 1000
    while not stop.wait(every):
        try:
            status, answer = call(f"/api/jobs/{job['id']}/heartbeat", {"lease_id": job["lease_id"]})
        except OSError:
            continue  # the server is briefly unreachable: try again next beat
        if status == 409 or answer.get("cancel_requested"):
            job["cancelled"].set()  # lost or cancelled: the handler may stop early


def run(job):
    lease, stop = job["lease_id"], threading.Event()
    job["cancelled"] = threading.Event()
    beat = threading.Thread(target=heartbeat, args=(job, stop), daemon=True)
    beat.start()
    try:
        handler = HANDLERS.get(job["kind"])
        if handler is None:
            raise Permanent(f"this worker has no handler for kind {job['kind']!r}")
        path, body = "complete", {"lease_id": lease, "detail": handler(job["args"], job)}
    except Exception as e:  # report every failure; the job decides to retry
        path, body = "fail", {"lease_id": lease, "error": f"{type(e).__name__}: {e}",
                              "retry": not isinstance(e, Permanent)}
    finally:
        stop.set()
        beat.join()
    status, answer = call(f"/api/jobs/{job['id']}/{path}", body)
    outcome = answer.get("state") if status == 200 else answer.get("error", status)
    print(f"job {job['id']} {job['kind']} attempt {job['attempt']}: {path} -> {outcome}", flush=True)


def main():
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"worker {WORKER} fetching from {','.join(QUEUES)} at {URL}", flush=True)
    while not stopping.is_set():
        try:
            status, answer = call("/api/workers/fetch",
                                  {"queues": QUEUES, "worker": WORKER, "max": 1, "wait_ms": 5000})
        except OSError as e:
            print(f"fetch failed ({e}); retrying in 1 s", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        if status != 200:
            sys.exit(f"fetch refused ({status}): {answer.get('message', answer)}")
        for job in answer["jobs"]:
            run(job)  # a signal lets the current job finish: checked before the next fetch
    print(f"worker {WORKER} stopped", flush=True)


if __name__ == "__main__":
    main()
