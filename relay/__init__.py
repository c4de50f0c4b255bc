"""aircall-segment-relay: Aircall webhooks to Segment through a durable SQL outbox."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aircall-segment-relay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
