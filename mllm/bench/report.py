"""Figures and their report: results.json and a Markdown table (figure, baseline, ratio, target).

    results.json = {"meta": {...machine, threads, load, wall_s...},
                    "figures": [{"section", "name", "unit", "value", "best", "baseline_name", "baseline",
                                 "baseline_best", "ratio", "ratio_best", "target", "target_on", "met", "note"}, ...]}

`value` and `baseline` come from medians over the repeats, `best` and `baseline_best` from minima.
`ratio` = value / baseline. A target is a lower bound on `ratio` (or on `value` where `target_on`
says so); `met` is null where none is set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mllm.bench.timing import Timing
from mllm.files import atomic_write

SCHEMA = 1


@dataclass
class Figure:
    section: str  # e.g. "training"
    name: str  # what was measured
    unit: str  # of value and baseline
    value: float  # median-based
    best: float | None = None  # min-based
    baseline_name: str = ""
    baseline: float | None = None
    baseline_best: float | None = None
    target: float | None = None  # a lower bound on `ratio` (or on `value`, with target_on="value")
    target_on: str = "ratio"  # "ratio" | "value"
    note: str = ""  # how it was measured; for a missed target, the profiled reason

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.value / self.baseline

    @property
    def ratio_best(self) -> float | None:
        return None if not self.baseline_best or self.best is None else self.best / self.baseline_best

    @property
    def met(self) -> bool | None:
        checked = self.value if self.target_on == "value" else self.ratio
        return None if self.target is None or checked is None else checked >= self.target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio, "ratio_best": self.ratio_best, "met": self.met}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Figure":
        return cls(**{k: v for k, v in data.items() if k not in ("ratio", "ratio_best", "met")})


def rate_figure(section: str, name: str, unit: str, work: float, candidate: Timing, baseline_name: str = "",
                baseline: Timing | None = None, baseline_work: float | None = None, **kwargs) -> Figure:
    """A throughput figure (work per second) from timings; the baseline may do other work (`baseline_work`)."""
    value, best = candidate.rate(work)
    base, base_best = baseline.rate(work if baseline_work is None else baseline_work) if baseline else (None, None)
    return Figure(section, name, unit, value, best, baseline_name, base, base_best, **kwargs)


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)

    @property
    def missed(self) -> list[Figure]:
        return [f for f in self.figures if f.met is False]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": self.meta, "figures": [f.to_dict() for f in self.figures]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Results":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"results schema {data.get('schema')!r}, expected {SCHEMA}")
        return cls(data["meta"], [Figure.from_dict(f) for f in data["figures"]])

    def write(self, out: Path) -> tuple[Path, Path]:
        """out/results.json and out/results.md, each written whole, flushed, then renamed into place."""
        out.mkdir(parents=True, exist_ok=True)
        paths = out / "results.json", out / "results.md"
        for path, text in zip(paths, (json.dumps(self.to_dict(), indent=2) + "\n", markdown(self))):
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        return paths


def number(x: float | None) -> str:
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def times(ratio: float | None) -> str:
    """Two decimals; two significant digits below 0.1, where two decimals would print an audio real-time
    factor of 0.0027 as 0.00×."""
    if ratio is None:
        return ""
    return f"{ratio:.2f}×" if abs(ratio) >= 0.1 else f"{ratio:.2g}×"


def missed(f: Figure) -> str:
    if f.target_on == "value":
        return f"{number(f.value)} < {f.target:g}"
    return f"{times(f.ratio)} < {f.target:g}×"


def markdown(results: Results) -> str:
    """The table, then the missed targets with their reasons, then the notes."""
    meta = results.meta
    lines = [
        f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, torch {meta.get('torch', '?')}, "
        f"{meta.get('threads', '?')} threads, load average {meta.get('load', '?')} at the start; "
        f"{'--quick, ' if meta.get('quick') else ''}{meta.get('wall_s', 0):.0f} s in all.",
        "",
        "| section | figure | value (median) | best | baseline (median) | ratio | best ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in results.figures:
        base = f"{f.baseline_name}: {number(f.baseline)}" if f.baseline is not None else f.baseline_name
        on = "" if f.target_on == "ratio" else "value "
        target = "" if f.target is None else f"{on}≥ {f.target:g} {'met' if f.met else '**missed**'}"
        lines.append(f"| {f.section} | {f.name} | {number(f.value)} {f.unit} | {number(f.best)} | {base} | "
                     f"{times(f.ratio)} | {times(f.ratio_best)} | {target} |")
    lines += ["", "Targets missed:" if results.missed else "Every target was met."]
    lines += [f"- {f.section} / {f.name}: {missed(f)}. {f.note}" for f in results.missed]
    notes = [f for f in results.figures if f.note and f.met is not False]
    if notes:
        lines += ["", "Notes:"] + [f"- {f.section} / {f.name}: {f.note}" for f in notes]
    return "\n".join(lines) + "\n"
