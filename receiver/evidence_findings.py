"""What the evidence verifier reports: findings naming the part, bounded in number.

A :class:`Finding` is a failed check (``error``) or a fact worth telling (a
warning) about one part of a bundle (a member's name, ``camera <id>``,
``selection``, ...). :class:`VerifyReport` collects them for
:func:`receiver.evidence_verify.verify_bundle`, listing at most
:data:`MAX_FINDINGS_PER_PART` per part and :data:`MAX_FINDINGS` in all; the
rest are counted, and :meth:`VerifyReport.finish` says how many.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

__all__ = ["MAX_FINDINGS", "MAX_FINDINGS_PER_PART", "Finding", "VerifyReport", "iso"]

#: Findings listed per part (then one saying how many more), and in all.
MAX_FINDINGS_PER_PART: Final = 20
MAX_FINDINGS: Final = 2000


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem (``error``) or fact worth telling (a warning), and the part it concerns."""

    part: str
    what: str
    error: bool = True

    def __str__(self) -> str:
        return f"{'FAILED' if self.error else 'warning'}: {self.part}: {self.what}"


@dataclass(slots=True)
class VerifyReport:
    """What :func:`receiver.evidence_verify.verify_bundle` found."""

    findings: list[Finding] = field(default_factory=list)
    session: str | None = None
    frames: int = 0
    frames_verified: int = 0
    checkpoints: int = 0
    files: int = 0
    #: Findings listed per part, and those not listed: part -> [errors, warnings].
    _listed: Counter[str] = field(default_factory=Counter, repr=False)
    _unlisted: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.errors and not any(e for e, _ in self._unlisted.values())

    def fail(self, part: str, what: str) -> None:
        self._add(Finding(part, what))

    def warn(self, part: str, what: str) -> None:
        self._add(Finding(part, what, error=False))

    def _add(self, finding: Finding) -> None:
        if self._listed[finding.part] < MAX_FINDINGS_PER_PART and len(self.findings) < MAX_FINDINGS:
            self._listed[finding.part] += 1
            self.findings.append(finding)
            return
        counts = self._unlisted.setdefault(finding.part, [0, 0])
        counts[0 if finding.error else 1] += 1

    def finish(self) -> None:
        """Say how many findings were not listed (each part's, then those of parts with
        none listed)."""
        unlisted, self._unlisted = self._unlisted, {}
        rest = [0, 0, 0]
        for part, (errors, warnings) in sorted(unlisted.items()):
            if self._listed[part]:
                self.findings.append(
                    Finding(
                        part, f"and {errors + warnings} more like these, not listed", errors > 0
                    )
                )
            else:
                rest = [rest[0] + errors, rest[1] + warnings, rest[2] + 1]
        if rest[2]:
            self.findings.append(
                Finding(
                    "bundle",
                    f"and {rest[0] + rest[1]} more findings about {rest[2]} more parts, not listed",
                    rest[0] > 0,
                )
            )


def iso(us: int) -> str:
    """A time in µs since the epoch, as ISO-8601 UTC (or as µs, if no date can say it)."""
    try:
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{us} µs after 1970"
