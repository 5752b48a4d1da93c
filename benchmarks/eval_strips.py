"""One picture of an eval run: for a few prompts, each method's image strip (training seed 0).

    python benchmarks/eval_strips.py RUN_DIR OUT.png [--methods words,ti,...] [--prompts N]
        [--kind pretrained] [--concepts NAME,...]

Reads RUN_DIR/protocol.json and the cell strips RUN_DIR/cells/<method>/<prompt id>.png that
`compinv-rt eval` writes (the first 8 images of each cell, same image seeds in every row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_WIDTH = 190


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the run)")
    ap.add_argument("--prompts", type=int, default=4, help="how many prompts (in protocol order)")
    ap.add_argument("--kind", default="pretrained", help="single, pretrained or inverted")
    ap.add_argument("--concepts", default=None, help="comma-separated: only prompts naming these")
    args = ap.parse_args()

    protocol = json.loads((args.run / "protocol.json").read_text())
    methods = (args.methods.split(",") if args.methods
               else [m["name"] for m in protocol["methods"]])
    wanted = set(args.concepts.split(",")) if args.concepts else None
    prompts = [p for p in protocol["prompts"] if p["kind"] == args.kind
               and (wanted is None or wanted & set(p["concepts"]))][:args.prompts]
    if not prompts:
        raise SystemExit(f"error: no {args.kind} prompts in {args.run}/protocol.json")
    rows = []  # (label, strip) with a None strip for a prompt's title row
    for p in prompts:
        rows.append((p["template"], None))
        for m in methods:
            strip = args.run / "cells" / m / f"{p['id']}.png"
            if not strip.is_file():
                raise SystemExit(f"error: missing cell strip {strip}")
            rows.append((m, Image.open(strip).convert("RGB")))
    width = LABEL_WIDTH + max(s.width for _, s in rows if s is not None)
    heights = [18 if s is None else s.height for _, s in rows]
    canvas = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, strip), h in zip(rows, heights):
        if strip is None:
            draw.text((4, y + 3), label, fill="black")
        else:
            draw.text((8, y + h // 2 - 6), label, fill="black")
            canvas.paste(strip, (LABEL_WIDTH, y))
        y += h
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("P", palette=Image.Palette.ADAPTIVE).save(args.out, optimize=True)  # ~3x smaller
    print(f"wrote {args.out} ({len(prompts)} prompts x {len(methods)} methods)")


if __name__ == "__main__":
    main()
