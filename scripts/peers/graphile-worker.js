// Burn-down benchmark of graphile-worker in its batched mode, for
// scripts/bench.sh: enqueue N no-op jobs (addJobs, 1,000 per call), then
// drain them with a local queue and batched completions, and print one JSON
// object like `errand bench --json`.
//
//   node graphile-worker.js postgres://… [jobs] [concurrency] [localQueueSize]
//
// Needs graphile-worker and pg installed next to it (scripts/bench.sh does).
const { run, makeWorkerUtils } = require("graphile-worker");

async function main() {
  const [connectionString, jobsArg, concArg, sizeArg] = process.argv.slice(2);
  const jobs = Number(jobsArg || 20000);
  const concurrency = Number(concArg || 8);
  const size = Number(sizeArg || 500);
  const utils = await makeWorkerUtils({ connectionString });
  await utils.migrate();
  await utils.withPgClient((c) => c.query("DELETE FROM graphile_worker._private_jobs"));
  const spec = Array.from({ length: 1000 }, () => ({ identifier: "noop", payload: {} }));
  let t = process.hrtime.bigint();
  for (let left = jobs; left > 0; left -= 1000) {
    await utils.addJobs(spec.slice(0, Math.min(1000, left)));
  }
  const enqueueS = Number(process.hrtime.bigint() - t) / 1e9;

  let ran = 0;
  t = process.hrtime.bigint();
  const runner = await run({
    connectionString,
    concurrency,
    noHandleSignals: true,
    pollInterval: 1000,
    logger: new (require("graphile-worker").Logger)(() => () => {}),
    taskList: { noop: async () => { ran += 1; } },
    preset: {
      worker: {
        localQueue: { size },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      },
    },
  });
  // Done when every handler ran and every completion is recorded.
  for (;;) {
    if (ran >= jobs) {
      const { rows } = await utils.withPgClient((c) =>
        c.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs"),
      );
      if (rows[0].n === 0) break;
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  const drainS = Number(process.hrtime.bigint() - t) / 1e9;
  await runner.stop();
  await utils.release();
  console.log(JSON.stringify({
    peer: "graphile-worker",
    version: require("graphile-worker/package.json").version,
    jobs, concurrency, local_queue_size: size,
    enqueue_jobs_per_s: jobs / enqueueS,
    drain_jobs_per_s: jobs / drainS,
  }));
}

main().catch((e) => { console.error(e); process.exit(1); });
