"""Bench results as files: JSON (everything), a markdown table, a speedup plot."""

from __future__ import annotations

import json
from pathlib import Path

from compinv_rt.apps.bench.harness import STOCK, BenchResult
from compinv_rt.core.outputs import atomic_write_text


def markdown(result: BenchResult) -> str:
    m = result.meta
    lines = [
        f"Model: `{m['model']}`{' (' + m['label'] + ')' if m['label'] else ''}, "
        f"{m['image_size'][0]}x{m['image_size'][1]}, {m['steps']} DDIM steps, CFG {m['guidance']}, "
        f"reference precision {m['dtype']}; device: {m['device_name']}; torch {m['torch']}; "
        f"median of {m['repeats']} timed runs after one warm-up; baseline: {m['baseline']}; "
        f"{m['created']}.",
        *_roofline_header(m.get("roofline")),
        "",
        f"| backend | quality | precision | images/batch | bias | UNet step p50 (ms) | p90 (ms) "
        f"| end-to-end (s) | images/s | images/s vs reference preset | UNet GFLOPs/image | UNet GFLOP/s "
        f"| fraction of peak (CPU time) | peak RSS (MB) | step speedup vs stock {m['dtype']} "
        f"| end-to-end speedup vs stock {m['dtype']} | end-to-end vs stock, same precision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def speed(v):
        return "1.00 (baseline)" if v is None else f"{v:.2f}x"

    for c in result.cells:
        same = "-" if c.backend == STOCK else speed(c.e2e_speedup_same_precision)
        lines.append(
            f"| {c.backend}{f' ({c.provider})' if c.provider else ''} | {c.quality or '-'} | "
            f"{c.precision} | {c.batch} | {'on' if c.bias else 'off'} | "
            f"{c.step_ms_p50:.1f} | {c.step_ms_p90:.1f} | {c.e2e_s:.2f} | {c.images_per_s:.2f} | "
            f"{_num(c.images_per_s_vs_reference, '{:.2f}x')} | {_num(c.gflops_per_image, '{:.2f}')} | "
            f"{_num(c.unet_gflops_per_s, '{:.1f}')} | {_num(c.fraction_of_peak, '{:.0%}')}"
            f"{_num(c.fraction_of_peak_cpu, ' ({:.0%})').replace('-', '')} | "
            f"{c.peak_rss_mb:.0f}{_cuda_memory(c)} | "
            f"{speed(c.step_speedup)} | {speed(c.e2e_speedup)} | {same} |")
    for line in m.get("skipped", []):
        lines.append(f"\nSkipped: {line}")
    return "\n".join(lines) + "\n"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _roofline_header(roof: dict | None) -> list[str]:
    """The run's attainable peaks, for the fraction-of-peak column."""
    if not roof:
        return []
    peaks = "; ".join(f"{p['precision']} {p['gflops_per_s']:.1f} ({p.get('cpu_time_gflops_per_s', 0):.1f} by "
                      f"CPU time) at UNet batch {p['unet_batch']}" for p in roof["attainable_gflops_per_s"])
    square = "; ".join(f"{s['precision']} {s['gflops_per_s']:.1f} ({s['size']}^3)" for s in roof["square_matmul"])
    return ["", f"Roofline ({roof['threads']} thread(s)): attainable peak, GFLOP/s (torch matmul at the "
                f"UNet's own GEMM shapes, FLOP-weighted): {peaks}. One square matmul: {square}. "
                f"UNet: {roof['gflops_per_sample_evaluation']:.3f} GFLOPs per sample-evaluation. "
                "Fraction of peak = the cell's UNet GFLOP/s (its UNet FLOPs / its UNet time) / the "
                "attainable peak for the same UNet calls; in brackets the same by this thread's CPU "
                "time (one thread only), which leaves out waiting for a core on a shared machine."]


def _cuda_memory(c) -> str:
    """Increase over the cell's start: torch's allocator, and device-wide (ORT/TRT included)."""
    if not (c.peak_cuda_mb or c.peak_device_mb):
        return ""
    return (f" (+{c.peak_cuda_mb:.0f} torch CUDA, +{c.peak_device_mb:.0f} device, "
            f"{c.resident_device_mb:.0f} resident)")


def plot(result: BenchResult, path: Path) -> None:
    """One panel per batch size: a horizontal bar per backend x precision x bias x quality preset,
    the end-to-end speedup over stock diffusers at the reference precision (dashed line at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = result.meta["dtype"]
    cells = [c for c in result.cells if c.backend != STOCK or c.precision != reference]
    if not cells:  # a partial report (only the baseline measured so far): nothing to compare
        return
    batches = sorted({c.batch for c in cells})
    series = sorted({(c.backend, c.precision, c.bias, c.quality) for c in cells})
    colours = {b: plt.cm.tab10(i) for i, b in enumerate(sorted({s[0] for s in series}))}
    fig, axes = plt.subplots(1, len(batches), sharey=True, squeeze=False,
                             figsize=(1.5 + 3.2 * len(batches), 1.2 + 0.28 * len(series)))
    for ax, batch in zip(axes[0], batches):
        for y, (backend, precision, bias, quality) in enumerate(series):
            value = next((c.e2e_speedup for c in cells if (c.backend, c.precision, c.bias, c.quality, c.batch)
                          == (backend, precision, bias, quality, batch)),
                         None) or 0.0  # 0: not measured (e.g. a skipped backend)
            ax.barh(y, value, color=colours[backend], alpha=1.0 if precision == reference else 0.55,
                    hatch="//" if bias else None, edgecolor="black", linewidth=0.4)
            ax.text(value, y, f" {value:.2f}x", va="center", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{batch} image{'s' if batch > 1 else ''}", fontsize=9)
        ax.set_xlabel(f"end-to-end speedup vs stock {reference}", fontsize=8)
        ax.set_xlim(0, max([c.e2e_speedup or 0 for c in cells] + [1]) * 1.25)
    axes[0][0].set_yticks(range(len(series)))
    axes[0][0].set_yticklabels([f"{b} {p}{' ' + q if q else ''}{' + bias' if bias else ''}"
                                for b, p, bias, q in series], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{result.meta['device_name']}, {result.meta['steps']} steps", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md",
             "plot": out_dir / "results.png"}
    atomic_write_text(paths["json"], json.dumps(result.to_dict(), indent=2) + "\n")
    atomic_write_text(paths["markdown"], markdown(result))
    plot(result, paths["plot"])  # absent while only the stock baseline is measured
    return paths
