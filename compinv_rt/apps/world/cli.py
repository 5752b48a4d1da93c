"""`compinv-rt world ...`: the shapes world's commands (Typer sub-app `world_app`).

Only typer and the standard library at module level: torch/diffusers are imported inside commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from compinv_rt.apps.cli_support import progress as progress_bar
from compinv_rt.apps.cli_support import typer_app, user_errors

world_app = typer_app(
    "world",
    "The embedded shapes world: scenes, the judge, the tiny SD's training recipe, scoring, photos.")


@world_app.command()
@user_errors
def scenes(
    out: Path = typer.Option(..., help="Folder for scene PNGs, scenes.json and grid.png."),
    n: int = typer.Option(16, "-n", help="Number of scenes."),
    seed: int = typer.Option(0, help="First seed (scene i uses seed + i)."),
    split: str = typer.Option("train", help="train (respects the held-out split) or any."),
):
    """Write sample scenes with their ground truth (boxes, captions)."""
    from PIL import Image

    from compinv_rt.apps.world.scenes import sample_batch
    from compinv_rt.apps.world.score import grid_image
    from compinv_rt.core.errors import ConfigError

    if split not in ("train", "any"):
        raise ConfigError(f"--split must be train or any, got {split!r}")
    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    out.mkdir(parents=True, exist_ok=True)
    sc, ims = sample_batch(range(seed, seed + n), split)
    for i, im in enumerate(ims):
        Image.fromarray(im).save(out / f"scene_{i:04d}.png")
    (out / "scenes.json").write_text(json.dumps([s.to_json() for s in sc], indent=1))
    grid_image(ims, cols=min(8, n)).save(out / "grid.png")
    typer.echo(f"wrote {n} scenes to {out}")


@world_app.command()
@user_errors
def train(  # noqa: PLR0913
    run_dir: Path = typer.Option(Path(".cache/world/run"), help="Checkpoints, caches and logs (resumable)."),
    stages: str = typer.Option("vae,gate,cache,unet,export", help="Comma-separated stages to run."),
    vae_steps: int = typer.Option(3000, help="VAE optimizer steps."),
    vae_lr: float = typer.Option(3e-3, help="VAE peak learning rate."),
    unet_steps: int = typer.Option(5600, help="UNet + text encoder optimizer steps."),
    unet_batch: int = typer.Option(32, help="UNet batch size."),
    unet_lr: float = typer.Option(1e-3, help="UNet + text encoder peak learning rate."),
    warmup: int = typer.Option(200, help="UNet learning-rate warm-up steps."),
    place_prob: float = typer.Option(0.4, help="Fraction of training captions that state places and sizes."),
    pattern_boost: float = typer.Option(
        1.0, help="Draw scenes with two or more dotted/striped objects this many times as often."),
    attn16: bool = typer.Option(
        False, help="Grown base: cross-attention at 16x16 too. With --init-from, the new blocks start as "
                    "the identity (the grown model equals the initial one until it trains)."),
    init_from: Optional[Path] = typer.Option(
        None, help="Continue from this diffusers folder (e.g. the shipped model): its VAE replaces the "
                   "vae/gate stages, its UNet + text encoder start the unet stage."),
    cache_scenes: int = typer.Option(32000, help="Training scenes encoded to latents."),
    gate_threshold: float = typer.Option(0.90, help="VAE gate: judge's exact-object-set accuracy on reconstructions."),
    ckpt_every: int = typer.Option(100, help="Checkpoint every N steps."),
    snapshot_every: int = typer.Option(400, help="Keep an EMA snapshot every N UNet steps."),
    threads: int = typer.Option(1, help="torch CPU threads per process (1 is fastest when the CPU is shared)."),
    procs: int = typer.Option(2, help="Data-parallel CPU processes for the UNet stage (batch = procs x unet-batch)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto. On a GPU: --procs 1 and a large --unet-batch."),
    precision: str = typer.Option("auto", help="fp32 or bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)."),
    resume_from: Optional[Path] = typer.Option(
        None, help="A compact checkpoint (`world checkpoint`) to continue from when RUN_DIR has none."),
    seed: int = typer.Option(0, help="Seed of everything."),
    tiny: bool = typer.Option(False, help="Tiny architecture and data (smoke tests)."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: embedded)."),
    out: Optional[Path] = typer.Option(None, help="Where export writes the diffusers folder (default: RUN_DIR/model)."),
    force: bool = typer.Option(False, help="Train the UNet even if the VAE gate failed."),
    max_minutes: float = typer.Option(
        0.0, help="Stop the UNet stage this many minutes after the command started (0: no limit; needs "
                  "--procs 1); the step it stops at is checkpointed and snapshotted, then the next stages run."),
):
    """Train the shapes-world Stable Diffusion (seeded, resumable; rerun to continue)."""
    import time

    deadline = time.monotonic() + 60 * max_minutes  # a wall-clock budget (GPU loans are timed)
    opts = WorldTrainOptions(
        run_dir=run_dir, stages=stages, vae_steps=vae_steps, vae_lr=vae_lr, unet_steps=unet_steps,
        unet_batch=unet_batch, unet_lr=unet_lr, warmup=warmup, place_prob=place_prob,
        pattern_boost=pattern_boost, attn16=attn16, init_from=init_from, cache_scenes=cache_scenes,
        gate_threshold=gate_threshold, ckpt_every=ckpt_every, snapshot_every=snapshot_every,
        threads=threads, procs=procs, device=device, precision=precision, resume_from=resume_from,
        seed=seed, tiny=tiny, judge=judge, out=out, force=force, max_minutes=max_minutes)
    cfg, chosen = recipe_config(opts)
    progress = _StageBars()
    try:
        result = _run_stages(cfg, chosen, opts, progress, deadline)
    finally:
        progress.close()
    if "gate" in result:
        g = result["gate"]
        typer.echo(f"VAE gate: exact object set on reconstructions {g['exact_object_set_recon']:.3f} "
                   f"(clean {g['exact_object_set_clean']:.3f}, PSNR {g['psnr_db']:.1f} dB): "
                   f"{'passed' if g['passed'] else 'FAILED'}")
    if "unet" in result:
        typer.echo(f"UNet trained to step {result['unet']['steps']}")
    if "export" in result:
        typer.echo(f"model written to {result['export']}")


@dataclass(frozen=True)
class WorldTrainOptions:
    """`world train`'s options as given (see its --help); `recipe_config` checks them."""

    run_dir: Path
    stages: str
    vae_steps: int
    vae_lr: float
    unet_steps: int
    unet_batch: int
    unet_lr: float
    warmup: int
    place_prob: float
    pattern_boost: float
    attn16: bool
    init_from: Optional[Path]
    cache_scenes: int
    gate_threshold: float
    ckpt_every: int
    snapshot_every: int
    threads: int
    procs: int
    device: str
    precision: str
    resume_from: Optional[Path]
    seed: int
    tiny: bool
    judge: Optional[Path]
    out: Optional[Path]
    force: bool
    max_minutes: float


