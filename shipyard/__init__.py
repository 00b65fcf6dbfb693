"""Shipyard: a self-hosted command center for autonomous agent operations."""

__version__ = "0.1.0"
