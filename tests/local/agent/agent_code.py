"""User code used by the agent contract tests, the same behaviour written for each runtime.

`main` answers {"action": ...} events so one specialization covers many cases; it reports the
context fields with Python's names in both languages so the tests can share assertions.
"""

PY_MAIN = r"""
import logging
import os
import sys
import time

import ember_runtime

STATE = {"frozen": 0, "thawed": 0, "calls": 0}
LEAK = []
print("init: loading main")


@ember_runtime.register_before_freeze
def _before_freeze():
    STATE["frozen"] += 1
    print("before freeze hook ran")


@ember_runtime.register_after_thaw
def _after_thaw():
    STATE["thawed"] += 1
    print("after thaw hook ran")


class ValueErrorX(ValueError):
    pass


def handler(event, context):
    STATE["calls"] += 1
    action = event.get("action") if isinstance(event, dict) else None
    if action == "sleep":
        time.sleep(event["seconds"])
        return "slept"
    if action == "spin":
        end = time.time() + event["seconds"]
        while time.time() < end:
            pass
        return "spun"
    if action == "exit":
        sys.exit(3)
    if action == "hard_exit":
        os._exit(4)
    if action == "raise":
        raise ValueError("boom: " + str(event.get("msg")))
    if action == "unserializable":
        return {"s": {1, 2}}
    if action == "leak":
        while True:
            LEAK.append(b"x" * (1 << 20) + str(len(LEAK)).encode())
    if action == "print":
        for i in range(event["lines"]):
            print("line %d %s" % (i, "x" * event.get("width", 10)))
        return "printed"
    if action == "log":
        logging.getLogger().warning("warned via logging")
        sys.stderr.write("to stderr\n")
        print("to stdout")
        return "logged"
    if action == "env":
        return os.environ.get(event["name"])
    if action == "state":
        return STATE
    if action == "portion":
        try:
            return {"result": context.invoke_portion(event["name"], event.get("event"))}
        except Exception as e:
            return {"error": type(e).__name__, "errorType": e.error_type, "status": e.status}
    if action == "context":
        return {
            "function_name": context.function_name,
            "function_version": context.function_version,
            "invoked_function_arn": context.invoked_function_arn,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "aws_request_id": context.aws_request_id,
            "log_group_name": context.log_group_name,
            "log_stream_name": context.log_stream_name,
            "remaining": context.get_remaining_time_in_millis(),
        }
    return {"echo": event}
"""

JS_MAIN = r"""
const STATE = { frozen: 0, thawed: 0, calls: 0 };
const LEAK = [];
console.log('init: loading main');

class ValueError extends Error {
  constructor(m) { super(m); this.name = 'ValueError'; }
}

exports.beforeFreeze = async () => { STATE.frozen += 1; console.log('before freeze hook ran'); };
exports.afterThaw = async () => { STATE.thawed += 1; console.log('after thaw hook ran'); };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

exports.handler = async (event, context) => {
  STATE.calls += 1;
  const action = event && typeof event === 'object' ? event.action : undefined;
  switch (action) {
    case 'sleep': await sleep(event.seconds * 1000); return 'slept';
    case 'spin': {
      const end = Date.now() + event.seconds * 1000;
      while (Date.now() < end) { /* busy */ }
      return 'spun';
    }
    case 'exit': process.exit(3); break;
    case 'hard_exit': process.exit(4); break;
    case 'raise': throw new ValueError('boom: ' + String(event.msg));
    case 'unserializable': return { s: 10n };
    case 'leak': for (;;) LEAK.push(new Array(1 << 17).fill(Math.random()));
    case 'print':
      for (let i = 0; i < event.lines; i++) console.log(`line ${i} ${'x'.repeat(event.width || 10)}`);
      return 'printed';
    case 'log':
      console.warn('warned via logging');
      process.stderr.write('to stderr\n');
      console.log('to stdout');
      return 'logged';
    case 'env': return process.env[event.name] === undefined ? null : process.env[event.name];
    case 'state': return STATE;
    case 'portion':
      try { return { result: await context.invokePortion(event.name, event.event) }; } catch (e) {
        return { error: e.name, errorType: e.errorType, status: e.status === undefined ? null : e.status };
      }
    case 'context': return {
      function_name: context.functionName,
      function_version: context.functionVersion,
      invoked_function_arn: context.invokedFunctionArn,
      memory_limit_in_mb: context.memoryLimitInMB,
      aws_request_id: context.awsRequestId,
      log_group_name: context.logGroupName,
      log_stream_name: context.logStreamName,
      remaining: context.getRemainingTimeInMillis(),
    };
    default: return { echo: event };
  }
};
"""

CODE = {
    "python": {
        "main": PY_MAIN,
        "hello": "def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n",
        "hello_v2": "def handler(event, context):\n    return {'hello': 'v2'}\n",
        "async": (
            "import asyncio\n\n"
            "async def handler(event, context):\n"
            "    await asyncio.sleep(0.01)\n"
            "    return {'async': True, 'id': context.aws_request_id}\n"
        ),
        "callback": None,
        "syntax_error": "def handler(event, context):\n    return {'a': 1\n\nx = 1\n",
        "import_raises": "raise RuntimeError('cannot connect to the database')\n\ndef handler(e, c):\n    return 1\n",
        "import_missing_dep": "import not_a_real_module_xyz\n\ndef handler(e, c):\n    return 1\n",
        "import_exit": "import os\nos._exit(7)\n",
        "pkg_init": "",
        "pkg_mod": "from . import helper\n\ndef handler(event, context):\n    return {'from': helper.NAME}\n",
        "pkg_helper": "NAME = 'pkg.helper'\n",
    },
    "node": {
        "main": JS_MAIN,
        "hello": "exports.handler = async (event) => ({ hello: event.name || 'world' });\n",
        "hello_v2": "exports.handler = async () => ({ hello: 'v2' });\n",
        "async": (
            "exports.handler = async (event, context) => {\n"
            "  await new Promise((r) => setTimeout(r, 10));\n"
            "  return { async: true, id: context.awsRequestId };\n"
            "};\n"
        ),
        "callback": (
            "exports.handler = (event, context, callback) => {\n"
            "  setTimeout(() => callback(null, { callback: true, n: event.n }), 5);\n"
            "};\n"
        ),
        "syntax_error": "exports.handler = async (event) => {\n  return { a: 1 ;\n};\n",
        "import_raises": "throw new Error('cannot connect to the database');\n",
        "import_missing_dep": "require('not-a-real-module-xyz');\nexports.handler = async () => 1;\n",
        "import_exit": "process.exit(7);\n",
        "pkg_init": None,
        "pkg_mod": "const helper = require('./helper');\nexports.handler = async () => ({ from: helper.NAME });\n",
        "pkg_helper": "exports.NAME = 'pkg.helper';\n",
    },
}
