"""The router: shard-key hashing, chunk-map cache, fenced routing across cutovers."""
