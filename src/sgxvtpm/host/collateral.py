"""hostd's own DCAP collateral from a PCCS (``hostd --pccs URL``), kept fresh while it runs.

The collateral (TCB Info, QE Identity, PCK and root CA CRLs for the platform's
FMSPC and PCK CA) expires at its earliest nextUpdate. With ``--pccs``, hostd:

- asks the platform for a quote of its own (``PlatformBackend.platform_quote``:
  an identity no enclave has), which names the FMSPC and CA dcap-qvl's
  fetcher needs (platform/pccs.py, ``fetch_fresh``: no cache);
- takes what the PCCS answers only if it verifies that quote under the
  platform's root now (platform/dcap.py, as every handshake does) and does not
  expire before the copy it has; then the platform takes it for the enclaves
  it launches from now on (``replace_collateral``, which checks it again),
  and hostd writes the public copy clients read (``STATE/collateral.json``,
  0644, temporary file + rename);
- fetches again at 3/4 of the remaining validity (at most every
  ``--pccs-refresh`` seconds), retrying with backoff when the PCCS is down
  (:func:`next_refresh`, pure); a copy that expires meanwhile is removed, so
  nothing expired is served.

A platform that gives hostd no quote (``gramine``: a host process has no enclave
to quote for it) is refreshed without one: the FMSPC and CA come from the copy
hostd has (``pccs.collateral_key``; an expired copy will do), the fetch is by
them (``pccs.fetch_by_key``), and the PCCS's answer is taken only if it chains
to the platform's root with valid signatures and nothing expired
(``dcap.check_collateral``), names the same FMSPC and CA, and does not expire
before the copy served; the platform checks it again before it takes it
(``replace_collateral``). What only a quote can check is left to the enclaves,
which verify every quote under their pinned root (Intel's on Gramine).

At start, a PCCS that cannot give good collateral is fine while the local copy
still verifies the platform's quote; otherwise hostd refuses to start
(:class:`CollateralUnavailable`, one line). Each attempt is one JSON log
event; the PCCS URL is logged without its user information.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from sgxvtpm.errors import SgxvtpmError
from sgxvtpm.platform import dcap, pccs
from sgxvtpm.platform.base import PlatformBackend, PlatformError
from sgxvtpm.util import log
from sgxvtpm.util.durable import atomic_write

#: Refetch when this share of the remaining validity has passed.
SHARE = 0.75
#: Backoff after failed attempts: BASE_BACKOFF * 2**(failures-1), at most MAX_BACKOFF.
BASE_BACKOFF = 5.0
MAX_BACKOFF = 600.0
#: Never sooner than this (a copy about to expire is not asked for in a busy loop).
MIN_DELAY = 1.0


class CollateralUnavailable(SgxvtpmError):
    """hostd has no collateral that verifies its platform's quote: the PCCS gave none and
    the local copy is missing, expired or under another root (one line)."""


def next_refresh(
    now: float, expires: float | None, failures: int, *, max_interval: float | None = None
) -> float:
    """Seconds from ``now`` until the next fetch (all times in seconds since the epoch).

    ``expires``: the earliest nextUpdate of the copy being served (None: no copy);
    ``failures``: attempts failed since the last success. With a valid copy and no
    failure: at SHARE of the remaining validity. After failures: exponential backoff,
    but never later than SHARE of what remains of a valid copy. Without a valid copy
    and no failure yet: at once. Never later than ``max_interval``, never sooner
    than MIN_DELAY.
    """
    if failures < 0:
        raise ValueError("failures must be >= 0")
    delay = MAX_BACKOFF if failures == 0 else BASE_BACKOFF * 2.0 ** min(failures - 1, 32)
    delay = min(delay, MAX_BACKOFF)
    remaining = expires - now if expires is not None else 0.0
    if remaining > 0:
        share = SHARE * remaining
        delay = share if failures == 0 else min(delay, share)
    elif failures == 0:
        delay = 0.0
    if max_interval is not None:
        delay = min(delay, max_interval)
    return max(MIN_DELAY, delay)


def _shown(url: str) -> str:
    """The URL as logs and messages show it: without user information (a password)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass
