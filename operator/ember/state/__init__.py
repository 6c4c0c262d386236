"""Key-value state of a Function (issue #15): `context.state` in its code, served by the activator.

A Function with `spec.state.keyValue: true` gets `EMBER_STATE_URL` at specialize; its code POSTs
one JSON operation there (get, put, delete, incr, compare_and_set; runtime-images/CONTRACT.md
"Key-value state" is the wire contract). The services proxy (`ember.pods.services`) checks the
pod's token and passes the operation, with the scope of the pod's Function ("<namespace>/<function>":
every Version and portion of it shares the keys, no other Function sees them), to `http.handle`.

- `store.py`: the `KeyValueStore` interface, its errors, and the rules both stores keep: values
  are canonical JSON bytes, the TTL semantics, an expired key absent for every operation.
- `http.py`: the request checked (sizes, kinds, members), the store called, the answer or the
  refusal; `open_store` picks the store a setting names.
- `sqlite.py`: local mode, one SQLite file owned by one process, each operation one transaction
  run on the event loop (no thread hop: a point operation costs less than one).
- `redis.py`: a cluster, one Redis shared by the activator replicas; `incr` and
  `compare_and_set` are Lua scripts, one atomic step each.

Operations on one key are linearizable in both, which is what `incr` and a read /
`compare_and_set` / retry loop need. There is no multi-key transaction, no listing of keys,
and no quota per Function beyond the size of one key and one value.
"""
