"""Put each of issue 18's 11 deliberate bugs into the code, one at a time, run the test meant to
catch it, and restore the file. Prints one row per bug: caught (the test failed) or MISSED.

    cd <repo> && PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 5 python benchmarks/reliability/bugs.py [N ...]

Needs a clean git tree for the patched files (each is restored with `git checkout --`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
R = "tests/test_reliability.py"
BUGS = [  # (bug, file, old, new, test)
    ("anchor loss gets sequence length 1 in the loop", "compinv_rt/train/loop.py",
     "A.anchor_loss(wrapper.vectors[:n_vec], target, seq_len, cfg.anchor_l1)",
     "A.anchor_loss(wrapper.vectors[:n_vec], target, 1, cfg.anchor_l1)",
     f"{R}::test_anchor_term_in_the_loop_uses_the_full_sequence_length"),
    ("training prompts hold only the first vector", "compinv_rt/train/loop.py",
     'placeholder_text = " ".join(T.placeholder_tokens(cfg.token, cfg.vectors))',
     "placeholder_text = T.placeholder_tokens(cfg.token, cfg.vectors)[0]",
     f"{R}::test_every_vector_of_a_multi_vector_token_is_trained_by_reconstruction"),
    ("--resume regenerates finished job images", "compinv_rt/generate/jobs.py",
     "                summary.skipped += 1\n                continue\n",
     "                summary.skipped += 1\n",
     f"{R}::test_resume_skips_finished_images"),
    ("no-guidance path gets an empty text context", "compinv_rt/sampling/pipeline.py",
     "cond = self.encode_prompts(prompts)",
     'cond = self.encode_prompts(prompts if cfg.guidance > 1.0 else [""] * len(prompts))',
     f"{R}::test_diffusers_parity_without_guidance_and_with_a_negative_prompt"),
    ("bias pooled with max instead of average", "compinv_rt/unet/attention.py",
     "F.avg_pool2d(attention_bias, kernel_size=factor)",
     "F.max_pool2d(attention_bias, kernel_size=factor)",
     f"{R}::test_bias_is_average_pooled_to_each_layer"),
    ("verify_engine ignores the device tag", "compinv_rt/export/manifest.py",
     'if device is not None and m["device"] != device_tag(fmt, device):',
     'if False and m["device"] != device_tag(fmt, device):',
     f"{R}::test_engine_for_another_device_is_refused"),
    ("jobs with different guidance packed into one batch", "compinv_rt/generate/session.py",
     "SchedulerName(cfg.scheduler).value, cfg.guidance, mode,",
     "SchedulerName(cfg.scheduler).value, 0.0, mode,",
     f"{R}::test_jobs_with_different_guidance_equal_their_single_generations"),
    ("negative prompt ignored", "compinv_rt/sampling/pipeline.py",
     'self.encode_prompts(negative_prompts or [""] * len(prompts))',
     'self.encode_prompts([""] * len(prompts))',
     f"{R}::test_diffusers_parity_without_guidance_and_with_a_negative_prompt"),
    ("read_artifact skips the embeddings hash", "compinv_rt/models/artifact.py",
     "if file_sha256(emb) != art[\"files\"][EMBEDDINGS]:",
     "if False:",
     f"{R}::test_modified_embeddings_are_refused"),
    ("world recipe resume restarts from step 0", "compinv_rt/apps/world/recipe.py",
     'start, history = m["step"], m.get("history", [])',
     'start, history = 0, m.get("history", [])',
     "tests/test_world.py::test_recipe_resume_is_bit_identical_to_an_uninterrupted_run"),
    ("layout-model boxes replaced by fixed boxes", "compinv_rt/spatial/layouts.py",
     'boxes = [(check_box(b, "predicted box"),) for b in predictor(prompt, tokens)]',
     "boxes = [(b,) for b in fixed_boxes(len(phrases))]",
     f"{R}::test_recorded_layout_boxes_are_the_predictors"),
]


def main(which: list[int]) -> int:
    missed = 0
    for no, (bug, file, old, new, test) in enumerate(BUGS, start=1):
        if which and no not in which:
            continue
        path = ROOT / file
        src = path.read_text()
        assert src.count(old) == 1, f"bug {no}: the line to break is not in {file} exactly once"
        path.write_text(src.replace(old, new))
        try:
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                                "no:cacheprovider", "-x", test], cwd=ROOT, capture_output=True,
                               text=True)
            caught = r.returncode != 0
            missed += not caught
            last = (r.stdout.strip().splitlines() or [""])[-1]
            print(f"| {no} | {bug} | `{test.split('::')[1]}` | "
                  f"{'caught' if caught else 'MISSED'} ({last}, {time.time() - t0:.0f} s) |",
                  flush=True)
        finally:
            path.write_text(src)
    return missed


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
