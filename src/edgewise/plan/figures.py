"""Figures for the architecture document, drawn with matplotlib (Agg backend, PNG files).

matplotlib is imported inside `draw_all`, so importing the planner (or running `edgewise run`)
never pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIGURES = ("topology.png", "latency.png", "bandwidth.png", "backlog.png")


def draw_all(plan: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _topology(plt, plan, out / "topology.png"),
        _latency(plt, plan, out / "latency.png"),
        _bandwidth(plt, plan, out / "bandwidth.png"),
        _backlog(plt, plan, out / "backlog.png"),
    ]
    plt.close("all")
    return paths


def _box(ax: Any, x: float, y: float, w: float, h: float, title: str, lines: list[str],
         color: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333",
                                lw=1.0))
    ax.text(x + w / 2, y + h - 0.05, title, ha="center", va="top", fontsize=9,
            fontweight="bold")
    for i, line in enumerate(lines[:9]):
        ax.text(x + 0.04, y + h - 0.16 - i * 0.085, line, ha="left", va="top", fontsize=7)


def _topology(plt: Any, plan: Any, path: Path) -> Path:
    n = len(plan.sites)
    fig, ax = plt.subplots(figsize=(10, 2.6 + 2.4 * n))
    height = 1.2 + 1.1 * n
    ax.set_xlim(0, 4.2)
    ax.set_ylim(0, height)
    ax.axis("off")
    cp = plan.control
    _box(ax, 3.05, height / 2 - 0.55, 1.1, 1.1, "Control plane", [
        f"{cp.replicas} replicas ({cp.replicas_at_scale} at {cp.design_nodes:,})",
        cp.store, f"{cp.nodes:,} nodes", "ingest, fleet, PKI, TUF",
    ] + [f"cloud: {st.id}" for sp in plan.sites[:1] for st in sp.stages
         if sp.where(st.id) in ("cloud", "split")], "#dbe9f6")
    for i, sp in enumerate(plan.sites):
        y = height - 1.15 - i * 1.1
        site = sp.site
        srcs = [f"{s.id}: {s.count:,} x {s.rate_hz:g} Hz ({s.protocol})" for s in site.sources]
        _box(ax, 0.05, y, 1.15, 0.95, f"Devices ({site.count:,} sites)", srcs, "#f3f3f3")
        fig_ = sp.final
        edge = [f"{st.id} ({sp.where(st.id)})" for st in sp.stages
                if sp.where(st.id) in ("edge", "split")]
        _box(ax, 1.45, y, 1.25, 0.95,
             f"Edge: {fig_.sizing.option.name} x {fig_.sizing.nodes}{_ha(site)}",
             [*_models(plan, sp), *edge, f"outbox {fig_.outbox_bytes / 1024**2:,.0f} MiB"],
             "#e3f4e1")
        ax.annotate("", xy=(1.45, y + 0.47), xytext=(1.2, y + 0.47),
                    arrowprops={"arrowstyle": "->", "lw": 1.2})
        # the tiers the data passes: a gateway between the devices and the node (its hop is
        # in the latency figures), a region between the node and the cloud
        if "gateway" in site.tiers:
            ax.text(1.325, y + 0.52, "via gateway", ha="center", fontsize=6, color="#555")
        if "region" in site.tiers:
            ax.text(2.88, y + 0.05, "via region", ha="center", fontsize=6, color="#555")
        ax.annotate("", xy=(3.05, height / 2), xytext=(2.7, y + 0.47),
                    arrowprops={"arrowstyle": "->", "lw": 1.2, "color": "#1f5f99"})
        link = site.link
        ax.text(2.72, y + 0.62, f"{link.kind}\n{link.uplink / 1e6:g} Mbit/s up, RTT p99 "
                f"{link.rtt.p99 * 1000:,.0f} ms\nmTLS 1.3, "
                f"{fig_.edge_wire_per_s * 8 / 1e3:,.1f} kbit/s", fontsize=6.5, color="#1f5f99")
        sl = site.second_link
        if sl is not None:  # drawn dashed, below the first
            ax.annotate("", xy=(3.05, height / 2 - 0.1), xytext=(2.7, y + 0.25),
                        arrowprops={"arrowstyle": "->", "lw": 1.0, "ls": "--",
                                    "color": "#b5651d"})
            ax.text(2.72, y + 0.12, f"{sl.role}: {sl.kind}\n{sl.uplink / 1e6:g} Mbit/s up"
                    + (f", {sl.window.start} UTC" if sl.window is not None else ""),
                    fontsize=6.5, color="#b5651d")
    ax.set_title(f"Edge topology: {plan.workload.name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _second_label(sp: Any) -> str:
    sl = sp.site.second_link
    if sl is None:
        return ""
    if sl.role == "failover":
        return f" (failover: {sl.kind}, {sl.uplink / 1e6:g} Mbit/s while the first link is down)"
    return f" (offload: {sl.kind}, {sl.uplink / 1e6:g} Mbit/s from {sl.window.start} UTC)"


def _ha(site: Any) -> str:
    return f", {site.ha}" if site.nodes > 1 and site.ha else ""


def _models(plan: Any, sp: Any) -> list[str]:
    """The models the site's edge stages run, with their size and accelerator."""
    models = {m.name: m for m in plan.workload.body.models}
    out = []
    for st in sp.stages:
        m = models.get(st.model) if st.model else None
        if m is not None and sp.where(st.id) in ("edge", "split"):
            out.append(f"model {m.name}: {m.size / 1024**2:,.0f} MiB"
                       + (f", {m.accelerator}" if m.accelerator != "none" else ""))
    return out