def recipe_config(opts: WorldTrainOptions):
    """`world train`'s options, checked -> (RecipeConfig, the stages to run)."""
    from dataclasses import replace

    from compinv_rt.apps.world.model import TINY_ARCH, ArchConfig
    from compinv_rt.apps.world.recipe import STAGES, RecipeConfig
    from compinv_rt.core.errors import ConfigError

    chosen = [s.strip() for s in opts.stages.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {', '.join(bad)}; expected some of {', '.join(STAGES)}")
    for name, v in (("--vae-steps", opts.vae_steps), ("--unet-steps", opts.unet_steps),
                    ("--unet-batch", opts.unet_batch), ("--cache-scenes", opts.cache_scenes),
                    ("--threads", opts.threads), ("--procs", opts.procs), ("--ckpt-every", opts.ckpt_every)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if not 0 <= opts.place_prob <= 1:
        raise ConfigError(f"--place-prob must be in [0, 1], got {opts.place_prob}")
    if not 1 <= opts.pattern_boost <= 100:
        raise ConfigError(f"--pattern-boost must be in [1, 100], got {opts.pattern_boost}")
    if opts.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {opts.warmup}")
    if not 0 <= opts.max_minutes < 1e6 or (opts.max_minutes and opts.procs != 1):
        raise ConfigError(f"--max-minutes must be >= 0 and needs --procs 1, got {opts.max_minutes} with "
                          f"--procs {opts.procs}")
    if opts.init_from is not None and not (opts.init_from / "model_index.json").is_file():
        raise ConfigError(f"--init-from {opts.init_from}: not a diffusers folder (model_index.json missing)")
    arch = TINY_ARCH if opts.tiny else ArchConfig()
    if opts.attn16:
        arch = replace(arch, unet_attn=(True,) * len(arch.unet_channels))
    cfg = RecipeConfig(
        run_dir=str(opts.run_dir), init_from=str(opts.init_from) if opts.init_from else None,
        warmup=opts.warmup, place_prob=opts.place_prob, pattern_boost=opts.pattern_boost,
        device=opts.device, precision=opts.precision, arch=arch, seed=opts.seed, threads=opts.threads,
        procs=opts.procs, vae_steps=opts.vae_steps, vae_lr=opts.vae_lr, unet_steps=opts.unet_steps,
        unet_batch=min(opts.unet_batch, 4) if opts.tiny else opts.unet_batch, unet_lr=opts.unet_lr,
        cache_scenes=opts.cache_scenes, gate_threshold=opts.gate_threshold, ckpt_every=opts.ckpt_every,
        snapshot_every=opts.snapshot_every,
        **({"vae_scenes": 64, "vae_batch": 4, "gate_scenes": 16} if opts.tiny else {}),  # type: ignore[arg-type]
    )
    return cfg, chosen


class _StageBars:
    """The recipe's progress callback: one bar per stage; in a log file (no terminal) a dated line
    every 50 steps instead."""

    def __init__(self):
        import sys

        self.bars: dict = {}
        self.plain = not sys.stderr.isatty()
        self.done: dict = {}  # the last step each stage reported

    def __call__(self, stage, i, n, info):
        import time

        if stage not in self.bars:
            self.bars[stage] = progress_bar(n, stage, unit="it")
        b = self.bars[stage]
        b.update(i - b.n)
        self.done[stage] = i
        if info:
            b.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
        if self.plain and (i % 50 == 0 or i == n):
            typer.echo(f"{time.strftime('%H:%M:%S')} {stage} {i}/{n} "
                       + " ".join(f"{k}={v:.4g}" for k, v in info.items()), err=True)

    def close(self):
        for b in self.bars.values():
            b.close()


def _run_stages(cfg, chosen: list[str], opts: WorldTrainOptions, progress: _StageBars,
                deadline: float) -> dict:
    import time

    from compinv_rt.apps.world.recipe import STAGES, resolve_device, run_recipe

    resolve_device(cfg)  # a bad --device / --precision fails before any work
    if opts.max_minutes and "unet" in chosen:
        # run_recipe has no stop hook: the stages before the UNet, the UNet with train_unet's
        # `stop`, then the stages after it (run_recipe orders stages itself, so split by STAGES)
        from compinv_rt.apps.world.recipe import train_unet

        at = STAGES.index("unet")
        result = run_recipe(cfg, [s for s in chosen if STAGES.index(s) < at], progress, judge_dir=opts.judge,
                            force=opts.force, resume_from=opts.resume_from)
        result["unet"] = train_unet(cfg, progress, stop=lambda: time.monotonic() > deadline)
        result["unet"]["steps"] = progress.done.get("unet", result["unet"]["steps"])  # where it stopped
        result.update(run_recipe(cfg, [s for s in chosen if STAGES.index(s) > at], progress,
                                 judge_dir=opts.judge, out_dir=opts.out, force=opts.force))
        return result
    return run_recipe(cfg, chosen, progress, judge_dir=opts.judge, out_dir=opts.out, force=opts.force,
                      resume_from=opts.resume_from)


@world_app.command()
@user_errors
def checkpoint(
    run_dir: Path = typer.Option(..., help="Training run whose UNet checkpoint to copy."),
    out: Path = typer.Option(..., help="Compact checkpoint file to write (overwritten)."),
):
    """Write a compact resumable checkpoint (weights + EMA in fp16, no optimizer state)."""
    from compinv_rt.apps.world.recipe import RecipeConfig, compact_checkpoint
    from compinv_rt.core.errors import ModelError

    cfg_file = run_dir / "recipe.json"
    if not cfg_file.is_file():
        raise ModelError(f"no training run at {run_dir} (recipe.json missing)")
    path = compact_checkpoint(RecipeConfig.from_json(json.loads(cfg_file.read_text())), out)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@world_app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Option(..., help="Training run (its recipe.json gives the architecture)."),
    out: Path = typer.Option(..., help="Diffusers folder to write (replaced atomically)."),
    weights: Optional[Path] = typer.Option(
        None, help="EMA snapshot, or a (compact) checkpoint whose EMA weights to export (default: the "
                   "run's latest snapshot)."),
):
    """Export a run's EMA weights as a stock diffusers folder (fp16)."""
    from compinv_rt.apps.world.recipe import RecipeConfig, export_snapshot
    from compinv_rt.core.errors import ModelError

    cfg_file = run_dir / "recipe.json"
    if not cfg_file.is_file():
        raise ModelError(f"no training run at {run_dir} (recipe.json missing)")
    if weights is not None and not weights.is_file():
        raise ModelError(f"--weights {weights}: no such file")
    path = export_snapshot(RecipeConfig.from_json(json.loads(cfg_file.read_text())), out, weights)
    typer.echo(f"model written to {path}")


@world_app.command()
@user_errors
def score(  # noqa: PLR0913
    model: Optional[Path] = typer.Option(None, help="Diffusers model folder (default: embedded)."),
    prompts: Optional[Path] = typer.Option(
        None, help="Prompt file, one per line, optional 'kind<TAB>prompt' (default: held-out prompts)."),
    kinds: str = typer.Option(
        "single,two,novel",
        help="Held-out prompt kinds when --prompts is not given: single, novel, two, two-patterns, three, "
             "positioned, combinations (every colour x pattern x shape on each background, 540 prompts)."),
    prompts_per_kind: int = typer.Option(25, help="Held-out prompts per kind (combinations: always all)."),
    k: int = typer.Option(5, "-k", help="Images per prompt."),
    combination_k: int = typer.Option(0, help="Images per combinations prompt (0: same as -k)."),
    steps: int = typer.Option(25, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Sampling seed."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: embedded)."),
    out: Path = typer.Option(Path("outputs/world-score"), help="Folder for score.json, score.md and grids."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
):
    """Sample K images per prompt, judge them, report accuracy per prompt kind."""
    from compinv_rt.apps.world.score import ScoreConfig, default_prompts, read_prompt_file
    from compinv_rt.apps.world.score import score as run_score
    from compinv_rt.core.errors import ConfigError

    if k < 1 or steps < 1 or prompts_per_kind < 1 or combination_k < 0:
        raise ConfigError("-k, --steps and --prompts-per-kind must be >= 1, --combination-k >= 0")
    if prompts is not None:
        plist = read_prompt_file(prompts)
    else:
        plist = default_prompts([x.strip() for x in kinds.split(",") if x.strip()], prompts_per_kind, seed)
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = ScoreConfig(k=k, prompts_per_kind=prompts_per_kind, steps=steps, guidance=guidance, seed=seed,
                      combination_k=combination_k or k)
    bar = progress_bar(sum(cfg.k_for(kind) for kind, _ in plist), "sampling", unit="it")

    def progress(i, n):
        bar.update(i - bar.n)

    try:
        result = run_score(plist, cfg, model_dir=model, judge_dir=judge, out_dir=out, progress=progress)
    finally:
        bar.close()
    typer.echo(result["markdown"], nl=False)
    typer.echo(f"wrote {out}/score.json, score.md and grid PNGs ({result['seconds']} s)")


@world_app.command()
@user_errors
def photos(
    out: Path = typer.Option(..., help="Folder for the photos and concept.json."),
    shape: str = typer.Option("heart", help="circle, square, triangle, star, heart or cross."),
    colour: str = typer.Option("orange", help="red, orange, yellow, green, blue or purple."),
    pattern: str = typer.Option("dotted", help="plain, dotted or striped."),
    background: str = typer.Option("sand", help="grass, sky, sand, night or brick."),
    count: int = typer.Option(8, help="Number of photos."),
    seed: int = typer.Option(0, help="Seed."),
):
    """Write "user photos" of a novel concept plus concept.json (for textual inversion)."""
    from compinv_rt.apps.world.photos import PhotoConcept, make_photos

    c = make_photos(out, PhotoConcept(shape, colour, pattern, background), count, seed, overwrite=False)
    typer.echo(f"wrote {c['count']} photos of {c['description']} to {out}")


@world_app.command("judge")
@user_errors
def judge_images(
    images: list[Path] = typer.Argument(..., help="Image files to judge."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: embedded)."),
):
    """Print what the judge sees in images (background, objects, boxes) as JSON lines."""
    from PIL import Image

    from compinv_rt.apps.world.judge import load_judge
    from compinv_rt.core.errors import ConfigError

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise ConfigError(f"image(s) not found: {', '.join(missing)}")
    j = load_judge(judge)
    verdicts = j([Image.open(p).convert("RGB") for p in images])
    for p, v in zip(images, verdicts):
        typer.echo(json.dumps({"image": str(p), **v.to_json()}))


@world_app.command("judge-train")
@user_errors
def judge_train(
    out: Path = typer.Option(..., help="Folder for judge.safetensors + judge.json."),
    steps: int = typer.Option(2500, help="Optimizer steps."),
    scenes_n: int = typer.Option(24000, "--scenes", help="Training scenes."),
    eval_scenes: int = typer.Option(1000, help="Clean held-out scenes for the accuracy report."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    seed: int = typer.Option(0, help="Seed."),
):
    """Train the judge on clean synthetic scenes and report its held-out accuracy."""
    import time

    import torch

    from compinv_rt.apps.world.judge import JudgeConfig, evaluate_judge, train_judge
    from compinv_rt.core.errors import ConfigError

    if steps < 1 or scenes_n < 1:
        raise ConfigError("--steps and --scenes must be >= 1")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    bar = progress_bar(steps, "judge", unit="it")
    t0 = time.time()

    def progress(i, n, info):
        bar.update(i - bar.n)
        bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)

    try:
        j = train_judge(JudgeConfig(steps=steps, train_scenes=scenes_n, seed=seed), progress)
    finally:
        bar.close()
    acc = evaluate_judge(j, eval_scenes)
    j.meta = {"heldout_clean": acc, "train_seconds": round(time.time() - t0, 1)}
    j.save(out)
    typer.echo(json.dumps(acc, indent=1))


@world_app.command()
@user_errors
def curve(  # noqa: PLR0913
    run_dir: Path = typer.Option(Path(".cache/world/run"), help="Training run with EMA snapshots."),
    k: int = typer.Option(2, "-k", help="Images per prompt."),
    prompts_per_kind: int = typer.Option(25, help="Held-out prompts per kind."),
    steps: int = typer.Option(25, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    every: int = typer.Option(1, help="Score every N-th snapshot (the last one always)."),
    judge: Optional[Path] = typer.Option(None, help="Judge folder (default: embedded)."),
    out: Path = typer.Option(Path("outputs/world-curve"), help="Folder for curve.json, curve.md, curve.png."),
    snapshots: str = typer.Option("", help="Comma-separated snapshot steps to score (default: all, see --every)."),
    kinds: str = typer.Option("single,two,novel", help="Held-out prompt kinds (as for `world score`)."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
):
    """Learning curve: score every EMA snapshot of a run on the held-out prompts."""
    import tempfile

    if threads:
        import torch

        torch.set_num_threads(threads)

    from compinv_rt.apps.world.recipe import RecipeConfig, export_snapshot, list_snapshots
    from compinv_rt.apps.world.score import ScoreConfig, default_prompts
    from compinv_rt.apps.world.score import score as run_score
    from compinv_rt.core.errors import ModelError

    cfg_file = run_dir / "recipe.json"
    if not cfg_file.is_file():
        raise ModelError(f"no training run at {run_dir} (recipe.json missing)")
    cfg = RecipeConfig.from_json(json.loads(cfg_file.read_text()))
    snaps = list_snapshots(cfg)
    if not snaps:
        raise ModelError(f"no snapshots in {run_dir}/snapshots")
    chosen = [s for i, s in enumerate(snaps) if i % max(1, every) == 0 or s == snaps[-1]]
    if snapshots:
        wanted = {int(x) for x in snapshots.split(",") if x.strip()}
        chosen = [s for s in snaps if int(s.stem.replace("step", "")) in wanted]
        if not chosen:
            raise ModelError(f"none of the snapshots {sorted(wanted)} exist in {run_dir}/snapshots")
    chosen_kinds = [x.strip() for x in kinds.split(",") if x.strip()]
    plist = default_prompts(chosen_kinds, prompts_per_kind, 0)
    scfg = ScoreConfig(k=k, prompts_per_kind=prompts_per_kind, steps=steps, guidance=guidance)
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for snap in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            model = export_snapshot(cfg, Path(tmp) / "model", snap)
            res = run_score(plist, scfg, model_dir=model, judge_dir=judge)
        step = int(snap.stem.replace("step", ""))
        rows.append({"step": step, **{kind: s["exact"] for kind, s in res["summary"].items()},
                     "samples": {kind: s["samples"] for kind, s in res["summary"].items()},
                     "detail": res["summary"]})
        typer.echo(f"step {step}: " + ", ".join(f"{kd} {100 * s['exact']:.1f}%" for kd, s in res["summary"].items()))
        (out / "curve.json").write_text(json.dumps(rows, indent=1))
    kinds_ = [kd for kd in chosen_kinds if kd in rows[0]]
    md = ["| step | " + " | ".join(f"{kd} exact" for kd in kinds_) + " | samples per kind |",
          "|---|" + "---|" * (len(kinds_) + 1)]
    for r in rows:
        md.append(f"| {r['step']} | " + " | ".join(f"{100 * r[kd]:.1f}%" for kd in kinds_)
                  + f" | {r['samples'][kinds_[0]]} |")
    (out / "curve.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for kd in kinds_:
        ax.plot([r["step"] for r in rows], [100 * r[kd] for r in rows], marker="o", label=kd)
    ax.set_xlabel("UNet steps")
    ax.set_ylabel("exact (%)")
    ax.set_title("held-out prompts, judged")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    typer.echo("\n".join(md))


@world_app.command("compare")
@user_errors
def compare_cmd(
    shipped: Path = typer.Argument(..., help="score.json of the shipped model."),
    candidate: Path = typer.Argument(..., help="score.json of the candidate (same prompts and seeds)."),
):
    """The ship rule: more bars met than the shipped model, no kind worse beyond chance (p < 0.05)."""
    from compinv_rt.apps.world.score import compare, compare_markdown
    from compinv_rt.core.errors import ConfigError

    summaries = []
    for f in (shipped, candidate):
        try:
            summaries.append(json.loads(f.read_text())["summary"])
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{f}: not a world score.json ({e})") from None
    typer.echo(compare_markdown(compare(*summaries)), nl=False)
