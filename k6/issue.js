// Issuance load at a fixed arrival rate (MODE=rate) or at the maximum closed-loop rate (MODE=max).
//
//   k6 run -e BASE_URL=https://10.213.1.100 -e CSR_FILE=/tmp/csrs.json -e MODE=rate -e RATE=300 -e SECONDS=30 k6/issue.js
//
// Env: TARGET hapki|cfssl, BASE_URL, CSR_FILE, MODE rate|max, RATE (issuances/s, MODE=rate), VUS (MODE=max:
// concurrent clients; MODE=rate: pre-allocated VUs), SECONDS measured, WARMUP seconds before (not counted),
// SUMMARY_FILE (JSON summary). TLS: k6 trusts the system store and SSL_CERT_FILE (set it to the lab's CA bundle).
import { Counter, Trend } from 'k6/metrics';
import exec from 'k6/execution';
import { issue, idempotencyKey, logError, summary, TREND_STATS } from './lib.js';

const MODE = __ENV.MODE || 'rate';
const RATE = Number(__ENV.RATE || 100);
const VUS = Number(__ENV.VUS || 32);
const SECONDS = Number(__ENV.SECONDS || 30);
const WARMUP = Number(__ENV.WARMUP || 2);

const issued = new Counter('issued');
const issueErrors = new Counter('issue_errors');
const issueMs = new Trend('issue_ms', true);

function load(startTime, seconds) {
  if (MODE === 'rate') {
    return {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: `${seconds}s`, startTime,
      preAllocatedVUs: Math.max(VUS, Math.ceil(RATE / 10)), maxVUs: Math.max(4 * VUS, RATE),
    };
  }
  if (MODE === 'max') return { executor: 'constant-vus', vus: VUS, duration: `${seconds}s`, startTime };
  throw new Error(`MODE must be rate or max, not ${MODE}`);
}

export const options = {
  scenarios: {
    ...(WARMUP > 0 ? { warmup: load('0s', WARMUP) } : {}),
    measure: load(`${WARMUP}s`, SECONDS),
  },
  summaryTrendStats: TREND_STATS,
  discardResponseBodies: false,
};

export default function () {
  const began = Date.now();
  const r = issue(idempotencyKey());
  if (exec.scenario.name !== 'measure') return;
  if (r.ok) {
    issued.add(1);
    issueMs.add(Date.now() - began);
  } else {
    issueErrors.add(1);
    logError(r.error);
  }
}

export function handleSummary(data) {
  return summary(data, 'issue.js', SECONDS);
}