class CollateralRefresher:
    """Fetch, check and publish the platform's collateral from the PCCS at ``url``,
    at most every ``max_interval`` seconds if given."""

    url: str
    platform: PlatformBackend
    public_copy: Path
    _: KW_ONLY
    max_interval: float | None = None
    clock: Callable[[], float] = time.time
    #: Without a platform quote: the (FMSPC, CA) fetched for, from the local copy.
    key: tuple[str, str] | None = field(default=None, init=False)
    failures: int = field(default=0, init=False)
    expires: float | None = field(default=None, init=False)  # of the copy served now
    _current: str = field(default="", init=False)  # the copy this refresher published last

    @property
    def shown_url(self) -> str:
        return _shown(self.url)

    # -- one attempt ------------------------------------------------------------
    def _check(self, collateral: str, quote: bytes) -> float:
        """The copy's expiry, if it verifies ``quote`` under the platform's root now."""
        verifier = dcap.pinned_verifier(self.platform.attestation_root_pem, collateral)
        verifier.check(quote)  # AttestationError: another root, expired, bad signature
        return pccs.expiry(collateral).timestamp()

    def _check_unquoted(self, collateral: str) -> float:
        """The copy's expiry, if it is good without a quote (see the module doc)."""
        dcap.check_collateral(self.platform.attestation_root_pem, collateral)
        key = pccs.collateral_key(collateral)
        if key != self.key:
            raise PlatformError(f"the collateral is for FMSPC {key[0]} ({key[1]} CA), not this "
                                f"platform's {self.key[0] if self.key else '?'}")
        return pccs.expiry(collateral).timestamp()

    def _quote(self) -> bytes:
        return self.platform.platform_quote(os.urandom(64))

    def _message(self, exc: BaseException) -> str:
        return " ".join(str(exc).replace(self.url.rstrip("/"), self.shown_url).split())

    def refresh(self) -> bool:
        """One attempt: fetch, check, publish. Logs one event; True if published."""
        try:
            if self.key is not None:
                collateral = pccs.fetch_by_key(self.url, *self.key)
                expires = self._check_unquoted(collateral)
            else:
                quote = self._quote()
                collateral = pccs.fetch_fresh(self.url, quote)
                expires = self._check(collateral, quote)
            if self.expires is not None and expires < self.expires and self.clock() < self.expires:
                raise PlatformError(
                    "the PCCS's collateral expires before the copy served now (an older one)"
                )
            unchanged = collateral == self._current and self.public_copy.exists()
            if not unchanged:
                self.platform.replace_collateral(collateral)
                atomic_write(self.public_copy, collateral.encode(), 0o644)
        except (pccs.PccsError, PlatformError, OSError, ValueError) as exc:
            self.failures += 1
            log.log("hostd.collateral_refresh_failed", level="warning", pccs=self.shown_url,
                    reason=self._message(exc), failures=self.failures,
                    serving_until=_iso(self.expires))
            return False
        self.failures = 0
        self.expires = expires
        self._current = collateral
        log.log("hostd.collateral_refreshed", pccs=self.shown_url, expires=_iso(expires),
                unchanged=unchanged,
                collateral_sha256=hashlib.sha256(collateral.encode()).hexdigest())
        return True

    def local_expiry(self) -> float:
        """The expiry of the public copy, if it verifies the platform's quote now;
        CollateralUnavailable (why) if not."""
        try:
            collateral = self.public_copy.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CollateralUnavailable(f"no local copy ({exc.__class__.__name__}: "
                                        f"{self.public_copy})") from None
        try:
            if self.key is not None:
                return self._check_unquoted(collateral)
            return self._check(collateral, self._quote())
        except (pccs.PccsError, PlatformError, ValueError) as exc:
            raise CollateralUnavailable(f"the local copy {self.public_copy} does not verify "
                                        f"the platform's quote: {self._message(exc)}") from None

    def start(self) -> None:
        """At hostd's start: fetch once; keep a local copy that still verifies if the PCCS
        gives nothing good; CollateralUnavailable (one line) if neither, or if the
        platform gives hostd no quote and no copy names what to fetch."""
        try:
            self._quote()
        except PlatformError as exc:
            self._without_quote(exc)
        if self.refresh():
            return
        try:
            self.expires = self.local_expiry()
        except CollateralUnavailable as exc:
            raise CollateralUnavailable(
                f"PCCS {self.shown_url} gave no collateral for this platform, and {exc}"
            ) from None
        log.log("hostd.collateral_kept", level="warning", expires=_iso(self.expires),
                reason="the PCCS gave nothing usable; serving the local copy until it expires")

    def _without_quote(self, why: PlatformError) -> None:
        """Fetch by the FMSPC and CA of the local copy from now on (gramine)."""
        try:
            self.key = pccs.collateral_key(self.public_copy.read_text())
        except (OSError, UnicodeDecodeError, pccs.PccsError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise CollateralUnavailable(
                f"--pccs: {self._message(why)}, and no local copy {self.public_copy} names "
                f"the FMSPC and PCK CA to fetch: {reason}"
            ) from None
        log.log("hostd.collateral_key", fmspc=self.key[0], ca=self.key[1],
                source=str(self.public_copy), reason="the platform gives hostd no quote")

    # -- the background task -------------------------------------------------------
    def delay(self) -> float:
        return next_refresh(self.clock(), self.expires, self.failures,
                            max_interval=self.max_interval)

    async def run(self) -> None:
        """Refresh until cancelled; remove the public copy once it expires unrefreshed."""
        while True:
            delay = self.delay()
            if self.expires is not None:
                delay = min(delay, max(0.0, self.expires - self.clock()))
            log.log("hostd.collateral_next_refresh", level="debug", seconds=round(delay, 3))
            await asyncio.sleep(delay)
            if self.expires is not None and self.clock() >= self.expires:
                self._expired()
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # refresh() logs what it expects; keep the task alive
                self.failures += 1
                log.log("hostd.collateral_refresh_failed", level="error", pccs=self.shown_url,
                        reason=self._message(exc), failures=self.failures,
                        serving_until=_iso(self.expires))

    def _expired(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.public_copy.unlink()
        log.log("hostd.collateral_expired", level="error", expired=_iso(self.expires),
                pccs=self.shown_url, effect="no collateral served until the PCCS answers")
        self.expires = None


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
