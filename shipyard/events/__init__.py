"""The event log: event types, their envelope, the stream, the dispatch protocol, commands.

This package imports nothing else of Shipyard's but :mod:`shipyard.errors`.
"""
