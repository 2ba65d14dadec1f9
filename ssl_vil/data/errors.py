"""Exceptions and typed issue records of the data layer.

Every bad sample or shard the readers meet becomes a :class:`DataIssue` of one category in
:data:`ERROR_CATEGORIES`. Issues are counted (never silently skipped), aggregated through the batch and across
ranks, and checked against an error budget that raises :class:`DataErrorBudgetExceeded`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssl_vil.config.errors import ConfigError

# Fixed order: counters travel as a dict with exactly these keys, so ranks can all-reduce them as one tensor.
ERROR_CATEGORIES: tuple[str, ...] = (
    "undecodable_image",  # the image bytes do not decode
    "oversized_image",  # width * height above max_image_pixels (decompression-bomb guard)
    "missing_image",  # a record without an image member
    "duplicate_key",  # a record whose key already appeared earlier in the same shard
    "bad_label",  # a .cls member that is not an integer in [0, MAX_LABEL]
    "oversized_record",  # a record whose members declare more than max_record_bytes in total (not read)
    "truncated_shard",  # the tar ends early or mid-member; every planned record after that point is lost
    "empty_shard",  # a zero-byte shard file
    "unreadable_shard",  # the shard cannot be opened or is not a tar archive
    "extra_records",  # the shard holds more records than its manifest lists (the surplus is not read)
)
# Planned samples that could not be delivered and were replaced by padding; what the error budget counts.
LOST_SAMPLES = "lost_samples"


class DataConfigError(ConfigError):
    """The data configuration cannot work (too few shards, unsized remote shards, refused ``pipe:`` URL...)."""


class DataError(RuntimeError):
    """The data cannot be read at all (e.g. not a single decodable sample left to pad with)."""


class DataErrorBudgetExceeded(DataError):
    """More planned samples were lost to bad data than the error budget allows; names the worst shards."""


@dataclass(frozen=True, slots=True)
class DataIssue:
    """One bad sample or shard: its category, where it is (shard URL, record index, key) and what went wrong."""

    category: str
    url: str
    record: int
    key: str | None
    message: str

    def __post_init__(self) -> None:
        if self.category not in ERROR_CATEGORIES:
            raise ValueError(f"unknown data issue category {self.category!r}; expected one of {ERROR_CATEGORIES}")

    def describe(self) -> str:
        key = self.key if self.key is not None else "?"
        return f"[{self.category}] {self.url} record {self.record} key {key}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "category": self.category,
            "url": self.url,
            "record": self.record,
            "key": self.key,
            "message": self.message,
        }
