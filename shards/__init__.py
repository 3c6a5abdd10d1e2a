"""Shard storage engines: one ``Protocol`` (``shards.base``), one engine per database.

Nothing outside ``shards/`` writes SQL against a shard.
"""
