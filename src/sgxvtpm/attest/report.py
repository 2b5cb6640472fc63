"""The verifier's result: each check, its outcome, and a one-screen rendering."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Check:
    """One verification step. ``passed`` is None when it could not be run."""

    name: str
    passed: bool | None
    detail: str = ""

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


@dataclass
class AttestReport:
    """What :func:`~sgxvtpm.attest.verify.verify_ek_chain` found.

    ``ok`` is True only if every check ran and passed; ``reason`` is the
    first failure's reason (empty when ok). ``facts`` holds what was learned
    on the way (MRENCLAVE, EK algorithm, TPM attributes) for the report.
    """

    checks: list[Check] = field(default_factory=list)
    reason: str = ""
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.reason

    def add(self, name: str, passed: bool | None, detail: str = "", reason: str = "") -> bool:
        """Record a check; the first failing one sets ``reason`` (default: its name)."""
        self.checks.append(Check(name, passed, detail))
        if passed is False and not self.reason:
            self.reason = reason or f"{name}: failed"
        return bool(passed)

    def to_json(self) -> dict[str, object]:
        """The report as JSON: ``ok``, ``reason``, ``facts`` and each check
        (``passed`` is null for a check that could not be run)."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "facts": dict(self.facts),
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail}
                       for c in self.checks],
        }

    def render(self) -> str:
        """A report that fits on one screen (under 25 lines of 100 columns)."""
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"sgxvtpm attestation: {verdict}"]
        if self.reason:
            lines.append(f"reason: {self.reason}")
        lines += [f"  {k:<14} {v}" for k, v in self.facts.items()]
        for c in self.checks:
            detail = f" - {c.detail}" if c.detail else ""
            lines.append(f"  [{c.mark}] {c.name}{detail}"[:100])
        return "\n".join(lines) + "\n"
