"""glitch-harness: find glitch tokens in language models, through plugins, into SQLite."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("glitch-harness")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
