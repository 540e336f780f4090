#!/usr/bin/env node
// An external errand worker in Node.js (18 or later), standard library only.
//
// errand hands the queues named by --external-queues to workers like this
// one, over HTTP. Start a server that keeps the queue `external` for them,
// then this worker, then enqueue a job of one of the kinds below:
//
//     errand serve --external-queues=external
//     node examples/worker.js
//     curl -X POST localhost:8080/api/jobs -H 'Content-Type: application/json' \
//          -d '{"queue": "external", "kind": "echo", "args": {"hello": "world"}}'
//
// Settings, from the environment:
//     ERRAND_URL        the server (default http://127.0.0.1:8080)
//     ERRAND_TOKEN      its API token, if it has one
//     ERRAND_QUEUES     queues to work, comma-separated (default "external")
//     ERRAND_WORKER     this worker's name (default host-pid)
//     ERRAND_HEARTBEAT  seconds between heartbeats (default: what the server
//                       says with each job, its --heartbeat-interval)
//
// Each job is fetched with a lease (long-polling while none is ready), run by
// the handler of its kind while a timer heartbeats it, and reported with
// `complete` or `fail`. A 409 means the lease was lost (the job was rescued
// from a worker thought dead): the result is dropped. To add a kind, write
// `async function (args, job)` returning the detail to keep (any JSON) and add
// it to HANDLERS; throw a Permanent for an error not worth retrying. SIGTERM
// or SIGINT stops the worker after its current job. One line per job goes to
// stdout.
'use strict';
const os = require('node:os');

const URL = (process.env.ERRAND_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const TOKEN = process.env.ERRAND_TOKEN;
const QUEUES = (process.env.ERRAND_QUEUES || 'external').split(',').map((q) => q.trim()).filter(Boolean);
const WORKER = process.env.ERRAND_WORKER || `${os.hostname()}-${process.pid}`;
const HEARTBEAT = process.env.ERRAND_HEARTBEAT;

/** An error that retrying cannot fix: the job goes to dead at once. */
class Permanent extends Error {}

const HANDLERS = {
  echo: async (args) => ({ echo: args }),
  sleep: async (args, job) => {
    const seconds = args.seconds ?? 1;
    const until = Date.now() + seconds * 1000;
    while (Date.now() < until && !job.cancelled) await new Promise((r) => setTimeout(r, 50));
    return { slept: seconds, cancelled: job.cancelled };
  },
  fail: async (args) => { throw new Permanent(args.error || 'asked to fail'); },
};

/** POSTs JSON; resolves to [status, parsed answer]. */
async function call(path, body) {
  const headers = { 'Content-Type': 'application/json' };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const response = await fetch(URL + path, { method: 'POST', headers, body: JSON.stringify(body) });
  return [response.status, await response.json().catch(() => ({}))];
}

async function run(job) {
  job.cancelled = false;
  const beat = setInterval(async () => {
    try {
      const [status, answer] = await call(`/api/jobs/${job.id}/heartbeat`, { lease_id: job.lease_id });
      if (status === 409 || answer.cancel_requested) job.cancelled = true; // the handler may stop early
    } catch { /* the server is briefly unreachable: try again next beat */ }
  }, HEARTBEAT ? Number(HEARTBEAT) * 1000 : job.heartbeat_ms);
  let path, body;
  try {
    const handler = HANDLERS[job.kind];
    if (!handler) throw new Permanent(`this worker has no handler for kind '${job.kind}'`);
    path = 'complete';
    body = { lease_id: job.lease_id, detail: (await handler(job.args, job)) ?? null };
  } catch (e) { // report every failure; the job decides to retry
    path = 'fail';
    body = { lease_id: job.lease_id, error: `${e.name}: ${e.message}`, retry: !(e instanceof Permanent) };
  } finally {
    clearInterval(beat);
  }
  const [status, answer] = await call(`/api/jobs/${job.id}/${path}`, body);
  const outcome = status === 200 ? answer.state : (answer.error || status);
  console.log(`job ${job.id} ${job.kind} attempt ${job.attempt}: ${path} -> ${outcome}`);
}

async function main() {
  let stopping = false;
  for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { stopping = true; });
  console.log(`worker ${WORKER} fetching from ${QUEUES.join(',')} at ${URL}`);
  while (!stopping) {
    let status, answer;
    try {
      [status, answer] = await call('/api/workers/fetch', { queues: QUEUES, worker: WORKER, max: 1, wait_ms: 5000 });
    } catch (e) {
      console.error(`fetch failed (${e.cause?.code || e.message}); retrying in 1 s`);
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    if (status !== 200) {
      console.error(`fetch refused (${status}): ${answer.message || JSON.stringify(answer)}`);
      process.exit(1);
    }
    for (const job of answer.jobs) await run(job); // a signal lets the current job finish
  }
  console.log(`worker ${WORKER} stopped`);
}

main();
