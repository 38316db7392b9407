"""The one error type of the config system: it names the key and where the value came from."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot be used.

    `source` is the file (or "command line") the offending value came from, `key` the dotted key
    ("training.steps") when there is one; `reason` is the message without the source prefix.
    """

    def __init__(self, reason: str, *, source: str | None = None, key: str | None = None):
        self.reason = reason
        self.source = source
        self.key = key
        super().__init__(f"{source}: {reason}" if source else reason)

    def with_source(self, source: str) -> "ConfigError":
        """The same error, attributed to `source` (kept if it already has one)."""
        if self.source is not None:
            return self
        return ConfigError(self.reason, source=source, key=self.key)
