"""Streaming: pruning a model larger than memory, one decoder block at a time from safetensors shards.

Owns the shard reader/writer and the resumable streamed job. May import everything below it (core to export).
"""
