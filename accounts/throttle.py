"""Counters that hold across processes and machines, in the shared cache (settings.CACHES:
Redis in production, so that every gunicorn worker and every machine counts together).

- The request budget: requests per minute from one client address to the unauthenticated
  recipient URLs (they cost a lookup, a hash, a captcha image), refused with 429 past it.
- Attempts in progress: a link or code is evaluated only after it took a slot, atomically,
  against its address and its share. django-axes stays the record of failures (and of
  lockouts), but it only learns of a failure once the code has been checked: parallel requests
  would all pass its check before the first failure is written. A slot counts what is being
  checked right now; added to what axes recorded, no more than AXES_FAILURE_LIMIT codes are
  ever checked per address or share within the cool-off, whatever the concurrency.
- Failures across all shares per minute: a guessing campaign spread over many addresses.

The cache's `incr` is atomic (Redis INCR; a lock in the local-memory cache). It raises
ValueError for a key that is missing, which `add` creates first, with its expiry.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from accounts import selectors

# How long a slot's counter outlives its last use: a process that dies while checking a code
# leaves its slot taken at most this long (requests are much shorter: gunicorn's timeout).
_SLOT_TTL = 300
# How long an alert episode lasts after the last minute above the threshold.
_EPISODE_TTL = 15 * 60


def _increment(key: str, timeout: int) -> int:
    """Add one to the counter `key`, created with `timeout` if missing; the new value."""
    for _attempt in range(3):
        cache.add(key, 0, timeout)
        try:
            return int(cache.incr(key))
        except ValueError:
            continue  # it expired between add and incr: create it again
    return int(cache.incr(key))  # pragma: no cover - three expiries in a row


def _decrement(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:
        pass  # expired meanwhile: nothing left to give back


# --- request budget ---------------------------------------------------------------------------


def request_budget_wait(limit_key: str, *, now: float | None = None) -> int:
    """Count a request from `limit_key` (accounts.net.client_limit_key) in the current minute:
    0 while within settings.RECIPIENT_REQUESTS_PER_MINUTE, else the seconds until the minute
    ends."""
    budget = int(settings.RECIPIENT_REQUESTS_PER_MINUTE)
    if budget <= 0:
        return 0
    now = time.time() if now is None else now
    minute = int(now // 60)
    count = _increment(f"budget:{limit_key}:{minute}", 61)
    if count <= budget:
        return 0
    return max(1, (minute + 1) * 60 - int(now))


# --- attempts in progress -----------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """`allowed`: this attempt may be checked. `before_from_address`: attempts from the same
    address checked or being checked before it within the cool-off (the captcha threshold)."""

    allowed: bool
    before_from_address: int


@contextmanager
def attempt_slot(*, ip_address: str, scope: str) -> Iterator[Slot]:
    """Take a slot for checking one link or code from `ip_address` against the share
    `scope` (accounts.credentials.lockout_key_*), for the duration of the block.

    The counters are taken first, then axes' failures read: an attempt that finished before
    this one took its slot has given its slot back only after axes recorded its failure, so
    every earlier attempt is counted once, as in progress or as a failure. The block must
    include the authentication (axes records the failure inside `authenticate()`)."""
    keys = [f"attempts:ip:{ip_address}", f"attempts:scope:{scope}"]
    taken: list[str] = []
    try:
        in_progress = []
        for key in keys:
            in_progress.append(_increment(key, _SLOT_TTL))
            taken.append(key)
            cache.touch(key, _SLOT_TTL)
        failures = [
            selectors.failures_from_ip(ip_address),
            selectors.failures_for_scope(scope),
        ]
        limit = int(settings.AXES_FAILURE_LIMIT)
        allowed = all(n + f <= limit for n, f in zip(in_progress, failures, strict=True))
        yield Slot(allowed=allowed, before_from_address=in_progress[0] - 1 + failures[0])
    finally:
        for key in taken:
            _decrement(key)


# --- guessing campaigns ---------------------------------------------------------------------------


def failure_campaign_starts(*, now: float | None = None) -> int:
    """Count one failed link or code, whatever its share or address. Returns the failures of
    this minute when they pass settings.ALERT_FAILURES_PER_MINUTE and no alert episode is
    under way (one starts: the caller raises the alert), else 0. An episode ends
    after 15 minutes without a minute above the threshold."""
    threshold = int(settings.ALERT_FAILURES_PER_MINUTE)
    if threshold <= 0:
        return 0
    now = time.time() if now is None else now
    count = _increment(f"failures:all:{int(now // 60)}", 61)
    if count <= threshold:
        return 0
    if cache.add("failures:episode", 1, _EPISODE_TTL):
        return count
    cache.touch("failures:episode", _EPISODE_TTL)
    return 0
