"""Turn a benchmark run into Markdown tables, JSON and a PNG plot.

Every figure is the median over rounds, with the spread (min-max) beside the
key ones.  A ratio "÷ X" is computed per round, from the two systems measured
in that same round, and the median of those per-round ratios is shown: a
ratio of two figures taken minutes apart on a noisy machine would mix in the
drift the interleaving is there to cancel.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from run import Measurement, RunResult, Scenario

__all__ = ["markdown", "plot", "to_json"]

Getter = Callable[["Measurement"], "float | None"]

# An en dash, spelled as an escape so the source stays ASCII-unambiguous.
DASH = "\u2013"


# --------------------------------------------------------------------------
# What is shown per mode: (column title, getter, higher is better).


def _rps(m: Measurement) -> float | None:
    return m.rps


def _mbps(m: Measurement) -> float | None:
    return m.mb_per_s


def _p50(m: Measurement) -> float | None:
    return m.p50_us


def _p99(m: Measurement) -> float | None:
    return m.p99_us


def _cpu(m: Measurement) -> float | None:
    return m.cpu_us_per_req


def _kib(m: Measurement) -> float | None:
    return m.kib_per_conn


def _rss_before(m: Measurement) -> float | None:
    return m.rss_before_kib / 1024 if m.rss_before_kib is not None else None


def _rss_holding(m: Measurement) -> float | None:
    return m.rss_holding_kib / 1024 if m.rss_holding_kib is not None else None


def throughput_getter(mode: str) -> Getter:
    return _mbps if mode == "bulk" else _rps


def cost_getter(mode: str) -> Getter:
    """The per-unit cost figure: CPU per request, or memory per connection."""
    return _kib if mode == "idle" else _cpu


# --------------------------------------------------------------------------
# Aggregation.


def _by_round(
    result: RunResult, system: str, scenario: str, get: Getter
) -> dict[int, float]:
    out: dict[int, float] = {}
    for m in result.measurements:
        if m.system == system and m.scenario == scenario and m.error is None:
            value = get(m)
            if value is not None:
                out[m.round] = value
    return out


def _stats(values: Sequence[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _ratio(
    result: RunResult, system: str, ref: str, scenario: str, get: Getter
) -> float | None:
    """Median over rounds of system/ref, each pair from the same round."""
    mine = _by_round(result, system, scenario, get)
    theirs = _by_round(result, ref, scenario, get)
    ratios = [mine[r] / theirs[r] for r in mine if r in theirs and theirs[r] > 0]
    return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------
# Formatting.


def fmt(value: float | None) -> str:
    if value is None:
        return DASH
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_spread(stats: tuple[float, float, float] | None) -> str:
    if stats is None:
        return DASH
    med, lo, hi = stats
    return f"{fmt(med)} ({fmt(lo)}{DASH}{fmt(hi)})"


def fmt_ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _bg(m: Measurement) -> float | None:
    return m.background_cpu


def fmt_bg(result: RunResult, system: str, scenario: str) -> str:
    """The worst background load over rounds, flagged when it is high."""
    values = _by_round(result, system, scenario, _bg).values()
    if not values:
        return DASH
    worst = max(values)
    return f"**{worst:.2f}** !" if worst >= result.quiet_threshold else f"{worst:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append(
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"
    )
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _measured(result: RunResult) -> list[str]:
    return [s.name for s in result.systems if s.name not in result.skipped]


def _labels(result: RunResult) -> dict[str, str]:
    return {s.name: s.label for s in result.systems}


def _refs(result: RunResult) -> list[tuple[str, str]]:
    present = set(_measured(result))
    return [(name, short) for name, short in result.references if name in present]


# --------------------------------------------------------------------------
# Markdown.


def _summary(
    result: RunResult,
    title: str,
    get_for: Callable[[str], Getter],
    ref: str | None,
    modes: Sequence[str] | None = None,
) -> list[str]:
    """One row per system, one column per scenario (of *modes*, if given)."""
    labels = _labels(result)
    scenarios = [sc for sc in result.scenarios if modes is None or sc.mode in modes]
    if not scenarios:
        return []
    header = ["system", *(s.name for s in scenarios)]
    rows = []
    for name in _measured(result):
        row = [labels[name]]
        for sc in scenarios:
            get = get_for(sc.mode)
            if ref is None:
                st = _stats(list(_by_round(result, name, sc.name, get).values()))
                row.append(fmt(st[0]) if st else DASH)
            else:
                row.append(fmt_ratio(_ratio(result, name, ref, sc.name, get)))
        rows.append(row)
    return [f"### {title}", "", *_table(header, rows), ""]


def _scenario_section(result: RunResult, sc: Scenario) -> list[str]:
    labels = _labels(result)
    refs = _refs(result)
    lines = [f"### {sc.name}: {sc.title()}", ""]
    rows: list[list[str]] = []
    if sc.mode == "idle":
        header = ["system", "KiB/conn", "RSS before MiB", "RSS holding MiB"]
        header += [f"KiB/conn ÷ {short}" for _, short in refs]
        for name in _measured(result):
            kib = _stats(list(_by_round(result, name, sc.name, _kib).values()))
            before = _stats(
                list(_by_round(result, name, sc.name, _rss_before).values())
            )
            hold = _stats(list(_by_round(result, name, sc.name, _rss_holding).values()))
            row = [
                labels[name],
                fmt_spread(kib),
                fmt(before[0]) if before else DASH,
                fmt(hold[0]) if hold else DASH,
            ]
            row += [fmt_ratio(_ratio(result, name, r, sc.name, _kib)) for r, _ in refs]
            row.append(fmt_bg(result, name, sc.name))
            rows.append(row)
    else:
        unit = "MB/s" if sc.mode == "bulk" else "req/s"
        thr = throughput_getter(sc.mode)
        header = [
            "system",
            unit,
            "p50 µs",
            "p99 µs",
            "CPU µs/req",
            *(f"CPU ÷ {short}" for _, short in refs),
            *(f"{unit} ÷ {short}" for _, short in refs),
        ]
        for name in _measured(result):
            row = [
                labels[name],
                fmt_spread(
                    _stats(list(_by_round(result, name, sc.name, thr).values()))
                ),
                fmt(_med(result, name, sc.name, _p50)),
                fmt_spread(
                    _stats(list(_by_round(result, name, sc.name, _p99).values()))
                ),
                fmt_spread(
                    _stats(list(_by_round(result, name, sc.name, _cpu).values()))
                ),
            ]
            row += [fmt_ratio(_ratio(result, name, r, sc.name, _cpu)) for r, _ in refs]
            row += [fmt_ratio(_ratio(result, name, r, sc.name, thr)) for r, _ in refs]
            row.append(fmt_bg(result, name, sc.name))
            rows.append(row)
    header.append("others' CPU")
    return [*lines, *_table(header, rows), ""]


def _med(result: RunResult, system: str, scenario: str, get: Getter) -> float | None:
    st = _stats(list(_by_round(result, system, scenario, get).values()))
    return st[0] if st else None


def markdown(result: RunResult, *, image: str | None = None) -> str:
    p = result.profile
    env = result.environment
    mib = 1 << 20
    out = [
        f"# ds_trio benchmark: {result.started} ({p.name} profile)",
        "",
        f"{p.rounds} rounds, system order rotated each round; "
        f"wall time {result.wall_s / 60:.1f} min.  "
        f"pingpong: {p.warmup_s:g} s warm-up then {p.duration_s:g} s measured, "
        f"64-byte lines; bulk: {p.bulk_total // mib} MiB in "
        f"{p.bulk_size // 1024} KiB responses; "
        f"idle: {p.idle_conns:,} connections held.",
        "",
        f"Machine: {env.get('cpu', '?')}, {env.get('cpus', '?')} CPUs, "
        f"Linux {env.get('kernel', '?')}; Python {env.get('python', '?')}, "
        f"{env.get('cc', '?')}, Perl {env.get('perl', '?')}.  "
        f"Pinning: {env.get('pinning', '?')}.  RLIMIT_NOFILE {env.get('nofile', '?')}.",
        "",
        f"Figures are medians over rounds, with (min{DASH}max) where shown.  "
        "**CPU µs/req** is the server process's CPU time (user+system, all "
        "threads) during the measured window divided by the requests completed "
        "in it; for bulk a request is one "
        f"{p.bulk_size // 1024} KiB response.  "
        "**÷ X** columns are the median of per-round ratios to system X from the "
        "same round: for CPU and KiB/conn, 2.00 means twice X's cost; for "
        "throughput, 2.00 means twice X's rate.  This is a noisy 2-core "
        "machine: compare ratios within one run, not absolute numbers across "
        "runs.",
        "",
    ]
    bg = [m.background_cpu for m in result.measurements if m.background_cpu is not None]
    if bg:
        noisy = sum(1 for b in bg if b >= result.quiet_threshold)
        out += [
            f"Others' CPU (used by neither the server nor the load generator, in "
            f"CPUs) during the measurements: median {statistics.median(bg):.2f}, "
            f"max {max(bg):.2f}; {noisy} of {len(bg)} measurements at or above "
            f'{result.quiet_threshold:g} (marked **!** in the "others\' CPU" '
            "column, which shows the worst round).",
            "",
        ]
    if image:
        out += [f"![results]({image})", ""]
    refs = _refs(result)
    out += ["## Summary", ""]
    out += _summary(
        result,
        "Server cost per unit: CPU µs per request (idle: KiB per connection)",
        cost_getter,
        None,
    )
    for ref, short in refs:
        out += _summary(
            result, f"Cost ratio to {short} (lower is cheaper)", cost_getter, ref
        )
    out += _summary(
        result,
        "Throughput: req/s (bulk: MB/s)",
        throughput_getter,
        None,
        modes=("pingpong", "bulk"),
    )
    out += ["## Scenarios", ""]
    for sc in result.scenarios:
        out += _scenario_section(result, sc)
    if result.skipped:
        out += ["## Skipped systems", ""]
        labels = _labels(result)
        out += [
            f"- **{labels.get(n, n)}** (`{n}`): {why}"
            for n, why in result.skipped.items()
        ]
        out.append("")
    failures = [m for m in result.measurements if m.error]
    if failures:
        out += ["## Failed measurements", ""]
        out += [
            f"- round {m.round}, `{m.system}`, {m.scenario}: {m.error}"
            for m in failures
        ]
        out.append("")
    out += ["## Round order", ""]
    out += [f"{i}. {' → '.join(o)}" for i, o in enumerate(result.orders, 1)]
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------
# JSON.


def to_json(result: RunResult) -> str:
    return json.dumps(dataclasses.asdict(result), indent=1, ensure_ascii=False)


# --------------------------------------------------------------------------
# Plot.


def plot(result: RunResult, path: Path) -> bool:
    """Bars per scenario: throughput on top, cost below.  False if no
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display here, and none wanted
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = _measured(result)
    labels = _labels(result)
    # idle has no throughput panel: put it last so the first column, which
    # carries the system names, has both panels
    scenarios = sorted(result.scenarios, key=lambda sc: sc.mode == "idle")
    if not names or not scenarios:
        return False
    fig, axes = plt.subplots(
        2,
        len(scenarios),
        figsize=(3.6 * len(scenarios) + 1.5, 1.0 + 0.32 * len(names) * 2 + 1.5),
        squeeze=False,
    )
    ys = list(range(len(names)))
    for col, sc in enumerate(scenarios):
        panels: list[tuple[Getter | None, str]] = [
            (None, "")
            if sc.mode == "idle"
            else (
                throughput_getter(sc.mode),
                "MB/s" if sc.mode == "bulk" else "req/s",
            ),
            (
                cost_getter(sc.mode),
                "KiB per conn" if sc.mode == "idle" else "server CPU µs/req",
            ),
        ]
        for row, (get, unit) in enumerate(panels):
            ax = axes[row][col]
            if get is None:
                ax.axis("off")
                continue
            med, lo, hi = [], [], []
            for name in names:
                st = _stats(list(_by_round(result, name, sc.name, get).values()))
                m, a, b = st if st else (0.0, 0.0, 0.0)
                med.append(m)
                lo.append(m - a)
                hi.append(b - m)
            ax.barh(ys, med, xerr=[lo, hi], color="C0" if row == 0 else "C1", capsize=2)
            for y, value in zip(ys, med, strict=True):
                ax.annotate(
                    fmt(value),
                    (0, y),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                    bbox={
                        "boxstyle": "round,pad=0.1",
                        "fc": "white",
                        "alpha": 0.7,
                        "lw": 0,
                    },
                )
            ax.set_yticks(ys)
            ax.set_yticklabels(
                [labels[n] for n in names] if col == 0 else [], fontsize=8
            )
            ax.invert_yaxis()
            ax.set_xlabel(unit, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.3)
            if row == 0 or sc.mode == "idle":
                ax.set_title(sc.title(), fontsize=9)
    fig.suptitle(
        f"ds_trio bench {result.started} ({result.profile.name}, "
        f"{result.profile.rounds} rounds; bars: median, whiskers: min{DASH}max)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
