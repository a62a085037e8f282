// Steady issuance load through a failover: run it, then kill a member (see README.md); it reports the gap.
//
//   k6 run --out json=/tmp/failover.json -e BASE_URL=https://10.213.1.100 -e CSR_FILE=/tmp/csrs.json k6/failover.js
//   hapki k6 gap /tmp/failover.json       # second by second: sent, issued, failed attempts, worst latency
//
// Every request is a client that retries with the same idempotency key (safe: CLM answers a repeat with the first
// result) until it is issued or GIVE_UP seconds have passed. What a failover costs shows as failed attempts
// (`attempt_errors`), the worst end-to-end latency (`issue_ms` max, retries included) and requests never issued
// (`issue_errors`, which should stay 0).
// Env: as issue.js (BASE_URL, CSR_FILE, TARGET, SUMMARY_FILE), RATE (default 50/s), SECONDS (default 60),
// ATTEMPT_TIMEOUT (s, default 2), GIVE_UP (s, default 20).
import { sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { issue, idempotencyKey, logError, summary, TREND_STATS } from './lib.js';

const RATE = Number(__ENV.RATE || 50);
const SECONDS = Number(__ENV.SECONDS || 60);
const ATTEMPT_TIMEOUT = Number(__ENV.ATTEMPT_TIMEOUT || 2);
const GIVE_UP = Number(__ENV.GIVE_UP || 20);

const issued = new Counter('issued');
const issueErrors = new Counter('issue_errors');
const attemptErrors = new Counter('attempt_errors');
const retried = new Counter('retried_requests');
const issueMs = new Trend('issue_ms', true);

export const options = {
  scenarios: {
    measure: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: `${SECONDS}s`,
      // Enough VUs for the requests a failover holds up to an attempt timeout: a VU that k6 must start mid-run on a
      // busy host comes late, and k6 drops the iterations it would have run (in CI once: 158 of 160 started).
      preAllocatedVUs: Math.max(10, Math.ceil(RATE * (ATTEMPT_TIMEOUT + 1))),
      maxVUs: Math.ceil(RATE * (GIVE_UP + ATTEMPT_TIMEOUT)) + 10,
      gracefulStop: `${GIVE_UP + ATTEMPT_TIMEOUT + 1}s`,
    },
  },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const key = idempotencyKey();
  const began = Date.now();
  let attempts = 0;
  for (;;) {
    attempts += 1;
    const r = issue(key, `${ATTEMPT_TIMEOUT}s`);
    if (r.ok) {
      issued.add(1);
      issueMs.add(Date.now() - began);
      if (attempts > 1) retried.add(1);
      return;
    }
    if (!r.pending) {
      attemptErrors.add(1);
      logError(r.error);
    }
    if (Date.now() - began > GIVE_UP * 1000) {
      issueErrors.add(1);
      return;
    }
    sleep(0.1);
  }
}

export function handleSummary(data) {
  const m = (name) => (data.metrics[name] ? data.metrics[name].values.count : 0);
  return summary(data, 'failover.js', SECONDS, {
    attempt_errors: m('attempt_errors'), retried_requests: m('retried_requests'),
    worst_latency_ms: data.metrics.issue_ms ? data.metrics.issue_ms.values.max : null,
  });
}
