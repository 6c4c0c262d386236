'use strict';
// Ember runtime agent for Node.js (20+): the process inside every Node function pod.
// Node standard library only.  Same HTTP contract as the Python agent: runtime-images/CONTRACT.md.
//
// The main thread serves HTTP.  User code runs in worker_threads: a worker can be terminated
// (timeout; V8 stops even a busy `while (true) {}`), has a heap limit (resourceLimits, so running
// out of memory ends the worker, not the agent), and `process.exit()` in user code ends only the
// worker.  A generic worker is started right after the agent listens, so specialize only pays for
// loading the user's module.  A freeze parks every worker thread (see freezeThaw): SIGSTOP, which
// the Python agent sends its worker processes, would stop this whole process, HTTP server included.

const { isMainThread, Worker, parentPort, workerData } = require('node:worker_threads');

// The word a worker parks on while frozen (W.parkWord), set by the main thread.
const RUNNING = 0;
const PARKED = 1;

if (isMainThread) {
  main();
} else {
  workerMain();
}

// =================================================================================================
// Main thread

function main() {
  const http = require('node:http');
  const fs = require('node:fs');
  const path = require('node:path');
  const os = require('node:os');
  const crypto = require('node:crypto');

  const RUNTIME = 'nodejs' + process.versions.node.split('.')[0];
  const LOG_TAIL_BYTES = 4096;
  const MAX_SPECIALIZE_BYTES = 64 * 1024 * 1024;
  const MAX_OTHER_BYTES = 1024 * 1024;
  const HOOK_TIMEOUT_MS = 10000;
  const DEFAULT_MEMORY_MIB = 128;

  function envInt(name, dflt, min, max = Number.MAX_SAFE_INTEGER) {
    const raw = process.env[name];
    if (raw === undefined || raw === '') return dflt;
    if (!/^\d+$/.test(raw) || Number(raw) < min || Number(raw) > max) {
      process.stderr.write(`ember-agent: ${name}=${JSON.stringify(raw)} must be an integer between ${min} and ${max}\n`);
      process.exit(2);
    }
    return Number(raw);
  }

  const S = {
    state: 'generic',
    frozen: false,
    stopped: [], // pids a freeze stopped (what the code started); its thaw continues them
    codeHash: null,
    handler: null,
    spec: null,
    codePath: null,
    idle: [],
    workers: new Set(),
    inFlight: 0,
    concurrency: envInt('EMBER_AGENT_CONCURRENCY', 1, 1),
    maxPayload: envInt('EMBER_AGENT_MAX_PAYLOAD_BYTES', 6 * 1024 * 1024, 0),
    codeBase: process.env.EMBER_AGENT_CODE_DIR || '',
    maxCodeBytes: envInt('EMBER_AGENT_MAX_CODE_BYTES', 512 * 1024 * 1024, 1),
    shutdownGraceSeconds: envInt('EMBER_AGENT_SHUTDOWN_GRACE_SECONDS', 10, 0),
    attempt: 0,
    spare: null,
    pending: null, // { claimed, p }: a replacement worker being loaded
    busy: false, // a specialize/freeze/thaw is running
    shuttingDown: false,
    token: null, // Buffer: the bearer token bound by the first specialize (see Authentication)
  };

  const logAgent = (msg) => process.stderr.write(`ember-agent: ${msg}\n`);

  // EMBER_AGENT_PIDS_LIMIT (CONTRACT.md): RLIMIT_NPROC, soft and hard, set before any worker starts. It
  // bounds the tasks (processes and threads) of the agent's uid, the agent's own included: a pod's
  // pids limit where the uid's tasks are counted per sandbox (gVisor's kernel, a Kata VM). Node has
  // no setrlimit, so util-linux's prlimit sets it on this process (prlimit(2) on a pid of one's uid).
  function limitTasks(limit) {
    let limits = '';
    try { limits = fs.readFileSync('/proc/self/limits', 'utf8'); } catch { /* older gVisor has none */ }
    const current = /^Max processes\s+\S+\s+(\S+)/m.exec(limits);
    if (current && current[1] !== 'unlimited') limit = Math.min(limit, Number(current[1]));  // a tighter one stays
    const prlimit = ['/usr/bin/prlimit', '/bin/prlimit'].find((p) => fs.existsSync(p));
    if (!prlimit) {
      logAgent('EMBER_AGENT_PIDS_LIMIT is set but prlimit (util-linux) is not in the image');
      process.exit(2);
    }
    const set = require('node:child_process').spawnSync(
      prlimit, ['--pid', String(process.pid), `--nproc=${limit}:${limit}`], { stdio: ['ignore', 'ignore', 'pipe'] });
    if (set.status !== 0) {
      logAgent(`EMBER_AGENT_PIDS_LIMIT=${limit}: prlimit failed: ${String(set.stderr || set.error).trim()}`);
      process.exit(2);
    }
  }
  const pidsLimit = envInt('EMBER_AGENT_PIDS_LIMIT', 0, 8);
  if (pidsLimit) limitTasks(pidsLimit);

  function prefixLines(rid, text) {
    const lines = text.split('\n');
    if (lines.length && lines[lines.length - 1] === '') lines.pop();
    return lines.map((l) => `${rid}\t${l}\n`).join('');
  }

  class HTTPError extends Error {
    constructor(status, errorType, message) {
      super(message);
      this.status = status;
      this.errorType = errorType;
    }
  }
  const badRequest = (msg) => new HTTPError(400, 'InvalidRequest', msg);

  // ---------------------------------------------------------------------------------------------
  // Workers

  class W {
    constructor() {
      // The worker parks on this word while frozen (PARKED), and runs again when it is set back.
      this.parkWord = new Int32Array(new SharedArrayBuffer(4));
      this.parked = false;
      this.worker = new Worker(__filename, {
        workerData: { role: 'worker', parkWord: this.parkWord },
        stdout: false,
        stderr: false,
        resourceLimits: { maxOldGenerationSizeMb: S.spec ? S.spec.memoryMiB : DEFAULT_MEMORY_MIB },
      });
      this.memoryMiB = S.spec ? S.spec.memoryMiB : DEFAULT_MEMORY_MIB;
      this.loaded = false;
      this.dead = false;
      this.current = null; // { onMessage, onDeath }
      this.waiters = [];
      this.deathInfo = null;
      this.worker.on('message', (m) => this.onMessage(m));
      this.worker.on('error', (err) => { this.deathInfo = { err }; });
      this.worker.on('exit', (code) => this.onExit(code));
      S.workers.add(this);
    }

    onMessage(m) {
      if (this.current) this.current.onMessage(m);
      else if (m.type === 'log') process.stdout.write(prefixLines('-', m.data));
    }

    onExit(code) {
      this.dead = true;
      S.workers.delete(this);
      const i = S.idle.indexOf(this);
      if (i >= 0) S.idle.splice(i, 1);
      if (S.spare === this) S.spare = null;
      const info = this.deathInfo || {};
      info.code = code;
      if (this.current) this.current.onDeath(info);
    }

    // Run one exchange with the worker: send `msg`, collect until `done(m)` says it is finished.
    exchange(msg, onMessage, timeoutMs) {
      return new Promise((resolve) => {
        let timer = null;
        const finish = (r) => {
          if (timer) clearTimeout(timer);
          this.current = null;
          resolve(r);
        };
        this.current = {
          onMessage: (m) => {
            const r = onMessage(m);
            if (r !== undefined) finish(r);
          },
          onDeath: (info) => finish({ death: info }),
        };
        if (timeoutMs !== undefined) timer = setTimeout(() => finish({ timeout: true }), timeoutMs);
        this.worker.postMessage(msg);
      });
    }

    kill() {
      if (!this.dead) {
        this.dead = true;
        this.current = null;
        S.workers.delete(this);
        const i = S.idle.indexOf(this);
        if (i >= 0) S.idle.splice(i, 1);
        this.worker.terminate().catch(() => {});
      }
    }

    // Run the exported beforeFreeze / afterThaw hook; -> null, or the {errorType, errorMessage} of
    // its failure.  A worker that dies in it, or does not finish it in time, is killed.
    async hook(kind) {
      const label = kind === 'beforeFreeze' ? 'freeze' : 'thaw';
      const r = await this.exchange({ type: 'hook', kind }, (m) => {
        if (m.type === 'log') { process.stdout.write(prefixLines(label, m.data)); return undefined; }
        if (m.type === 'hookResult') return { hook: m };
        return undefined;
      }, HOOK_TIMEOUT_MS);
      if (r.hook) return r.hook.error;
      this.kill();
      if (r.death) return deathError(r.death, `in the ${kind} hook`);
      return { errorType: 'Runtime.HookTimeout', errorMessage: `${label} hooks did not finish in ${HOOK_TIMEOUT_MS / 1000}s` };
    }

    // Freeze steps 2 and 3: the worker ends its TCP connections, answers, then blocks its thread in
    // Atomics.wait on parkWord until unpark().  -> how many connections it ended.  A worker that
    // does not park in time is killed: then none of its code runs either.
    async park() {
      Atomics.store(this.parkWord, 0, PARKED);
      const r = await this.exchange({ type: 'park' }, (m) => {
        if (m.type === 'log') { process.stdout.write(prefixLines('freeze', m.data)); return undefined; }
        if (m.type === 'parked') return m;
        return undefined;
      }, HOOK_TIMEOUT_MS);
      if (r.type === 'parked') {
        this.parked = true;
        return r.connectionsClosed;
      }
      logAgent(`a worker did not park for the freeze (${r.timeout ? 'timed out' : 'it exited'}); killed`);
      this.kill();
      return 0;
    }

    unpark() {
      this.parked = false;
      Atomics.store(this.parkWord, 0, RUNNING);
      Atomics.notify(this.parkWord, 0);
    }

    load(spec, codePath, timeoutMs = spec.initTimeoutSeconds * 1000) {
      return this.exchange({ type: 'load', spec, codePath }, (m) => {
        if (m.type === 'loaded') return { ok: true };
        if (m.type === 'loadError') return { error: m.error };
        if (m.type === 'log') process.stdout.write(prefixLines('init', m.data));
        return undefined;
      }, Math.max(1, timeoutMs));
    }
  }

  function spawnSpare() {
    if (!S.spare && !S.shuttingDown && S.state === 'generic') S.spare = new W();
  }

  async function newLoadedWorker() {
    const w = new W();
    const r = await w.load(S.spec, S.codePath);
    if (!r.ok) {
      w.kill();
      throw new HTTPError(502, 'Runtime.WorkerUnavailable',
        `could not start a worker: ${r.error ? r.error.errorMessage : r.timeout ? 'load timed out' : 'worker exited'}`);
    }
    w.loaded = true;
    return w;
  }

  // After a worker was killed, start its replacement at once; an invocation that arrives while it
  // is loading claims it instead of starting yet another one.
  function prewarmReplacement() {
    if (S.state !== 'specialized' || S.shuttingDown || S.workers.size >= S.concurrency || S.idle.length || S.pending) return;
    const entry = { claimed: false, p: null };
    entry.p = newLoadedWorker().catch((e) => { logAgent(`pre-starting a worker failed: ${e.message}`); return null; });
    S.pending = entry;
    entry.p.then((w) => {
      if (S.pending === entry) S.pending = null;
      if (!w || entry.claimed) return;
      if (S.workers.size > S.concurrency || S.state !== 'specialized') w.kill();
      else S.idle.push(w);
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Specialize

  function parseHandler(h) {
    if (typeof h !== 'string' || !h) throw new Error("handler must be a non-empty string like 'index.handler'");
    const i = h.lastIndexOf('.');
    if (i <= 0 || i === h.length - 1) throw new Error(`handler '${h}' must be '<module>.<function>', e.g. 'index.handler'`);
    const mod = h.slice(0, i);
    const fn = h.slice(i + 1);
    if (mod.split('/').some((p) => p === '..' || p === '') || mod.startsWith('/')) {
      throw new Error(`handler '${h}': module path must be relative, without '..'`);
    }
    if (!/^[A-Za-z_$][\w$]*$/.test(fn)) throw new Error(`handler '${h}': '${fn}' is not a valid function name`);
    return [mod, fn];
  }

  function validateSpec(req) {
    if (!req || typeof req !== 'object' || Array.isArray(req)) throw badRequest('specialize body must be a JSON object');
    const fn = req.function || {};
    if (typeof fn !== 'object' || Array.isArray(fn)) throw badRequest("'function' must be an object with namespace, name, version");
    const func = {
      namespace: String(fn.namespace || 'default'),
      name: String(fn.name || 'function'),
      version: String(fn.version !== undefined && fn.version !== null ? fn.version : '$LATEST'),
    };
    const handler = req.handler;
    if (typeof handler !== 'string' || !handler) throw badRequest("'handler' must be a non-empty string like 'index.handler'");
    const code = req.code;
    if (!code || typeof code !== 'object' || Array.isArray(code)) throw badRequest("'code' must be an object with one of 'inline', 'path', 'url'");
    const kinds = ['inline', 'path', 'url'].filter((k) => k in code);
    if (kinds.length !== 1) throw badRequest(`'code' must have exactly one of 'inline', 'path', 'url' (got ${kinds.length ? kinds.join(', ') : 'none'})`);
    const kind = kinds[0];
    if (typeof code[kind] !== 'string' || !code[kind]) throw badRequest(`'code.${kind}' must be a non-empty string`);
    if (kind === 'inline') {
      const enc = code.encoding === undefined ? 'utf-8' : code.encoding;
      if (enc !== 'utf-8' && enc !== 'base64-zip') throw badRequest("'code.encoding' must be 'utf-8' (source text) or 'base64-zip'");
      const f = code.filename;
      if (f !== undefined && (typeof f !== 'string' || !f || f.startsWith('/') || f.split('/').includes('..'))) {
        throw badRequest("'code.filename' must be a relative path without '..'");
      }
    }
    if (kind === 'url' && !(typeof code.sha256 === 'string' && /^[0-9a-fA-F]{64}$/.test(code.sha256))) {
      throw badRequest("'code.sha256' must be 64 hex digits (the sha256 of the bytes at code.url)");
    }
    let codeHash = req.codeHash;
    if (codeHash === undefined || codeHash === null) {
      if (kind === 'url') codeHash = 'sha256:' + code.sha256.toLowerCase();
      else if (kind === 'inline') codeHash = 'sha256:' + crypto.createHash('sha256').update(code.inline).digest('hex');
      else throw badRequest("'codeHash' is required with 'code.path'");
    }
    if (typeof codeHash !== 'string' || !codeHash || codeHash.length > 200) throw badRequest("'codeHash' must be a non-empty string");
    const env = req.env || {};
    if (typeof env !== 'object' || Array.isArray(env) || !Object.values(env).every((v) => typeof v === 'string')) {
      throw badRequest("'env' must be an object of string values");
    }
    for (const k of Object.keys(env)) {
      if (!k || k.includes('=') || k.includes('\0') || env[k].includes('\0')) throw badRequest(`'env' has an invalid variable name ${JSON.stringify(k)}`);
    }
    const num = (key, dflt, integer) => {
      const v = req[key];
      if (v === undefined || v === null) return dflt;
      if (typeof v !== 'number' || !(v > 0) || (integer && !Number.isInteger(v))) {
        throw badRequest(`'${key}' must be a positive ${integer ? 'integer' : 'number'}`);
      }
      return v;
    };
    return {
      function: func,
      handler,
      code,
      codeHash,
      env,
      memoryMiB: num('memoryMiB', 128, true),
      timeoutSeconds: num('timeoutSeconds', 3, false),
      concurrency: num('concurrency', null, true),
      initTimeoutSeconds: num('initTimeoutSeconds', 10, false),
    };
  }

  class LoadError extends Error {
    constructor(errorType, message) {
      super(message);
      this.errorType = errorType;
    }
  }

  function crc32(buf) {
    if (typeof require('node:zlib').crc32 === 'function') return require('node:zlib').crc32(buf);
    let table = crc32.table;
    if (!table) {
      table = crc32.table = new Int32Array(256);
      for (let n = 0; n < 256; n++) {
        let c = n;
        for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
        table[n] = c;
      }
    }
    let c = -1;
    for (let i = 0; i < buf.length; i++) c = table[(c ^ buf[i]) & 0xff] ^ (c >>> 8);
    return (c ^ -1) >>> 0;
  }

  // Minimal zip reader (stored + deflate, CRC checked); enough for function code archives.
  function unzip(buf, dest, maxBytes) {
    const zlib = require('node:zlib');
    const bad = (m) => new LoadError('InvalidArchive', `code archive is not a valid zip file: ${m}`);
    let eocd = -1;
    for (let i = buf.length - 22; i >= Math.max(0, buf.length - 65557); i--) {
      if (buf.readUInt32LE(i) === 0x06054b50) { eocd = i; break; }
    }
    if (eocd < 0) throw bad('no end of central directory record');
    const count = buf.readUInt16LE(eocd + 10);
    const cdSize = buf.readUInt32LE(eocd + 12);
    let p = buf.readUInt32LE(eocd + 16);
    if (p === 0xffffffff || count === 0xffff) throw bad('zip64 archives are not supported');
    if (p + cdSize > eocd) throw bad('central directory out of range');
    let total = 0;
    const entries = [];
    for (let n = 0; n < count; n++) {
      if (p + 46 > buf.length || buf.readUInt32LE(p) !== 0x02014b50) throw bad(`bad central directory entry ${n}`);
      const flags = buf.readUInt16LE(p + 8);
      const method = buf.readUInt16LE(p + 10);
      const crc = buf.readUInt32LE(p + 16);
      const csize = buf.readUInt32LE(p + 20);
      const usize = buf.readUInt32LE(p + 24);
      const nlen = buf.readUInt16LE(p + 28);
      const elen = buf.readUInt16LE(p + 30);
      const clen = buf.readUInt16LE(p + 32);
      const off = buf.readUInt32LE(p + 42);
      const name = buf.toString('utf8', p + 46, p + 46 + nlen);
      p += 46 + nlen + elen + clen;
      if (flags & 1) throw bad(`entry '${name}' is encrypted`);
      if (name.startsWith('/') || name.replace(/\\/g, '/').split('/').includes('..')) {
        throw new LoadError('InvalidArchive', `code archive has an unsafe path '${name}'`);
      }
      total += usize;
      if (total > maxBytes) throw new LoadError('InvalidArchive', `code archive unpacks to more than ${maxBytes} bytes`);
      entries.push({ name, method, crc, csize, usize, off });
    }
    for (const e of entries) {
      const target = path.join(dest, e.name);
      if (e.name.endsWith('/')) { fs.mkdirSync(target, { recursive: true }); continue; }
      if (e.off + 30 > buf.length || buf.readUInt32LE(e.off) !== 0x04034b50) throw bad(`bad local header for '${e.name}'`);
      const start = e.off + 30 + buf.readUInt16LE(e.off + 26) + buf.readUInt16LE(e.off + 28);
      if (start + e.csize > buf.length) throw bad(`data of '${e.name}' is truncated`);
      const raw = buf.subarray(start, start + e.csize);
      let data;
      if (e.method === 0) data = raw;
      else if (e.method === 8) {
        try { data = zlib.inflateRawSync(raw); } catch (err) { throw bad(`cannot inflate '${e.name}': ${err.message}`); }
      } else throw bad(`entry '${e.name}' uses unsupported compression method ${e.method}`);
      if (data.length !== e.usize || crc32(data) !== e.crc) throw bad(`bad CRC-32 or size for '${e.name}'`);
      fs.mkdirSync(path.dirname(target), { recursive: true });
      fs.writeFileSync(target, data);
    }
  }

  const isZip = (b) => b.length >= 4 && b[0] === 0x50 && b[1] === 0x4b && (b[2] === 3 || b[2] === 5) && (b[3] === 4 || b[3] === 6);

  async function materialize(spec, dest, deadline) {
    const code = spec.code;
    const [mod] = parseHandler(spec.handler);
    const maxBytes = S.maxCodeBytes;
    if ('path' in code) {
      let st;
      try { st = fs.statSync(code.path); } catch { st = null; }
      if (!st || !st.isDirectory()) throw new LoadError('Runtime.CodeNotFound', `code.path '${code.path}' is not a directory`);
      return code.path;
    }
    if ('url' in code) {
      let buf;
      try {
        const res = await fetch(code.url, { signal: AbortSignal.timeout(Math.max(1, deadline - Date.now())) });
        if (!res.ok) throw new Error(`HTTP ${res.status} ${res.statusText}`);
        buf = Buffer.from(await res.arrayBuffer());
      } catch (e) {
        if (e && (e.name === 'TimeoutError' || e.name === 'AbortError')) {
          throw new LoadError('Runtime.InitTimeout', `fetching code from ${code.url} took longer than initTimeoutSeconds (${spec.initTimeoutSeconds}s)`);
        }
        throw new LoadError('CodeFetchFailed', `fetching code from ${code.url} failed: ${e.message}${e.cause ? ' (' + e.cause.message + ')' : ''}`);
      }
      if (buf.length > maxBytes) throw new LoadError('CodeFetchFailed', `code at ${code.url} is larger than ${maxBytes} bytes`);
      const got = crypto.createHash('sha256').update(buf).digest('hex');
      if (got !== code.sha256.toLowerCase()) {
        throw new LoadError('ChecksumMismatch', `sha256 mismatch for ${code.url}: expected ${code.sha256.toLowerCase()}, got ${got}`);
      }
      if (isZip(buf)) unzip(buf, dest, maxBytes);
      else fs.writeFileSync(path.join(dest, mod + '.js'), buf);
      return dest;
    }
    if (code.encoding === 'base64-zip') {
      const s = code.inline.replace(/\s+/g, '');
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4 !== 0) {
        throw new LoadError('InvalidArchive', 'code.inline is not valid base64');
      }
      unzip(Buffer.from(s, 'base64'), dest, maxBytes);
      return dest;
    }
    const file = path.join(dest, code.filename || mod + '.js');
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, code.inline);
    return dest;
  }

  function codeBase() {
    if (!S.codeBase) S.codeBase = path.join(process.env.TMPDIR || os.tmpdir(), `ember-agent-${process.pid}`);
    fs.mkdirSync(S.codeBase, { recursive: true, mode: 0o700 });
    return S.codeBase;
  }

  async function specialize(body) {
    let req;
    try { req = JSON.parse(body.toString('utf8')); } catch (e) {
      throw badRequest(`specialize body is not valid JSON: ${e.message}`);
    }
    const spec = validateSpec(req);
    if (S.frozen) throw new HTTPError(503, 'Frozen', 'the agent is frozen; thaw it first');
    while (S.busy) await new Promise((r) => setTimeout(r, 2));
    if (S.state === 'specialized') {
      if (S.codeHash === spec.codeHash && S.handler === spec.handler) {
        return [200, { state: 'specialized', codeHash: S.codeHash, durationMs: 0 }];
      }
      throw new HTTPError(409, 'AlreadySpecialized',
        `already specialized with codeHash ${S.codeHash} and handler '${S.handler}'; a pod is specialized once`);
    }
    try { parseHandler(spec.handler); } catch (e) {
      return [422, { errorType: 'Runtime.MalformedHandlerName', errorMessage: e.message }];
    }
    S.busy = true;
    const t0 = performance.now();
    const deadline = Date.now() + spec.initTimeoutSeconds * 1000; // fetch + unpack + load
    let dest = null;
    try {
      S.attempt += 1;
      dest = path.join(codeBase(), `v${S.attempt}`);
      fs.mkdirSync(dest, { recursive: true });
      let codePath;
      try {
        codePath = await materialize(spec, dest, deadline);
      } catch (e) {
        if (e instanceof LoadError) return [422, { errorType: e.errorType, errorMessage: e.message }];
        return [422, { errorType: 'Runtime.CodeError', errorMessage: `${e.name}: ${e.message}` }];
      }
      // The heap limit is fixed when a worker starts: the spare generic worker (started with the
      // default limit) is used when the function asks for that; env is applied by the worker.
      S.spec = spec;
      let w = S.spare;
      S.spare = null;
      if (!w || w.dead || w.memoryMiB !== spec.memoryMiB) {
        if (w) w.kill();
        w = new W();
      }
      const r = await w.load(spec, codePath, deadline - Date.now());
      if (!r.ok) {
        w.kill();
        S.spec = null;
        spawnSpare();
        if (r.timeout) {
          return [422, { errorType: 'Runtime.InitTimeout', errorMessage: `loading the code took longer than ${spec.initTimeoutSeconds}s (initTimeoutSeconds)` }];
        }
        if (r.death) return [422, deathError(r.death, `while loading module for handler '${spec.handler}'`)];
        return [422, r.error];
      }
      w.loaded = true;
      S.codePath = codePath;
      S.codeHash = spec.codeHash;
      S.handler = spec.handler;
      if (spec.concurrency) S.concurrency = spec.concurrency;
      S.state = 'specialized';
      S.idle.push(w);
      const dur = performance.now() - t0;
      logAgent(`specialized ${spec.function.namespace}/${spec.function.name}:${spec.function.version} handler=${spec.handler} codeHash=${spec.codeHash} in ${dur.toFixed(1)} ms`);
      return [200, { state: 'specialized', codeHash: spec.codeHash, durationMs: Math.round(dur * 1000) / 1000 }];
    } finally {
      if (S.state !== 'specialized' && dest) fs.rmSync(dest, { recursive: true, force: true });
      S.busy = false;
    }
  }

  function deathError(info, when) {
    if (info.err && info.err.code === 'ERR_WORKER_OUT_OF_MEMORY') {
      return { errorType: 'Runtime.OutOfMemory', errorMessage: `Runtime exited with error: out of memory (memoryMiB ${S.spec ? S.spec.memoryMiB : '?'}) ${when}`.trim() };
    }
    if (info.err) {
      const e = info.err;
      return { errorType: 'Runtime.ExitError', errorMessage: `Runtime exited with error: uncaught ${e && e.name ? e.name : 'exception'}: ${e && e.message !== undefined ? e.message : String(e)} ${when}`.trim() };
    }
    return { errorType: 'Runtime.ExitError', errorMessage: `Runtime exited with error: exit status ${info.code} ${when}`.trim() };
  }

  // ---------------------------------------------------------------------------------------------
  // Invoke

  function newRequestId() {
    return crypto.randomUUID();
  }

  function agentError(rid, errorType, message) {
    return Buffer.from(JSON.stringify({ errorMessage: message, errorType, requestId: rid, stackTrace: [] }));
  }

  async function invoke(headers, body) {
    const rid = headers['x-ember-request-id'] || newRequestId();
    if (!/^[A-Za-z0-9\-_.:]{1,128}$/.test(rid)) throw badRequest('X-Ember-Request-Id must be 1-128 characters of letters, digits and -_.:');
    const wantTail = String(headers['x-ember-log-type'] || '').toLowerCase() === 'tail';
    const call = headers['x-ember-call-token'] || '';
    if (call && !/^[A-Za-z0-9_-]{1,64}$/.test(call)) throw badRequest('X-Ember-Call-Token must be 1-64 characters of letters, digits and -_');
    if (S.frozen) throw new HTTPError(503, 'Frozen', 'the agent is frozen; thaw it first');
    if (S.state !== 'specialized') throw new HTTPError(503, 'NotSpecialized', 'the agent is not specialized; POST /v1/specialize first');
    if (S.inFlight >= S.concurrency) {
      throw new HTTPError(429, 'TooManyRequests', `${S.inFlight} invocation(s) in flight; concurrency is ${S.concurrency}`);
    }
    let timeoutMs = S.spec.timeoutSeconds * 1000;
    const tmo = headers['x-ember-timeout-ms'];
    if (tmo !== undefined) {
      if (!/^\d+$/.test(tmo) || Number(tmo) <= 0) throw badRequest('X-Ember-Timeout-Ms must be a positive integer');
      timeoutMs = Number(tmo);
    }
    S.inFlight += 1;
    const t0 = performance.now();
    const deadline = Date.now() + timeoutMs;
    let tail = wantTail ? [] : null;
    let tailLen = 0;
    const addLog = (text) => {
      process.stdout.write(prefixLines(rid, text));
      if (tail) {
        const b = Buffer.from(text);
        tail.push(b);
        tailLen += b.length;
        if (tailLen > 4 * LOG_TAIL_BYTES) { const all = Buffer.concat(tail); tail = [all.subarray(all.length - LOG_TAIL_BYTES)]; tailLen = LOG_TAIL_BYTES; }
      }
    };
    let w = null;
    let replace = false;
    let result;
    try {
      w = S.idle.pop() || null;
      if ((!w || w.dead) && S.pending && !S.pending.claimed) {
        S.pending.claimed = true;
        w = await S.pending.p;
      }
      if (!w || w.dead) w = await newLoadedWorker();
      const remaining = deadline - Date.now();
      const r = remaining <= 0 ? { timeout: true } : await w.exchange(
        { type: 'invoke', rid, body: body.toString('utf8'), deadline, call },
        (m) => {
          if (m.type === 'log') { addLog(m.data); return undefined; }
          if (m.type === 'result') return { result: m };
          return undefined;
        }, remaining);
      const elapsed = performance.now() - t0;
      if (r.result) {
        const m = r.result;
        result = { status: m.status === 'badEvent' ? 400 : 200, body: Buffer.from(m.body), dur: m.duration, cpu: m.cpu, rss: m.rss,
          ferr: m.status === 'handled' ? 'Handled' : m.status === 'unhandled' ? 'Unhandled' : null };
      } else if (r.timeout) {
        const rss = Math.round(process.resourceUsage().maxRSS);
        w.kill();
        w = null;
        replace = true;
        const msg = `RequestId: ${rid} Error: Task timed out after ${(timeoutMs / 1000).toFixed(2)} seconds`;
        addLog(msg + '\n');
        // (a timer may fire a fraction of a millisecond early by performance.now())
        result = { status: 200, body: agentError(rid, 'Sandbox.Timedout', msg), dur: Math.max(elapsed, timeoutMs), cpu: 0, rss, ferr: 'Unhandled' };
      } else {
        w.kill();
        w = null;
        replace = true;
        const e = deathError(r.death, '');
        const msg = `RequestId: ${rid} Error: ${e.errorMessage}`;
        addLog(msg + '\n');
        result = { status: 200, body: agentError(rid, e.errorType, msg), dur: elapsed, cpu: 0, rss: Math.round(process.resourceUsage().maxRSS), ferr: 'Unhandled' };
      }
    } finally {
      S.inFlight -= 1;
      if (w && !w.dead) {
        if (S.workers.size > S.concurrency) w.kill();
        else S.idle.push(w);
      }
    }
    if (result.status === 400) return { status: 400, body: result.body, headers: {}, replace };
    const h = {
      'X-Ember-Request-Id': rid,
      'X-Ember-Duration-Ms': result.dur.toFixed(3),
      'X-Ember-Max-Rss-Kib': String(result.rss),
      'X-Ember-Cpu-Ms': result.cpu.toFixed(3),
    };
    if (result.ferr) h['X-Ember-Function-Error'] = result.ferr;
    if (tail) {
      let t = Buffer.concat(tail);
      if (t.length > LOG_TAIL_BYTES) {
        t = t.subarray(t.length - LOG_TAIL_BYTES);
        let i = 0;
        while (i < 3 && i < t.length && (t[i] & 0xc0) === 0x80) i++;
        t = t.subarray(i);
      }
      h['X-Ember-Log-Result'] = t.toString('base64');
    }
    return { status: result.status, body: result.body, headers: h, replace };
  }

  // ---------------------------------------------------------------------------------------------
  // Freeze / thaw (CONTRACT.md).  A freeze runs the before-freeze hooks in every worker; only when
  // all of them passed does each worker end its TCP connections and park: a failed freeze leaves
  // every worker running and every connection open.  A parked worker's thread is blocked in
  // Atomics.wait, so none of its JavaScript (timers, intervals, I/O callbacks) runs and it uses no
  // CPU until the thaw wakes it; then the after-thaw hooks run.
  //
  // No worker is started while frozen: invoke and specialize refuse (503 Frozen) from the moment a
  // freeze begins, and the only other path that starts one (prewarmReplacement) runs after an
  // invocation.  A replacement still loading when the freeze begins is waited for and frozen too.
  // The processes the code started (child_process, in its session or another) are this process's
  // descendants: a freeze stops them (SIGSTOP) once the workers are parked, its thaw continues the
  // same ones first.  One detached by a double fork is re-parented to the sandbox's init, out of
  // reach (Node has no PR_SET_CHILD_SUBREAPER without a native addon).

  function signal(pid, sig) {
    try { process.kill(pid, sig); } catch { /* gone meanwhile */ }
  }

  // The pids of every process below `root`, from each one's parent in /proc/<pid>/stat.
  function below(root) {
    const children = new Map();
    let names = [];
    try { names = fs.readdirSync('/proc'); } catch { return []; }
    for (const name of names) {
      if (!/^[0-9]+$/.test(name)) continue;
      let stat;
      try { stat = fs.readFileSync(`/proc/${name}/stat`, 'latin1'); } catch { continue; }
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]); // after "pid (comm) state"
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid).push(Number(name));
    }
    const found = [];
    const todo = [root];
    while (todo.length) for (const pid of children.get(todo.pop()) || []) { found.push(pid); todo.push(pid); }
    return found;
  }

  // SIGSTOP every process below `root`, scanning again for what one forked before it stopped.
  function stopBelow(root) {
    const stopped = new Set();
    for (let pass = 0; pass < 8; pass++) {
      const found = below(root).filter((pid) => !stopped.has(pid));
      if (!found.length) break;
      for (const pid of found) { signal(pid, 'SIGSTOP'); stopped.add(pid); }
    }
    return [...stopped];
  }

  async function freezeThaw(freeze) {
    while (S.busy) await new Promise((r) => setTimeout(r, 2));
    if (freeze === S.frozen) return [200, { state: freeze ? 'frozen' : S.state }];
    if (freeze && S.inFlight) throw new HTTPError(409, 'Busy', `${S.inFlight} invocation(s) in flight; freeze when idle`);
    S.busy = true;
    S.frozen = true; // invoke and specialize refuse from here on
    const specialized = S.state === 'specialized';
    let errors = [];
    let closed = 0;
    try {
      if (specialized && freeze) {
        if (S.pending) await S.pending.p; // its own continuation puts it in S.idle first
        errors = (await Promise.all(S.idle.map((w) => w.hook('beforeFreeze')))).filter(Boolean);
        if (!errors.length) {
          for (const n of await Promise.all(S.idle.map((w) => w.park()))) closed += n;
          S.stopped = stopBelow(process.pid);
        }
      } else if (specialized) {
        for (const pid of S.stopped) signal(pid, 'SIGCONT');
        S.stopped = [];
        for (const w of S.workers) if (w.parked) w.unpark();
        errors = (await Promise.all(S.idle.map((w) => w.hook('afterThaw')))).filter(Boolean);
      }
    } finally {
      S.frozen = freeze && errors.length === 0;
      S.busy = false;
    }
    const state = S.frozen ? 'frozen' : S.state;
    if (errors.length) {
      return [500, { errorType: freeze ? 'Runtime.BeforeFreezeError' : 'Runtime.AfterThawError',
        errorMessage: errors.map((e) => `${e.errorType}: ${e.errorMessage}`).join('; '), state }];
    }
    return [200, specialized && freeze ? { state, connectionsClosed: closed } : { state }];
  }

  // ---------------------------------------------------------------------------------------------
  // Authentication (CONTRACT.md): the first specialize binds its bearer token; every later request
  // but a bare GET /healthz must carry it, else 401.  The token stays in this thread: it is read
  // from a request header and never put in the spec or a message to a worker.  Node cannot keep it
  // from function code as the Python agent does (PR_SET_DUMPABLE=0, code in other processes): the
  // workers are threads of this process and may read /proc/self/mem, so a function can learn its
  // own pod's token, which opens its own agent only (each pod has its own token).

  const MIN_TOKEN_CHARS = 16;
  const MAX_TOKEN_CHARS = 512;
  const unauthorized = (msg = 'this agent answers only the client that specialized it') => new HTTPError(401, 'Unauthorized', msg);

  function presentedToken(headers) {
    const value = headers.authorization;
    if (typeof value !== 'string' || value.slice(0, 7).toLowerCase() !== 'bearer ') return null;
    return Buffer.from(value.slice(7).replace(/^ +| +$/g, ''), 'latin1');
  }

  function sameToken(token, bound) {
    return bound !== null && token !== null && token.length === bound.length && crypto.timingSafeEqual(token, bound);
  }

  function authorize(headers, binding) {
    const token = presentedToken(headers);
    if (token === null) throw unauthorized();
    if (S.token === null && binding) {
      if (token.length < MIN_TOKEN_CHARS || token.length > MAX_TOKEN_CHARS) {
        throw unauthorized(`the bearer token must be ${MIN_TOKEN_CHARS} to ${MAX_TOKEN_CHARS} characters`);
      }
      S.token = token; // one thread: the first specialize to get here wins
    }
    if (!sameToken(token, S.token)) throw unauthorized();
  }

  // ---------------------------------------------------------------------------------------------
  // HTTP

  const ROUTES = { '/healthz': 'GET', '/v1/specialize': 'POST', '/v1/invoke': 'POST', '/v1/freeze': 'POST', '/v1/thaw': 'POST' };

  function send(res, status, body, headers = {}, close = false) {
    const buf = Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body));
    const h = { 'Content-Type': 'application/json', 'Content-Length': buf.length, ...headers };
    if (close) h.Connection = 'close';
    res.writeHead(status, h);
    res.end(buf);
  }

  function readBody(req, limit) {
    return new Promise((resolve, reject) => {
      const cl = req.headers['content-length'];
      if (cl !== undefined && Number(cl) > limit) {
        reject(new HTTPError(413, 'RequestTooLarge', `request body is ${cl} bytes; the limit is ${limit}`));
        return;
      }
      const chunks = [];
      let n = 0;
      let failed = false;
      req.on('data', (c) => {
        if (failed) return;
        n += c.length;
        if (n > limit) {
          failed = true;
          reject(new HTTPError(413, 'RequestTooLarge', `request body is larger than the limit of ${limit} bytes`));
          return;
        }
        chunks.push(c);
      });
      req.on('end', () => { if (!failed) resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks)); });
      req.on('error', (e) => { if (!failed) { failed = true; reject(e); } });
    });
  }

  async function handle(req, res) {
    const urlPath = (req.url || '').split('?')[0];
    const want = ROUTES[urlPath];
    const limit = urlPath === '/v1/invoke' ? S.maxPayload : urlPath === '/v1/specialize' ? MAX_SPECIALIZE_BYTES : MAX_OTHER_BYTES;
    let replace = false;
    try {
      const body = await readBody(req, limit);
      if (!want) throw new HTTPError(404, 'NotFound', `no route ${req.method} ${urlPath}`);
      if (req.method !== want) {
        send(res, 405, { errorType: 'MethodNotAllowed', errorMessage: `${req.method} ${urlPath}: use ${want}` }, { Allow: want });
        return;
      }
      if (urlPath !== '/healthz') authorize(req.headers, urlPath === '/v1/specialize');
      if (urlPath === '/v1/invoke') {
        // X-Ember-Thaw: 1 thaws a frozen agent first (CONTRACT.md); a failed thaw answers for it
        const thaw = req.headers['x-ember-thaw'] === '1' && S.frozen ? await freezeThaw(false) : null;
        if (thaw && thaw[0] !== 200) {
          send(res, thaw[0], thaw[1]);
        } else {
          const r = await invoke(req.headers, body);
          replace = r.replace;
          send(res, r.status, r.body, r.headers);
        }
      } else if (urlPath === '/healthz') {
        const state = S.frozen ? 'frozen' : S.state;
        // liveness for anyone; what the pod runs only for the client holding its token
        if (!sameToken(presentedToken(req.headers), S.token)) send(res, 200, { state, runtime: RUNTIME });
        else send(res, 200, { state, runtime: RUNTIME, codeHash: S.codeHash, inFlight: S.inFlight, concurrency: S.concurrency });
      } else if (urlPath === '/v1/specialize') {
        const [status, obj] = await specialize(body);
        send(res, status, obj);
      } else {
        const [status, obj] = await freezeThaw(urlPath === '/v1/freeze');
        send(res, status, obj);
      }
    } catch (e) {
      if (e instanceof HTTPError) {
        // An announced too-large body (<= 64 MiB) is read and dropped by Node after the answer, so
        // the client sees the 413 and the connection stays usable; otherwise close.
        const cl = Number(req.headers['content-length']);
        const close = e.status === 413 && !(cl <= 64 * 1024 * 1024 && !req.headers.expect);
        const extra = e.status === 401 ? { 'WWW-Authenticate': 'Bearer' } : {};
        send(res, e.status, { errorType: e.errorType, errorMessage: e.message }, extra, close);
        if (close) req.on('data', () => {});
      } else {
        logAgent(`internal error: ${e && e.stack}`);
        if (!res.headersSent) send(res, 500, { errorType: 'AgentError', errorMessage: String(e && e.message) }, {}, true);
      }
    }
    if (replace) prewarmReplacement();
  }

  // Node emits pipelined requests of one connection without waiting for the previous answer;
  // chain them per connection so they run one after another, as HTTP/1.1 means them.
  const chains = new WeakMap();
  const server = http.createServer({ keepAliveTimeout: 0, requestTimeout: 0, headersTimeout: 60000 }, (req, res) => {
    const prev = chains.get(req.socket) || Promise.resolve();
    const next = prev.then(() => handle(req, res));
    chains.set(req.socket, next);
  });
  server.keepAliveTimeout = 0;
  server.on('clientError', (err, socket) => {
    if (!socket.writable || err.code === 'ECONNRESET') { socket.destroy(); return; }
    const body = JSON.stringify({ errorType: 'InvalidRequest', errorMessage: `malformed HTTP request: ${err.code || err.message}` });
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? '431 Request Header Fields Too Large' : '400 Bad Request';
    socket.end(`HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
  });
  const relayReady = startServicesRelay();
  const onListening = (what) => () => {
    relayReady.then((relay) => {
      process.stdout.write(`EMBER_AGENT_LISTENING ${what()}${relay}\n`);
      setImmediate(spawnSpare);
    });
  };
  const sockPath = process.env.EMBER_AGENT_SOCKET || '';
  const listenFd = process.env.EMBER_AGENT_LISTEN_FD || '';
  if (listenFd) {
    // A listening Unix stream socket the host made and handed down (its file is not in the sandbox).
    if (!/^[0-9]+$/.test(listenFd) || Number(listenFd) < 3) {
      process.stderr.write(`ember-agent: EMBER_AGENT_LISTEN_FD=${JSON.stringify(listenFd)} must be a file descriptor number of 3 or more\n`);
      process.exit(2);
    }
    server.on('error', (e) => { process.stderr.write(`ember-agent: cannot listen on EMBER_AGENT_LISTEN_FD=${listenFd}: ${e.message}\n`); process.exit(1); });
    server.listen({ fd: Number(listenFd) }, onListening(() => `fd=${listenFd}`));
  } else if (sockPath) {
    // A Unix socket instead of TCP (EMBER_AGENT_HOST/PORT ignored).  A socket file left at the path
    // (an agent that was killed) is removed first; any other file is refused, not replaced.  The
    // file keeps the default mode: the host process that connects may run as another uid.
    const refuse = (why) => { process.stderr.write(`ember-agent: EMBER_AGENT_SOCKET=${JSON.stringify(sockPath)}${why}\n`); process.exit(2); };
    if (!path.isAbsolute(sockPath)) refuse(' must be an absolute path');
    // sun_path is 108 bytes with the final NUL; listen() would silently truncate a longer path
    if (Buffer.byteLength(sockPath) > 107) refuse(' is longer than 107 bytes, the limit of a Unix socket path');
    let st = null;
    try { st = fs.lstatSync(sockPath); } catch (e) { if (e.code !== 'ENOENT') refuse(`: ${e.message}`); }
    if (st && !st.isSocket()) refuse(' exists and is not a socket; not replacing it');
    if (st) {
      try { fs.unlinkSync(sockPath); } catch (e) { if (e.code !== 'ENOENT') refuse(`: cannot remove the old socket: ${e.message}`); }
    }
    server.on('error', (e) => { process.stderr.write(`ember-agent: cannot listen on EMBER_AGENT_SOCKET=${JSON.stringify(sockPath)}: ${e.message}\n`); process.exit(1); });
    server.listen(sockPath, onListening(() => `socket=${sockPath}`)); // server.close() unlinks the file
  } else {
    const host = process.env.EMBER_AGENT_HOST || '0.0.0.0';
    const port = envInt('EMBER_AGENT_PORT', 8080, 0, 65535);
    server.on('error', (e) => { process.stderr.write(`ember-agent: cannot listen on ${host}:${port}: ${e.message}\n`); process.exit(1); });
    server.listen(port, host, onListening(() => `port=${server.address().port}`));
  }

  const shutdown = () => {
    if (S.shuttingDown) return;
    S.shuttingDown = true;
    server.close();
    const end = Date.now() + S.shutdownGraceSeconds * 1000;
    const tick = () => {
      if (S.inFlight && Date.now() < end) { setTimeout(tick, 10); return; }
      for (const w of [...S.workers]) w.kill();
      if (S.spare) S.spare.kill();
      // a temp dir the agent made itself (not a mounted volume)
      if (!process.env.EMBER_AGENT_CODE_DIR && S.codeBase) fs.rmSync(S.codeBase, { recursive: true, force: true });
      process.exit(0);
    };
    tick();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

// The services relay (EMBER_AGENT_SERVICES_SOCKET): a TCP listener on the sandbox's loopback whose
// every connection is copied byte for byte, both ways, to a new connection to the host's services
// proxy socket, so function code reaches its auxiliary services with any HTTP client at the
// EMBER_SERVICE_<NAME>_URL the host announces.  It holds no credential and reads nothing it copies:
// the proxy authenticates each request by the token in its path.  -> a promise of the LISTENING
// line's suffix (' services=<port>', or '' without the setting); a bad setting ends the agent.
function startServicesRelay() {
  const net = require('node:net');
  const fs = require('node:fs');
  const path = require('node:path');
  const MAX_RELAYS = 256; // connections relayed at once; one more is closed at once
  const target = process.env.EMBER_AGENT_SERVICES_SOCKET || '';
  if (!target) return Promise.resolve('');
  const refuse = (why) => {
    process.stderr.write(`ember-agent: EMBER_AGENT_SERVICES_SOCKET=${JSON.stringify(target)}${why}\n`);
    process.exit(2);
  };
  if (!path.isAbsolute(target)) refuse(' must be an absolute path');
  if (Buffer.byteLength(target) > 107) refuse(' is longer than 107 bytes, the limit of a Unix socket path');
  let st = null;
  try { st = fs.statSync(target); } catch (e) { refuse(`: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}`); }
  if (!st.isSocket()) refuse(' is not a Unix socket');
  let relays = 0;
  const relay = net.createServer({ allowHalfOpen: true, noDelay: true }, (client) => {
    if (relays >= MAX_RELAYS) { client.destroy(); return; }
    client.setNoDelay(true); // no Nagle delay on small requests and answers (as Python's TCP_NODELAY)
    relays += 1;
    const upstream = net.connect({ path: target, allowHalfOpen: true });
    let closed = 0;
    const onClose = () => { closed += 1; if (closed === 2) relays -= 1; };
    client.on('close', onClose);
    upstream.on('close', onClose);
    // an error on either side ends both directions; an end (FIN) is passed on as an end
    client.on('error', () => upstream.destroy());
    upstream.on('error', (e) => {
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') process.stderr.write(`ember-agent: services relay: cannot reach the services proxy: ${e.message}\n`);
      client.destroy();
    });
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve) => {
    relay.on('error', (e) => { process.stderr.write(`ember-agent: cannot listen for the services relay on 127.0.0.1: ${e.message}\n`); process.exit(1); });
    relay.listen(0, '127.0.0.1', () => resolve(` services=${relay.address().port}`));
  });
}

// =================================================================================================
// Worker thread: loads the user's module once, then runs one invocation at a time.

function workerMain() {
  const path = require('node:path');
  const fs = require('node:fs');
  const { pathToFileURL } = require('node:url');

  let handler = null;
  let mod = null;
  let info = null;

  // --- The TCP connections this worker's code holds, for a freeze (CONTRACT.md, freeze step 2).
  // Every client socket goes through net.Socket.prototype.connect (net, tls, http/https agents,
  // fetch), so wrapping it before the user's module loads sees each one, whichever library made it.
  // process._getActiveHandles() alone would not do: it lists only ref'd handles, and http.Agent
  // unrefs every idle keep-alive socket it pools, the very connections a freeze must end.  It still
  // adds what never called connect() (a socket this thread accepted, or one made from a descriptor).
  // A Unix socket is left alone, as Node's own connect() tells it: a `path` option or a string that
  // is not a port.  The worker's channel to the agent is a MessagePort, no socket at all.
  const net = require('node:net');
  const tcpSockets = new Set();
  const connect = net.Socket.prototype.connect;
  net.Socket.prototype.connect = function connectTracked(...args) {
    const first = Array.isArray(args[0]) ? args[0][0] : args[0]; // net.connect() passes them normalized
    const unix = first !== null && typeof first === 'object' ? Boolean(first.path) : typeof first === 'string' && !(Number(first) >= 0);
    if (!unix && !tcpSockets.has(this)) {
      tcpSockets.add(this);
      this.once('close', () => tcpSockets.delete(this));
    }
    return connect.apply(this, args);
  };

  // destroy() every connected or connecting TCP socket not yet ended; a connection is counted in
  // `ended` once (a TLS socket and the socket under it are one connection).  -> promises of their
  // 'close' events.  destroy() closes the descriptor at once: the peer sees FIN (or RST, with
  // unread data) before the freeze is answered.
  function endConnections(ended) {
    const sockets = new Set(tcpSockets);
    if (typeof process._getActiveHandles === 'function') {
      for (const h of process._getActiveHandles()) if (h instanceof net.Socket && h.remoteAddress) sockets.add(h);
    }
    const closes = [];
    for (const s of sockets) {
      if (s.destroyed || !(s.remoteAddress || s.connecting)) continue;
      ended.add(s.remoteAddress ? `${s.localAddress} ${s.localPort} ${s.remoteAddress} ${s.remotePort}` : s);
      closes.push(new Promise((resolve) => s.once('close', resolve)));
      s.destroy();
    }
    return closes;
  }

  const CLOSE_WAIT_MS = 1000; // the code's 'close' handlers run before it is parked, within this
  const parkWord = workerData.parkWord;

  async function park() {
    const ended = new Set();
    let timer = null;
    const waited = new Promise((resolve) => { timer = setTimeout(resolve, CLOSE_WAIT_MS); });
    await Promise.race([Promise.all(endConnections(ended)), waited]);
    clearTimeout(timer);
    endConnections(ended); // what a 'close' handler connected meanwhile (a reconnecting client)
    flush();
    parentPort.postMessage({ type: 'parked', connectionsClosed: ended.size });
    // Hazard: there MUST be NO await between the last endConnections() and the wait, or a
    // callback could open a connection that then stays open, unseen, through the freeze.
    while (Atomics.load(parkWord, 0) === PARKED) Atomics.wait(parkWord, 0, PARKED);
  }

  // --- log capture: everything written to stdout/stderr (console.* included) goes to the agent.
  let pending = '';
  const flush = () => {
    if (pending) { parentPort.postMessage({ type: 'log', data: pending }); pending = ''; }
  };
  const capture = (chunk, encoding, cb) => {
    const s = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    pending += s;
    const i = pending.lastIndexOf('\n');
    if (i >= 0) {
      parentPort.postMessage({ type: 'log', data: pending.slice(0, i + 1) });
      pending = pending.slice(i + 1);
    } else if (pending.length > 8192) flush();
    if (typeof encoding === 'function') encoding();
    else if (typeof cb === 'function') cb();
    return true;
  };
  process.stdout.write = capture;
  process.stderr.write = capture;

  const errorBody = (e, rid) => {
    if (e instanceof Error) {
      const stack = typeof e.stack === 'string' ? e.stack.split('\n') : [];
      return { errorType: e.name || 'Error', errorMessage: String(e.message), requestId: rid, stackTrace: stack, trace: stack };
    }
    let msg;
    try { msg = typeof e === 'string' ? e : JSON.stringify(e); } catch { msg = String(e); }
    return { errorType: 'Error', errorMessage: String(msg), requestId: rid, stackTrace: [], trace: [] };
  };

  async function load(spec, codePath) {
    Object.assign(process.env, spec.env);
    const i = spec.handler.lastIndexOf('.');
    const modName = spec.handler.slice(0, i);
    const fnName = spec.handler.slice(i + 1);
    try { process.chdir(codePath); } catch { /* not available in workers */ }
    const base = path.join(codePath, modName);
    const candidates = [base + '.js', base + '.cjs', base + '.mjs', path.join(base, 'index.js')];
    const file = candidates.find((f) => fs.existsSync(f));
    if (!file) {
      let listing = '(unreadable)';
      try { listing = fs.readdirSync(codePath).filter((n) => !n.startsWith('.')).slice(0, 20).join(', ') || '(empty)'; } catch { /* ignore */ }
      return { errorType: 'Runtime.ImportModuleError', errorMessage: `Unable to import module '${modName}': Cannot find module '${modName}' (tried ${modName}.js, .cjs, .mjs, ${modName}/index.js; files in the code directory: ${listing})` };
    }
    try {
      if (file.endsWith('.mjs')) mod = await import(pathToFileURL(file).href);
      else {
        try { mod = require(file); } catch (e) {
          if (e && e.code === 'ERR_REQUIRE_ESM') mod = await import(pathToFileURL(file).href);
          else throw e;
        }
      }
    } catch (e) {
      if (e instanceof SyntaxError) {
        const m = typeof e.stack === 'string' ? /^(.*):(\d+)\n/.exec(e.stack) : null;
        const where = m ? ` (${path.relative(codePath, m[1])}, line ${m[2]})` : '';
        return { errorType: 'Runtime.UserCodeSyntaxError', errorMessage: `Syntax error in module '${modName}': ${e.message}${where}` };
      }
      if (e && e.code === 'MODULE_NOT_FOUND') {
        return { errorType: 'Runtime.ImportModuleError', errorMessage: `Unable to import module '${modName}': ${String(e.message).split('\n')[0]}` };
      }
      return { errorType: 'Runtime.InitError', errorMessage: `module '${modName}' threw ${e && e.name ? e.name : 'a value'} while being loaded: ${e && e.message !== undefined ? e.message : String(e)}`, stackTrace: typeof (e && e.stack) === 'string' ? e.stack.split('\n') : [] };
    }
    let fn = mod ? mod[fnName] : undefined;
    if (fn === undefined && mod && mod.default && typeof mod.default === 'object') fn = mod.default[fnName];
    if (fn === undefined) {
      return { errorType: 'Runtime.HandlerNotFound', errorMessage: `handler '${spec.handler}' not found: module '${modName}' has no export '${fnName}'` };
    }
    if (typeof fn !== 'function') {
      return { errorType: 'Runtime.HandlerNotFound', errorMessage: `handler '${spec.handler}' is not a function: '${fnName}' is a ${typeof fn}` };
    }
    handler = fn;
    const f = spec.function;
    info = {
      functionName: f.name,
      functionVersion: f.version,
      invokedFunctionArn: `arn:ember:lambda:local:${f.namespace}:function:${f.name}:${f.version}`,
      memoryLimitInMB: String(spec.memoryMiB),
      logGroupName: `/ember/${f.namespace}/${f.name}`,
      logStreamName: `${new Date().toISOString().slice(0, 10).replace(/-/g, '/')}/[${f.version}]${require('node:os').hostname()}`,
    };
    return null;
  }

  function runHandler(event, context) {
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = (err, res) => {
        if (done) return;
        done = true;
        if (err !== null && err !== undefined) reject(err); else resolve(res);
      };
      context.done = finish;
      context.succeed = (r) => finish(null, r);
      context.fail = (e) => finish(e === undefined ? new Error('failed') : e);
      const ret = handler.length >= 3 ? handler(event, context, finish) : handler(event, context);
      if (ret && typeof ret.then === 'function') ret.then((r) => finish(null, r), (e) => finish(e === undefined || e === null ? new Error(String(e)) : e));
      else if (handler.length < 3) finish(null, ret);
    });
  }

  // The code's channel to Ember (CONTRACT.md, Portions and Key-value state): one JSON POST to a URL
  // the host announced in the environment, on a kept-alive connection of `pool`.  -> a promise of
  // { status, headers, text }; rejects with the connection's error.  An idle kept-alive connection
  // the other side had closed fails before the request was made: that is retried once, on a new
  // connection; any other failure is not (the request may have been made).
  const keptAlivePool = () => new (require('node:http').Agent)({ keepAlive: true, maxSockets: 16 });
  function postJSON(pool, url, path, headers, body, deadline, retried = false) {
    return new Promise((resolve, reject) => {
      // EMBER_CHANNEL_SOCKET (local mode): the proxy's socket itself, one hop shorter than the relay
      const where = process.env.EMBER_CHANNEL_SOCKET ? { socketPath: process.env.EMBER_CHANNEL_SOCKET } : { host: url.hostname, port: url.port };
      const req = require('node:http').request({
        ...where, path, method: 'POST', agent: pool, timeout: Math.max(1, deadline - Date.now()),
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), ...headers },
      }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      });
      req.on('timeout', () => req.destroy(new Error('no reply before the deadline')));
      req.on('error', (e) => {
        if (req.reusedSocket && e.code === 'ECONNRESET' && !retried) {
          postJSON(pool, url, path, headers, body, deadline, true).then(resolve, reject);
          return;
        }
        reject(e);
      });
      req.end(body);
    });
  }

  // The {errorType, errorMessage} object an answer's body holds, or null.
  function answerObject(text) {
    try {
      const parsed = text ? JSON.parse(text) : null;
      return parsed && typeof parsed === 'object' && !Array.isArray(parsed) ? parsed : null;
    } catch { return null; }
  }

  function namedError(name, errorType, message, status) {
    const e = new Error(`${errorType}: ${message}`);
    e.name = name;
    Object.assign(e, { errorType, errorMessage: message, status });
    return e;
  }

  // A portion call: POST the event through Ember with this invocation's call token; resolves to the
  // portion's result, rejects with a PortionError.
  let portalPool = null;
  async function invokePortion(token, name, event, deadline) {
    const fail = (errorType, message, status) => namedError('PortionError', errorType, message, status);
    const base = process.env.EMBER_PORTIONS_URL || '';
    if (!base || !token) throw fail('PortionsUnavailable', 'this function calls no portions (spec.portions)');
    if (typeof name !== 'string' || name.length < 1 || name.length > 63) {
      throw fail('InvalidPortionName', `a portion name is a string of 1-63 characters, not ${JSON.stringify(name)}`);
    }
    let body;
    try { body = JSON.stringify(event === undefined ? {} : event); } catch (e) {
      throw fail('InvalidEvent', `the event for portion ${JSON.stringify(name)} is not JSON: ${e.message}`);
    }
    if (!portalPool) portalPool = keptAlivePool();
    const url = new URL(base);
    let res;
    try {
      res = await postJSON(portalPool, url, `${url.pathname}/${encodeURIComponent(name)}`, { 'X-Ember-Call-Token': token }, body, deadline);
    } catch (e) {
      throw fail('PortionUnreachable', `portion ${JSON.stringify(name)}: ${e.message}`);
    }
    if (res.status !== 200 || res.headers['x-ember-function-error']) {
      const parsed = answerObject(res.text);
      if (parsed) throw fail(parsed.errorType || 'PortionError', parsed.errorMessage || '', res.status);
      throw fail('PortionError', res.text.slice(0, 200), res.status);
    }
    try { return res.text ? JSON.parse(res.text) : null; } catch { return res.text; }
  }

  // context.state, the Function's key-value state (CONTRACT.md): each operation one POST of the
  // table's body to EMBER_STATE_URL.  Ember checks keys, values and ttls; this checks only what it
  // needs to send one (a string key, JSON values).
  const STATE_TIMEOUT_MS = 10000; // one operation, as the Python agent's
  let statePool = null;
  const stateError = (errorType, message, status) => namedError('StateError', errorType, message, status);

  async function stateOp(body) {
    const base = process.env.EMBER_STATE_URL || '';
    if (!base) throw stateError('StateNotEnabled', 'this Function has no key-value state (spec.state.keyValue)');
    const key = body.key;
    if (typeof key !== 'string') throw stateError('InvalidStateRequest', `a state key is a string, not ${key === null ? 'null' : typeof key}`);
    for (const field of ['value', 'expected']) {
      // JSON.stringify would leave the field out, not refuse it
      if (field in body && body[field] === undefined) throw stateError('InvalidStateRequest', `the ${field} for state key ${JSON.stringify(key)} is undefined, not JSON`);
    }
    let data;
    try { data = JSON.stringify(body); } catch (e) {
      throw stateError('InvalidStateRequest', `the value for state key ${JSON.stringify(key)} is not JSON: ${e.message}`);
    }
    if (!statePool) statePool = keptAlivePool();
    const url = new URL(base);
    let res;
    try {
      res = await postJSON(statePool, url, url.pathname + url.search, {}, data, Date.now() + STATE_TIMEOUT_MS);
    } catch (e) {
      throw stateError('StateUnavailable', `Ember's state endpoint cannot be reached: ${e.message}`);
    }
    const parsed = answerObject(res.text);
    if (res.status !== 200 || !parsed) {
      if (parsed && parsed.errorType) throw stateError(parsed.errorType, parsed.errorMessage || '', res.status);
      throw stateError('StateUnavailable', res.text.slice(0, 200), res.status);
    }
    return parsed;
  }

  const withTtl = (body, opts) => (opts && opts.ttl !== undefined && opts.ttl !== null ? { ...body, ttl: opts.ttl } : body);
  const STATE = {
    get: async (key, defaultValue) => {
      const r = await stateOp({ op: 'get', key });
      return r.found ? r.value : defaultValue;
    },
    put: async (key, value, opts) => { await stateOp(withTtl({ op: 'put', key, value }, opts)); },
    delete: async (key) => Boolean((await stateOp({ op: 'delete', key })).deleted),
    incr: async (key, by = 1, opts) => (await stateOp(withTtl({ op: 'incr', key, by }, opts))).value,
    compareAndSet: async (key, expected, value, opts) => Boolean((await stateOp(withTtl({ op: 'compare_and_set', key, expected, value }, opts))).swapped),
  };
  STATE.compare_and_set = STATE.compareAndSet;
  Object.freeze(STATE);

  async function invoke(m) {
    const { rid, body, deadline, call } = m;
    let event;
    try { event = body.length ? JSON.parse(body) : {}; } catch (e) {
      parentPort.postMessage({ type: 'result', status: 'badEvent', body: JSON.stringify({ errorType: 'InvalidRequest', errorMessage: `invoke body is not valid JSON: ${e.message}` }) });
      return;
    }
    const context = {
      ...info,
      awsRequestId: rid,
      callbackWaitsForEmptyEventLoop: true,
      identity: undefined,
      clientContext: undefined,
      getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
      invokePortion: (name, ev) => invokePortion(call, name, ev, deadline),
      state: STATE,
    };
    context.invoke_portion = context.invokePortion;
    const t0 = performance.now();
    const c0 = process.cpuUsage();
    let status = 'ok';
    let out;
    try {
      const result = await runHandler(event, context);
      try {
        out = JSON.stringify(result === undefined ? null : result);
      } catch (e) {
        status = 'unhandled';
        out = JSON.stringify({ errorMessage: `Unable to marshal response: ${e.message}`, errorType: 'Runtime.MarshalError', requestId: rid, stackTrace: [] });
      }
    } catch (e) {
      status = 'handled';
      const err = errorBody(e, rid);
      out = JSON.stringify(err);
      capture(`[ERROR] ${err.errorType}: ${err.errorMessage}\n${err.stackTrace.slice(1).join('\n')}\n`);
    }
    const duration = performance.now() - t0;
    const cu = process.cpuUsage(c0);
    flush();
    parentPort.postMessage({ type: 'result', status, body: out, duration, cpu: (cu.user + cu.system) / 1000, rss: Math.round(process.resourceUsage().maxRSS) });
  }

  async function hook(kind) {
    const fn = mod && (mod[kind] || (mod.default && mod.default[kind]));
    let error = null;
    if (typeof fn === 'function') {
      try { await fn(); } catch (e) {
        const b = errorBody(e, kind);
        error = { errorType: b.errorType, errorMessage: `${kind} hook raised: ${b.errorMessage}` };
      }
    }
    flush();
    parentPort.postMessage({ type: 'hookResult', error });
  }

  parentPort.on('message', async (m) => {
    if (m.type === 'invoke') await invoke(m);
    else if (m.type === 'load') {
      let err;
      try { err = await load(m.spec, m.codePath); } catch (e) {
        err = { errorType: 'Runtime.InitError', errorMessage: `${e && e.name}: ${e && e.message}` };
      }
      flush();
      parentPort.postMessage(err ? { type: 'loadError', error: err } : { type: 'loaded' });
    } else if (m.type === 'hook') await hook(m.kind);
    else if (m.type === 'park') await park();
  });
}
