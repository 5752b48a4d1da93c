"""Compare semantic-inversion settings across `compinv-rt eval` runs: one row per (run, SI method),
with the paper's three target ratios of the full method against plain TI.

    .venv/bin/python benchmarks/eval_variants.py RUN_DIR[=LABEL] ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path, label: str) -> list[str]:
    d = json.loads((run / "eval.json").read_text())
    m, cfg = d["methods"], d["config"]
    ti, full = m["ti"], m["full"]
    ratios = (full["pretrained"]["coi"] / ti["pretrained"]["coi"],
              full["inverted"]["coi"] / ti["inverted"]["coi"],
              1 - full["all"]["identity"] / ti["all"]["identity"])
    out = []
    for key in ("si", "full"):
        r = m[key]
        cells = [r["pretrained"]["coi"], r["inverted"]["coi"], r["all"]["identity"],
                 r["all"]["accuracy"], r["all"]["region"]]
        target = ("" if key == "si" else
                  f"{ratios[0]:.2f}x / {ratios[1]:.2f}x / {100 * ratios[2]:.0f}%")
        out.append(f"| {label} (weight {cfg['si_anchor_weight']}, anchors {cfg['si_anchors']}) | "
                   f"{r['label']} | " + " | ".join(f"{100 * v:.1f}%" for v in cells) + f" | {target} |")
    return out


def main(argv: list[str]) -> None:
    print("| semantic inversion | method | CoI, pretrained | CoI, inverted pair | identity | "
          "prompt accuracy | region | full vs TI: CoI pretrained / CoI pair / identity drop |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in argv:
        path, _, label = arg.partition("=")
        for line in rows(Path(path), label or Path(path).name):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
