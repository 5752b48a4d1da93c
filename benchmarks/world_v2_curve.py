"""World v2's learning curve: the training loss of a run (from its checkpoint's history) beside the
judged exact rates of scored points (`world score` / `world curve` outputs), one PNG + a table.

    python benchmarks/world_v2_curve.py --run-dir .cache/world/v2run \
        --point 0=.cache/world/cmp/old_kinds/score.json --point 600=.cache/world/cmp/curve600/curve.json \
        --point 1200=.cache/world/cmp/new_kinds/score.json --out benchmarks/world/v2_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def point_summary(path: Path) -> dict:
    """{kind: (exact, samples)} from a score.json or a one-row curve.json."""
    data = json.loads(path.read_text())
    summary = data["summary"] if isinstance(data, dict) else data[-1]["detail"]
    return {kind: (s["exact"], s["samples"]) for kind, s in summary.items()}


def main() -> None:
    from compinv_rt.apps.world.recipe import _load_tensors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--point", action="append", default=[], help="STEP=score.json or curve.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    _, meta = _load_tensors(args.run_dir / "unet_ckpt.safetensors")
    history = meta.get("history", [])
    points = {int(s): point_summary(Path(p)) for s, p in (x.split("=", 1) for x in args.point)}
    kinds = sorted({k for pt in points.values() for k in pt})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot([h[0] for h in history], [h[1] for h in history])
    a1.set_xlabel("UNet steps of the v2 run")
    a1.set_ylabel("training loss (smoothed)")
    for kind in kinds:
        xs = sorted(s for s in points if kind in points[s])
        a2.plot(xs, [100 * points[s][kind][0] for s in xs], marker="o", label=kind)
    a2.set_xlabel("UNet steps of the v2 run (0: today's model)")
    a2.set_ylabel("exact (%)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("| step | loss | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    loss = {h[0]: h[1] for h in history}
    for s in sorted(set(points) | set(loss)):
        cells = [f"{100 * points[s][k][0]:.1f}% ({points[s][k][1]})" if s in points and k in points[s] else ""
                 for k in kinds]
        print(f"| {s} | {loss.get(s, '')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
