"""Results: one record per scenario, the ratios against their targets, a text table and
the JSON document written by --json-out."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import LoadResult, as_dict

TARGET_USE_OVER_BARE = 0.7
TARGET_USE_OVER_NAIVE = 4.0
TARGET_BATCH_CONSUMES_PER_S = 100_000.0

LABELS = {
    "bare": "bare aiohttp JSON (ceiling)",
    "naive": "naive: Postgres proc, 1 hot row",
    "use": "POST /use, sidecar alone",
    "batch": "POST /use/batch, sidecar alone",
    "dev-use": "POST /use, credits dev topology",
    "dev-batch": "POST /use/batch, credits dev topology",
}


@dataclass
class ScenarioResult:
    name: str
    url: str
    items_per_request: int  # consumes per successful request (0: not a charge)
    load: LoadResult
    warmup: LoadResult | None
    server_cpu_pct: float  # the server process, % of one core, measured window
    backend: str  # "redis", "postgres" or ""
    backend_cpu_pct: float | None
    verified: bool | None  # None: nothing to verify (bare)
    verification: str
    facts: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None
    host_busy_pct: float = 0.0  # the whole machine, % of one core, measured window

    @property
    def other_cpu_pct(self) -> float:
        """CPU the machine spent outside the server, its backend and the generator."""
        ours = self.server_cpu_pct + (self.backend_cpu_pct or 0.0) + self.load.client_cpu_pct
        return max(0.0, self.host_busy_pct - ours)

    @property
    def rps(self) -> float:
        return self.load.rps

    @property
    def consumes_per_s(self) -> float | None:
        if not self.items_per_request:
            return None
        return self.load.ok * self.items_per_request / self.load.duration_s if self.load.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.load.errors + (self.warmup.errors if self.warmup else 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": LABELS.get(self.name, self.name),
            "url": self.url,
            "items_per_request": self.items_per_request,
            "requests_per_s": round(self.rps, 1),
            "consumes_per_s": None if self.consumes_per_s is None else round(self.consumes_per_s, 1),
            "p50_ms": round(self.load.p50_ms, 3),
            "p99_ms": round(self.load.p99_ms, 3),
            "errors": self.errors,
            "server_cpu_pct": round(self.server_cpu_pct, 1),
            "backend": self.backend or None,
            "backend_cpu_pct": None if self.backend_cpu_pct is None else round(self.backend_cpu_pct, 1),
            "client_cpu_pct": round(self.load.client_cpu_pct, 1),
            "host_busy_pct": round(self.host_busy_pct, 1),
            "other_cpu_pct": round(self.other_cpu_pct, 1),
            "verified": self.verified,
            "verification": self.verification,
            "facts": self.facts,
            "load": as_dict(self.load),
            "warmup": as_dict(self.warmup) if self.warmup else None,
            "profile": self.profile,
        }


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    target: float
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value >= self.target


def ratios(results: dict[str, ScenarioResult]) -> list[Ratio]:
    use, bare, naive, batch = (results.get(k) for k in ("use", "bare", "naive", "batch"))
    dev_use, dev_batch = results.get("dev-use"), results.get("dev-batch")
    return [
        Ratio(
            "use / bare (requests/s)", use.rps / bare.rps if use and bare and bare.rps else None, TARGET_USE_OVER_BARE
        ),
        Ratio(
            "use / naive (requests/s)",
            use.rps / naive.rps if use and naive and naive.rps else None,
            TARGET_USE_OVER_NAIVE,
        ),
        Ratio(
            "batch consumes/s",
            batch.consumes_per_s if batch else None,
            TARGET_BATCH_CONSUMES_PER_S,
            unit="/s",
        ),
        Ratio(
            "dev-use / bare (requests/s)",
            dev_use.rps / bare.rps if dev_use and bare and bare.rps else None,
            TARGET_USE_OVER_BARE,
        ),
        Ratio(
            "dev-use / naive (requests/s)",
            dev_use.rps / naive.rps if dev_use and naive and naive.rps else None,
            TARGET_USE_OVER_NAIVE,
        ),
        Ratio(
            "dev-batch consumes/s",
            dev_batch.consumes_per_s if dev_batch else None,
            TARGET_BATCH_CONSUMES_PER_S,
            unit="/s",
        ),
    ]


def _num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def table(results: dict[str, ScenarioResult]) -> str:
    head = (
        f"{'scenario':34} {'req/s':>10} {'consumes/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'srv cpu':>7} {'backend cpu':>15} {'client cpu':>10}  verified"
    )
    lines = [head, "-" * len(head)]
    for name in LABELS:
        r = results.get(name)
        if r is None:
            continue
        backend = f"{r.backend} {r.backend_cpu_pct:.0f}%" if r.backend and r.backend_cpu_pct is not None else "-"
        verified = "-" if r.verified is None else ("yes" if r.verified else "FAILED")
        lines.append(
            f"{LABELS[name]:34} {_num(r.rps):>10} {_num(r.consumes_per_s):>12} {r.load.p50_ms:>8.2f}"
            f" {r.load.p99_ms:>8.2f} {r.errors:>6} {r.server_cpu_pct:>6.0f}% {backend:>15}"
            f" {r.load.client_cpu_pct:>9.0f}%  {verified}"
        )
    lines.append("")
    for ratio in ratios(results):
        if ratio.value is None:
            lines.append(f"{ratio.name:34} {'-':>10}   (scenario not run)")
            continue
        value = f"{ratio.value:,.0f}{ratio.unit}" if ratio.unit == "/s" else f"{ratio.value:.2f}{ratio.unit}"
        target = f">= {ratio.target:,.0f}{ratio.unit}" if ratio.unit == "/s" else f">= {ratio.target:g}{ratio.unit}"
        lines.append(f"{ratio.name:34} {value:>10}   target {target:<12} {'met' if ratio.met else 'MISSED'}")
    return "\n".join(lines)


def document(results: dict[str, ScenarioResult], meta: dict[str, Any], valid: bool) -> dict[str, Any]:
    return {
        "meta": meta,
        "valid": valid,
        "scenarios": {name: r.as_dict() for name, r in results.items()},
        "ratios": [
            {"name": r.name, "value": r.value, "target": r.target, "met": r.met, "unit": r.unit}
            for r in ratios(results)
        ],
    }


def write_json(path: pathlib.Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
