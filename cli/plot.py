"""The report's plots (matplotlib, Agg backend: no display needed): one move's timeline, and
a drain's or rebalance's bytes per shard before and after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from activities.models import Direction
from cli.report_models import FleetReport, Mark, MoveReport

_MIB = 1024 * 1024
_MARK_STYLE = {
    "verify.start": ("tab:green", "--"), "verify.done": ("tab:green", ":"),
    "cutover.start": ("tab:red", "--"), "cutover.commit": ("tab:red", "-"),
    "cutover.undone": ("tab:orange", ":"), "cutover.failed": ("tab:orange", ":"),
    "cutover.resolved": ("tab:purple", ":"), "finish": ("black", "-"),
}


def _label(m: Mark) -> str:
    if m.name == "cutover.commit" and m.value is not None:
        return f"cutover commit (pause {m.value:.1f} ms)"
    if m.name.startswith("cutover.") and m.detail and m.detail.startswith(Direction.REVERSE):
        return "rollback " + m.name.removeprefix("cutover.")
    if m.name == "finish" and m.detail:
        return f"finish: {m.detail}"
    return m.name.replace(".", " ")


def plot_move(r: MoveReport, path: Path) -> None:
    """Rows copied per second, replication lag, the phases, verify and cutover marks and the
    pause, over seconds since the move started."""
    fig, (ax_rows, ax_lag) = plt.subplots(2, 1, sharex=True, figsize=(11, 7),
                                          constrained_layout=True)
    try:
        title = (f"{r.move_kind} {r.collection}/{r.chunk_id}: {r.source} -> {r.target} "
                 f"({r.outcome or 'running: ' + r.phase})")
        fig.suptitle(f"{title}\n{r.migration_id}", fontsize=10)

        # Each sample's rate is the average since the sample before it: a bar over that span.
        rates = [(prev.t, c.t, c.rate) for prev, c in zip(r.copy_samples, r.copy_samples[1:],
                                                           strict=False) if c.rate is not None]
        if rates:
            ax_rows.bar([t0 for t0, _, _ in rates], [v for _, _, v in rates],
                        width=[max(t1 - t0, 0.02) for t0, t1, _ in rates], align="edge",
                        color="tab:blue", alpha=0.7, label="rows copied per second")
        ax_rows.set_ylabel("rows / s")
        rows = [(c.t, c.rows) for c in r.copy_samples if c.rows is not None]
        if rows:
            total = ax_rows.twinx()
            total.plot([t for t, _ in rows], [v for _, v in rows], color="tab:gray",
                       linewidth=1, marker=".", label="rows on the target")
            total.set_ylabel("rows on the target")
            total.set_ylim(bottom=0)
        if not rates and not rows:
            ax_rows.text(0.5, 0.5, "no copy samples", transform=ax_rows.transAxes,
                         ha="center", va="center", color="gray")
        ax_rows.set_ylim(bottom=0)
        ax_rows.legend(loc="upper right", fontsize=8)

        for direction, word, color in ((Direction.FORWARD, "forward", "tab:purple"),
                                       (Direction.REVERSE, "reverse", "tab:brown")):
            pts = [p for p in r.lag_samples if p.direction == direction and p.lag_bytes is not None]
            if pts:
                ax_lag.plot([p.t for p in pts], [(p.lag_bytes or 0) / 1024 for p in pts],
                            color=color, marker=".", label=f"lag {word} (KiB)")
        ax_lag.set_ylabel("replication lag (KiB)")
        ax_lag.set_ylim(bottom=0)
        secs = [(p.t, p.lag_s) for p in r.lag_samples if p.lag_s is not None]
        if secs:
            lag_s = ax_lag.twinx()
            lag_s.plot([t for t, _ in secs], [v * 1000 for _, v in secs], color="tab:olive",
                       linewidth=1, linestyle="--", label="commit lag (ms)")
            lag_s.set_ylabel("commit lag (ms)")
            lag_s.set_ylim(bottom=0)
        if not r.lag_samples:
            ax_lag.text(0.5, 0.5, "no lag samples", transform=ax_lag.transAxes,
                        ha="center", va="center", color="gray")
        ax_lag.set_xlabel("seconds since the move started")

        # Phases as alternating bands with their names; marks as vertical lines.
        for i, p in enumerate(r.phases):
            t0 = (p.started_at - r.started_at).total_seconds()
            t1 = t0 + (p.seconds if p.seconds is not None else max(r.seconds - t0, 0.0))
            for ax in (ax_rows, ax_lag):
                ax.axvspan(t0, t1, color="tab:gray", alpha=0.06 if i % 2 else 0.13, lw=0)
            ax_rows.text(t0, 1.0, p.phase, transform=ax_rows.get_xaxis_transform(),
                         fontsize=7, rotation=90, va="top", ha="right", color="dimgray")
        seen: set[str] = set()
        for m in r.marks:
            style = _MARK_STYLE.get(m.name)
            if style is None:
                continue
            color, line = style
            label = _label(m)
            for ax in (ax_rows, ax_lag):
                ax.axvline(m.t, color=color, linestyle=line, linewidth=1.2,
                           label=label if ax is ax_lag and label not in seen else None)
            seen.add(label)
            if m.name == "cutover.commit" and m.value is not None:
                # The pause: from the freeze to the commit (often too short to see as a band).
                start = m.t - m.value / 1000.0
                for ax in (ax_rows, ax_lag):
                    ax.axvspan(start, m.t, color="tab:red", alpha=0.3, lw=0)
        ax_lag.legend(loc="upper left", fontsize=7)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_fleet(r: FleetReport, path: Path) -> None:
    """Bytes per shard before and after a drain or rebalance, side by side."""
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(r.shards) + 3), 5),
                           constrained_layout=True)
    try:
        names = [s.shard for s in r.shards]
        xs = range(len(names))
        width = 0.38
        before = [(s.before or 0) / _MIB for s in r.shards]
        after = [(s.after or 0) / _MIB for s in r.shards]
        ax.bar([x - width / 2 for x in xs], before, width, label="before", color="tab:blue")
        ax.bar([x + width / 2 for x in xs], after, width, label="after", color="tab:orange")
        ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("MiB (live documents, estimated)")
        ax.set_title(f"{r.kind} {r.operation_id}: bytes per shard"
                     + (f" ({r.status})" if r.status else "") + f", {len(r.moves)} moves",
                     fontsize=10)
        if not names:
            ax.text(0.5, 0.5, "no loads recorded", transform=ax.transAxes, ha="center",
                    va="center", color="gray")
        ax.legend()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


__all__ = ["plot_fleet", "plot_move"]
