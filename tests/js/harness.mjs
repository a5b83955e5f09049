// A real `sluice` broker for the JavaScript tests: a free 127.0.0.1 port, a temporary data dir,
// stopped with SIGTERM (then SIGKILL) by `stop()`. The binary is $SLUICE_BIN, else
// $CARGO_TARGET_DIR/debug/sluice, else target/debug/sluice under the repository root.
// Every wait has a deadline and polls a condition; nothing sleeps as synchronisation.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const START_WAIT_MS = 30_000;
const STOP_WAIT_MS = 20_000;
// Segment files are preallocated in extents of min(64 MiB, segment size).
const SEGMENT_BYTES = 8 << 20;

export function sluiceBin() {
  if (process.env.SLUICE_BIN) return process.env.SLUICE_BIN;
  let target = process.env.CARGO_TARGET_DIR || path.join(REPO_ROOT, 'target');
  if (!path.isAbsolute(target)) target = path.join(REPO_ROOT, target);
  return path.join(target, 'debug', 'sluice');
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// True once the broker answers ApiVersions v0 with our correlation id.
function answersApiVersions(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    const done = (ok) => { sock.destroy(); resolve(ok); };
    sock.setTimeout(2000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('connect', () => {
      const req = Buffer.alloc(14);
      req.writeInt32BE(10, 0); req.writeInt16BE(18, 4); req.writeInt16BE(0, 6);
      req.writeInt32BE(0x5eed, 8); req.writeInt16BE(-1, 12);
      sock.write(req);
    });
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length >= 8) done(buf.readInt32BE(4) === 0x5eed);
    });
  });
}

// Polls `cond` (sync or async) until it is truthy or `ms` pass; throws naming `what` on timeout.
export async function waitFor(what, cond, ms = 30_000, everyMs = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export async function startBroker({ cores = 1, args = [] } = {}) {
  const bin = sluiceBin();
  if (!existsSync(bin)) throw new Error(`sluice binary not found at ${bin}: build it first (cargo build)`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'sluice-js-'));
  const port = await freePort();
  const bootstrap = `127.0.0.1:${port}`;
  const logPath = path.join(dir, 'stderr.log');
  const log = openSync(logPath, 'w');
  const proc = spawn(bin, ['start', '--data-dir', path.join(dir, 'data'), '--listen', bootstrap,
    '--cores', String(cores), '--segment-bytes', String(SEGMENT_BYTES), ...args],
  { stdio: ['ignore', log, log] });
  let exited = null;
  proc.on('exit', (code, signal) => { exited = { code, signal }; });
  const stderr = () => readFileSync(logPath, 'utf8');
  await waitFor('the broker to answer ApiVersions', async () => {
    if (exited) throw new Error(`sluice exited during start-up: ${stderr()}`);
    return answersApiVersions(port);
  }, START_WAIT_MS);
  return {
    bootstrap,
    port,
    stderr,
    exited: () => exited,
    async stop() {
      if (!exited) {
        proc.kill('SIGTERM');
        try {
          await waitFor('the broker to exit after SIGTERM', () => exited, STOP_WAIT_MS);
        } catch (e) {
          proc.kill('SIGKILL');
          await waitFor('the broker to exit after SIGKILL', () => exited, STOP_WAIT_MS);
          throw e;
        }
      }
      rmSync(dir, { recursive: true, force: true });
      return exited;
    },
  };
}

let n = 0;
export function topicName(prefix) {
  n += 1;
  return `${prefix}-${process.pid}-${n}-${Math.random().toString(36).slice(2, 8)}`;
}