def _latency(plt: Any, plan: Any, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for sp in plan.sites:
        lat = sp.final.latency
        for label, samples, style in (("edge", lat.edge_samples, "-"),
                                      ("cloud", lat.cloud_samples, "--")):
            xs = np.sort(samples[:: max(1, len(samples) // 20000)]) * 1000
            ys = np.linspace(0, 1, len(xs))
            ax.plot(xs, ys, style, label=f"{sp.name}: via {label} (p99 "
                    f"{np.percentile(samples, 99) * 1000:,.1f} ms)")
    budget = plan.workload.requirements.max_alarm_latency * 1000
    ax.axvline(budget, color="red", lw=1, label=f"max alarm latency {budget:,.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("alarm latency, reading accepted to local action (ms, log scale)")
    ax.set_ylabel("share of alarms")
    ax.set_title("Alarm latency: edge vs cloud path (link up)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bandwidth(plt: Any, plan: Any, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["JSON per reading\nover MQTT", "every reading,\nEdgewise codec", "edge design"]
    width = 0.8 / max(1, len(plan.sites))
    for i, sp in enumerate(plan.sites):
        f = sp.final
        vals = [f.naive_per_s * 8 / 1e3, f.raw_wire_per_s * 8 / 1e3, f.edge_wire_per_s * 8 / 1e3]
        xs = np.arange(3) + i * width
        bars = ax.bar(xs, vals, width, label=f"{sp.name} (per site)")
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.1f}", ha="center", va="bottom",
                    fontsize=7)
        ax.axhline(sp.site.link.uplink / 1e3, ls=":", lw=1, color="gray")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(3) + width * (len(plan.sites) - 1) / 2, labels)
    ax.set_ylabel("uplink kbit/s per site (log scale)")
    ax.set_title("Uplink bandwidth per site (dotted: link capacity)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _backlog(plt: Any, plan: Any, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    drew = False
    for sp in plan.sites:
        ls = sp.linksim
        f = sp.final
        if ls is not None and len(ls.times):
            start = max(0.0, ls.outages[0][0] - 3600) if ls.outages else 0.0
            longest = max(ls.outages, key=lambda o: o[1]) if ls.outages else (0.0, 0.0)
            start = max(0.0, longest[0] - 0.1 * max(longest[1], 3600))
            end = longest[0] + 1.3 * max(longest[1], 3600) + min(f.drain_s, 10 * 86400)
            sel = (ls.times >= start) & (ls.times <= end)
            ax.plot((ls.times[sel] - longest[0]) / 3600, ls.backlog[sel] / 1024**2,
                    label=f"{sp.name}: outbox backlog" + _second_label(sp))
            ax.axhline(ls.capacity_bytes / 1024**2, ls=":", lw=1, color="gray")
            drew = True
        else:
            from edgewise.plan.site_figures import failover_backlog_per_s

            hours = np.linspace(0, f.outage_s / 3600 * 1.2, 200)
            grows = failover_backlog_per_s(sp.site, f.calibration.stored_per_s)
            backlog = np.minimum(hours, f.outage_s / 3600) * 3600 * grows
            ax.plot(hours, backlog / 1024**2, label=f"{sp.name}: backlog (model)"
                    + _second_label(sp))
            ax.axhline(f.outbox_bytes / 1024**2, ls=":", lw=1, color="gray")
            drew = True
    if drew:
        ax.legend(fontsize=7)
    ax.set_xlabel("hours from the start of the longest outage")
    ax.set_ylabel("MiB in the outbox")
    ax.set_title("Outbox during the longest outage (dotted: planned size)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
