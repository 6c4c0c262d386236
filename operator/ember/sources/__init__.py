"""Where asynchronous invocations wait: the durable event store and its implementations.

`store` is the interface (put, lease, extend, ack, retry later, dead-letter, status) and the
records; `sqlite` is local mode's (a file in `ember dev --state-dir`), `redis_streams` a cluster's
(Redis Streams, shared by every activator replica). The activator's worker
(`ember.activator.async_invoke`) is the only consumer; nothing here knows about Functions
beyond their names.
"""
