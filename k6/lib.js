// Shared by issue.js and failover.js: the CSR pool, the two request shapes (hapki, CFSSL) and the summary file.
import http from 'k6/http';
import { SharedArray } from 'k6/data';
import exec from 'k6/execution';

export const TARGET = __ENV.TARGET || 'hapki'; // hapki: POST /v1/issue of CLM; cfssl: POST /api/v1/cfssl/sign
export const BASE_URL = (__ENV.BASE_URL || 'https://10.213.1.100').replace(/\/$/, '');
export const PROFILE = __ENV.PROFILE || 'tls-server';
export const REQUESTER = __ENV.REQUESTER || 'k6';
// Idempotency keys are `<run>-<vu>-<iteration>`: unique per run, and a retry of one iteration reuses its key.
const RUN = __ENV.RUN_ID || `${Date.now().toString(36)}`;

if (TARGET !== 'hapki' && TARGET !== 'cfssl') {
  throw new Error(`TARGET must be hapki or cfssl, not ${TARGET}`);
}

// A JSON array of PEM CSRs (P-256, one DNS name each) made by `hapki k6 csrs`: k6 cannot make EC keys itself.
// SharedArray: one copy for all VUs. open() resolves relative to the script's directory.
export const CSRS = new SharedArray('csrs', () => {
  const pool = JSON.parse(open(__ENV.CSR_FILE || './csrs.json'));
  if (!Array.isArray(pool) || pool.length === 0) throw new Error('CSR_FILE must hold a non-empty JSON array');
  return pool;
});

export function idempotencyKey() {
  return `${RUN}-${exec.vu.idInTest}-${exec.vu.iterationInScenario}`;
}

function csr() {
  return CSRS[(exec.vu.idInTest * 7919 + exec.vu.iterationInScenario) % CSRS.length];
}

// One issuance request; returns {ok, pending, status, error}. `key` is the idempotency key (hapki only).
export function issue(key, timeout) {
  const params = { headers: { 'Content-Type': 'application/json' }, timeout: timeout || '15s', tags: { target: TARGET } };
  let res;
  if (TARGET === 'hapki') {
    const body = { csr_pem: csr(), profile: PROFILE, requester: REQUESTER, idempotency_key: key };
    res = http.post(`${BASE_URL}/v1/issue`, JSON.stringify(body), params);
  } else {
    res = http.post(`${BASE_URL}/api/v1/cfssl/sign`, JSON.stringify({ certificate_request: csr() }), params);
  }
  let parsed = null;
  try {
    parsed = res.body ? JSON.parse(res.body) : null;
  } catch (e) {
    parsed = null;
  }
  if (TARGET === 'hapki') {
    if (res.status === 200 && parsed && parsed.certificate_pem) return { ok: true, status: res.status };
    if (res.status === 202) return { ok: false, pending: true, status: 202, error: 'pending' };
  } else if (res.status === 200 && parsed && parsed.success && parsed.result && parsed.result.certificate) {
    return { ok: true, status: res.status };
  }
  const detail = res.error || (parsed && (parsed.error || parsed.errors)) || res.body;
  return { ok: false, status: res.status, error: `HTTP ${res.status}: ${JSON.stringify(detail).slice(0, 200)}` };
}

const logged = { n: 0 };
export function logError(error) {
  if (logged.n < 3) { // per VU; enough to see what went wrong without flooding the output
    logged.n += 1;
    console.warn(`request failed: ${error}`);
  }
}

function trend(data, name) {
  const m = data.metrics[name];
  if (!m) return {};
  return { p50: m.values['p(50)'], p95: m.values['p(95)'], p99: m.values['p(99)'], max: m.values.max, avg: m.values.avg };
}

function count(data, name) {
  const m = data.metrics[name];
  return m ? m.values.count : 0;
}

// The summary every script writes: to SUMMARY_FILE as JSON (for `hapki bench --compare`) and one table on stdout.
export function summary(data, script, seconds, extra) {
  const issued = count(data, 'issued');
  const out = {
    script, target: TARGET, base_url: BASE_URL, mode: __ENV.MODE || 'rate', seconds,
    issued, errors: count(data, 'issue_errors'), rate_per_s: issued / seconds,
    latency_ms: trend(data, 'issue_ms'), ...(extra || {}),
  };
  const lat = out.latency_ms;
  const f = (x) => (x === undefined ? '-' : x.toFixed(1));
  const text = [
    `k6 ${script} -> ${TARGET} ${BASE_URL} (${out.mode}, ${seconds} s measured)`,
    `  issued ${issued} (${out.rate_per_s.toFixed(1)}/s), errors ${out.errors}`,
    `  latency ms: p50 ${f(lat.p50)}  p95 ${f(lat.p95)}  p99 ${f(lat.p99)}  max ${f(lat.max)}`,
    ...Object.entries(extra || {}).map(([k, v]) => `  ${k}: ${typeof v === 'number' ? v.toFixed(1) : JSON.stringify(v)}`),
    '',
  ].join('\n');
  const files = { stdout: text };
  if (__ENV.SUMMARY_FILE) files[__ENV.SUMMARY_FILE] = JSON.stringify(out, null, 2);
  return files;
}

export const TREND_STATS = ['avg', 'min', 'med', 'max', 'p(50)', 'p(95)', 'p(99)'];
