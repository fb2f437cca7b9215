"""Offline stages: corpus reading, extraction, shard I/O, dictionary learning, sparse coding, code storage."""
