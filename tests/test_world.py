"""The shapes world: generator, captions, held-out split, judge, photos, recipe smoke, score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.world import scenes as S
from compinv_rt.apps.world.cli import world_app


def test_generator_is_deterministic_and_boxes_hold_the_objects():
    a, ia = S.sample_scene(123)
    b, ib = S.sample_scene(123)
    c, ic = S.sample_scene(124)
    assert a == b and np.array_equal(ia, ib)
    assert not np.array_equal(ia, ic)
    for seed in range(40):
        sc, im = S.sample_scene(seed)
        assert im.shape == (64, 64, 3) and im.dtype == np.uint8
        assert 1 <= len(sc.objects) <= 3
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x1 - x0 >= 12 and y1 - y0 >= 12  # objects are drawn large
            # the object's colour dominates the box centre (unless a pattern covers it)
            if o.pattern == "plain" and o.shape != "cross":
                cx, cy = int(o.centre[0]), int(o.centre[1])
                px = im[cy, cx].astype(int)
                ref = np.array(S.COLOUR_RGB[o.colour])
                assert np.abs(px - ref).max() < 40, (seed, o, px)
        # boxes of different objects do not overlap much
        for i in range(len(sc.objects)):
            for j in range(i + 1, len(sc.objects)):
                p, q = sc.objects[i].box, sc.objects[j].box
                ix = max(0, min(p[2], q[2]) - max(p[0], q[0]))
                iy = max(0, min(p[3], q[3]) - max(p[1], q[1]))
                assert ix * iy < 0.25 * (p[2] - p[0]) * (p[3] - p[1])


def test_world_has_enough_variety():
    assert len(S.BACKGROUNDS) >= 5 and len(S.SHAPES) >= 6 and len(S.COLOURS) >= 6
    seen = {"bg": set(), "shape": set(), "colour": set(), "pattern": set(), "count": set()}
    for seed in range(300):
        sc, _ = S.sample_scene(seed)
        seen["bg"].add(sc.background)
        seen["count"].add(len(sc.objects))
        for o in sc.objects:
            seen["shape"].add(o.shape)
            seen["colour"].add(o.colour)
            seen["pattern"].add(o.pattern)
    assert seen["bg"] == set(S.BACKGROUNDS)
    assert seen["shape"] == set(S.SHAPES) and seen["colour"] == set(S.COLOURS)
    assert seen["pattern"] == set(S.PATTERNS) and seen["count"] == {1, 2, 3}


def test_captions_mention_every_object_and_the_background():
    templates = set()
    for seed in range(200):
        sc, _ = S.sample_scene(seed)
        spec = S.parse_prompt(sc.caption)
        assert spec.background == sc.background, sc.caption
        stated = sorted((c, s, p or "plain") for c, s, p in spec.objects)
        truth = sorted((o.colour, o.shape, o.pattern) for o in sc.objects)
        assert stated == truth, sc.caption
        templates.add(sc.caption.split(" a ")[0] if " a " in sc.caption else sc.caption[:5])
    assert len(templates) >= 3


def test_heldout_split_is_respected():
    for seed in range(500):
        sc, _ = S.sample_scene(seed, "train")
        pairs = [o.pair for o in sc.objects]
        assert not any(p in S.HELDOUT_PAIRS for p in pairs)
        assert S.is_train_scene(sc.background, pairs)
    # every held-out prompt is something training never shows
    for kind in ("single", "two", "novel"):
        prompts = S.heldout_prompts(kind, 100)
        assert len(prompts) >= 20
        for p in prompts:
            spec = S.parse_prompt(p)
            pairs = [(c, s) for c, s, _ in spec.objects]
            assert not S.is_train_scene(spec.background, pairs), p
    with pytest.raises(ValueError):
        S.sample_scene(0, "train", background="sand", objects=[("orange", "heart", "plain")])


def test_embedded_judge_reads_clean_scenes():
    from compinv_rt.apps.world.judge import evaluate_judge, load_judge

    judge = load_judge()
    acc = evaluate_judge(judge, n=60, seed0=123_456_789)
    assert acc["background"] >= 0.9
    assert acc["exact_object_set"] >= 0.9
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9
    # and it is not fooled by a blank image
    blank = np.full((1, 64, 64, 3), 128, np.uint8)
    assert len(judge(blank)[0].objects) == 0


def test_photos_write_images_and_concept(tmp_path):
    from PIL import Image

    out = tmp_path / "photos"
    r = CliRunner().invoke(world_app, ["photos", "--out", str(out), "--count", "3", "--shape", "star",
                                       "--colour", "blue", "--pattern", "striped", "--background", "night"])
    assert r.exit_code == 0, r.output
    concept = json.loads((out / "concept.json").read_text())
    assert concept["class_word"] == "star" and concept["background"] == "night"
    assert concept["attributes"]["colour"] == "blue" and len(concept["files"]) == 3
    assert concept["seen_by_base_model"] is False  # blue stars are held out
    for f in concept["files"]:
        im = Image.open(out / f)
        assert im.size == (64, 64)
    r = CliRunner().invoke(world_app, ["photos", "--out", str(out), "--shape", "hexagon"])
    assert r.exit_code == 1 and "unknown shape" in r.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A few steps of every stage of the recipe on the tiny architecture. Shared and read-only:
    a test that trains further works on its own copy (`_copy_run`)."""
    run = tmp_path_factory.mktemp("tinyrun")
    args = ["train", "--run-dir", str(run), "--tiny", "--vae-steps", "4", "--unet-steps", "4",
            "--cache-scenes", "24", "--ckpt-every", "2", "--snapshot-every", "2", "--procs", "1"]
    r = CliRunner().invoke(world_app, args)
    # a 4-step VAE cannot pass the judge's gate: the UNet stages must refuse it
    assert r.exit_code == 1 and "gate" in r.output, r.output
    r = CliRunner().invoke(world_app, args + ["--force"])
    assert r.exit_code == 0, r.output
    return run


def _copy_run(tiny_run, tmp_path):
    """A private copy of the tiny run (mtimes kept) and its recipe config pointing at the copy."""
    import dataclasses
    import shutil

    from compinv_rt.apps.world.recipe import RecipeConfig

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = RecipeConfig.from_json(json.loads((run / "recipe.json").read_text()))
    return run, dataclasses.replace(cfg, run_dir=str(run))


@pytest.mark.slow
def test_recipe_smoke_and_resume(tiny_run, tmp_path):
    from compinv_rt.apps.world.recipe import RecipeConfig, _load_tensors, list_snapshots

    gate = json.loads((tiny_run / "gate.json").read_text())
    assert gate["passed"] is False and 0 <= gate["exact_object_set_recon"] <= 1
    _, meta = _load_tensors(tiny_run / "unet_ckpt.safetensors")
    assert meta["step"] == 4
    cfg = RecipeConfig.from_json(json.loads((tiny_run / "recipe.json").read_text()))
    assert [p.name for p in list_snapshots(cfg)] == ["step000002.safetensors", "step000004.safetensors"]
    # resuming to 6 steps continues from the checkpoint rather than starting over
    run, _ = _copy_run(tiny_run, tmp_path)
    r = CliRunner().invoke(world_app, ["train", "--run-dir", str(run), "--tiny", "--stages", "unet",
                                       "--unet-steps", "6", "--ckpt-every", "2", "--force", "--procs", "1"])
    assert r.exit_code == 0, r.output
    _, meta = _load_tensors(run / "unet_ckpt.safetensors")
    assert meta["step"] == 6
    assert (run / "snapshots" / "step000006.safetensors").is_file()


@pytest.mark.slow
def test_recipe_resume_is_bit_identical_to_an_uninterrupted_run(tiny_run, tmp_path):
    """Resuming 4 -> 6 steps gives exactly the weights of 0 -> 6 steps, and skips the done work:
    the snapshots of steps 2 and 4 are not written again."""
    import shutil

    from compinv_rt.apps.world.recipe import _load_tensors, train_unet

    resumed, cfg_resumed = _copy_run(tiny_run, tmp_path / "a")
    fresh, cfg_fresh = _copy_run(tiny_run, tmp_path / "b")
    (fresh / "unet_ckpt.safetensors").unlink()  # the same latent cache, no UNet progress
    shutil.rmtree(fresh / "snapshots")
    done = {p.name: p.stat().st_mtime_ns for p in (resumed / "snapshots").iterdir()}
    train_unet(cfg_resumed, steps=6)
    train_unet(cfg_fresh, steps=6)
    assert {n: (resumed / "snapshots" / n).stat().st_mtime_ns for n in done} == done
    a, meta_a = _load_tensors(resumed / "unet_ckpt.safetensors")
    b, meta_b = _load_tensors(fresh / "unet_ckpt.safetensors")
    assert meta_a["step"] == meta_b["step"] == 6 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_exported_model_loads_in_stock_pipeline_and_scores(tiny_run, tmp_path):
    from compinv_rt.apps.world.score import ScoreConfig, load_pipeline, score

    model = tiny_run / "model"
    idx = json.loads((model / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline(model)
    assert pipe.text_encoder.dtype == pipe.unet.dtype  # fp16 files load as float32 everywhere
    prompts = [("single", "a red star on grass"), ("two", "a blue circle and a yellow heart at night")]
    res = score(prompts, ScoreConfig(k=2, steps=2, batch=4), out_dir=tmp_path, pipe=pipe)
    s = res["summary"]
    assert set(s) == {"single", "two"} and s["single"]["samples"] == 2
    assert 0.0 <= s["two"]["exact"] <= 1.0
    assert (tmp_path / "score.md").read_text().startswith("| kind |")
    assert (tmp_path / "grid_single.png").is_file()


def test_check_requires_every_stated_attribute():
    from compinv_rt.apps.world.judge import Detection, Judgement
    from compinv_rt.apps.world.score import check

    spec = S.parse_prompt("a red star and a blue circle on grass")
    d_star = Detection("star", "red", "plain", 0.9, (0, 0, 10, 10), "left")
    d_circ = Detection("circle", "blue", "plain", 0.9, (30, 0, 40, 10), "right")
    d_bad = Detection("circle", "red", "plain", 0.9, (30, 0, 40, 10), "right")
    assert check(spec, Judgement("grass", (d_circ, d_star)))["exact"]
    assert not check(spec, Judgement("sand", (d_circ, d_star)))["exact"]
    assert not check(spec, Judgement("grass", (d_star, d_bad)))["exact"]
    assert not check(spec, Judgement("grass", (d_star,)))["exact"]


@pytest.mark.slow
def test_data_parallel_resume_matches_the_recipe(tiny_run, tmp_path):
    """Two data-parallel processes (gloo) continue the tiny run and write one checkpoint."""
    from compinv_rt.apps.world.recipe import _load_tensors, train_unet_parallel

    run, cfg = _copy_run(tiny_run, tmp_path)
    res = train_unet_parallel(cfg, 2, steps=8)
    assert res["steps"] == 8
    t, meta = _load_tensors(run / "unet_ckpt.safetensors")
    assert meta["step"] == 8
    assert all(bool(v.isfinite().all()) for k, v in t.items() if k.startswith("unet.") and v.is_floating_point())


def test_place_captions_state_every_object_where_its_box_is():
    placed = 0
    for seed in range(200):
        sc, _ = S.sample_scene(seed)
        spec = S.parse_prompt(sc.caption)
        if not spec.places:
            continue
        placed += 1
        assert all(o.size in sc.caption for o in sc.objects)  # placed captions state sizes too
        assert list(spec.places) == [o.place(sc.size) for o in sc.objects], sc.caption
        for o, p in zip(sc.objects, spec.places):
            assert S.in_place(*o.centre, sc.size, p, margin=0.0)
    assert 50 <= placed <= 110  # place_prob 0.4 of 200 scenes
    # every place phrase parses back to its place (a missing axis word means middle / centre)
    for place, phrase in S.PLACE_PHRASES.items():
        assert S.parse_prompt(f"a red star {phrase} and a blue circle on grass").places == (place, None)
    assert S.parse_prompt("a red star on grass").places == ()


def test_place_of_and_in_place_agree_on_the_bounds():
    assert S.place_of(10, 10, 64) == ("top", "left")
    assert S.place_of(32, 32, 64) == ("middle", "centre")
    assert S.place_of(60, 32, 64) == ("middle", "right")
    assert S.in_place(27, 32, 64, ("middle", "left"))  # 0.42: just across the bound, within margin
    assert not S.in_place(27, 32, 64, ("middle", "left"), margin=0.0)
    assert not S.in_place(50, 32, 64, ("middle", "left"))
    assert not S.in_place(10, 60, 64, ("top", "left"))


def test_cached_scene_records_keep_boxes_and_captions_are_redrawn():
    from compinv_rt.apps.world.recipe import _scene_record, caption_for

    sc, _ = S.sample_scene(7)
    rec = json.loads(json.dumps(_scene_record(sc)))  # as stored in the cache's JSON metadata
    rng = np.random.default_rng(0)
    caps = [caption_for(rec, rng, 0.3, 0.5) for _ in range(60)]
    with_places = [c for c in caps if S.parse_prompt(c).places]
    assert 15 <= len(with_places) <= 45 and len(set(caps)) > 10
    for c in with_places:
        assert list(S.parse_prompt(c).places) == [o.place(sc.size) for o in sc.objects]
    for c in caps:
        assert [(o[:2]) for o in S.parse_prompt(c).objects] == [(o.colour, o.shape) for o in sc.objects]
    # records of older caches (no boxes) never get places
    old = [rec[0], [o[:4] for o in rec[1]]]
    assert not any(S.parse_prompt(caption_for(old, rng, 0.3, 1.0)).places for _ in range(20))


def test_new_heldout_kinds_are_held_out_and_state_what_they_claim():
    for kind in ("two-patterns", "three", "positioned"):
        prompts = S.heldout_prompts(kind, 30)
        assert len(prompts) == 30 and len(set(prompts)) >= 25, kind
        for p in prompts:
            spec = S.parse_prompt(p)
            pairs = [(c, s) for c, s, _ in spec.objects]
            assert spec.background and all(c and s for c, s in pairs)
            if kind == "two-patterns":
                assert len(pairs) == 2 and all(pt in ("dotted", "striped") for _, _, pt in spec.objects)
            if kind == "three":
                assert len(pairs) == 3
            if kind == "positioned":
                assert len(spec.places) == len(pairs) and all(spec.places)
            if kind != "positioned":
                assert not S.is_train_scene(spec.background, pairs), p
    combos = S.combination_prompts()
    assert len(combos) == len(S.COLOURS) * len(S.PATTERNS) * len(S.SHAPES) * len(S.BACKGROUNDS)
    for (c, pt, s, bg), p in combos[:40]:
        spec = S.parse_prompt(p)
        assert spec.background == bg and spec.objects[0][:2] == (c, s)
        assert spec.objects[0][2] == (None if pt == "plain" else pt)


def test_check_scores_places_and_combination_table_lists_worst_cells():
    from compinv_rt.apps.world.judge import Detection, Judgement
    from compinv_rt.apps.world.score import check, combination_table

    spec = S.parse_prompt("a small red star at the top left and a large blue circle on the right on grass")
    star = Detection("star", "red", "plain", 0.9, (2, 2, 20, 20), "left")
    circ = Detection("circle", "blue", "plain", 0.9, (40, 20, 60, 44), "right")
    circ_left = Detection("circle", "blue", "plain", 0.9, (2, 40, 20, 60), "left")
    good = check(spec, Judgement("grass", (star, circ)))
    assert good["exact"] and good["placed"]
    bad = check(spec, Judgement("grass", (star, circ_left)))
    assert bad["objects"] and not bad["placed"] and not bad["exact"]
    assert "placed" not in check(S.parse_prompt("a red star on grass"), Judgement("grass", (star,)))

    rows = []
    for (c, pt, s, bg), p in S.combination_prompts():
        hit = not (c == "red" and s == "star" and pt == "dotted" and bg in ("grass", "sand"))
        rows += [{"kind": "combinations", "prompt": p, "check": {"exact": hit}}] * 2
    t = combination_table(rows, worst=3)
    assert t["combinations"] == 108 and t["passing"] == 107 and t["samples_per_cell"] == 2
    assert [(w["colour"], w["pattern"], w["shape"], w["exact"]) for w in t["worst"][:2]] == [
        ("red", "dotted", "star", 0.0)] * 2
    assert t["worst"][2]["exact"] == 1.0


def test_gpu_mode_path_on_cpu_init_from_and_compact_resume(tiny_run, tmp_path):
    """The GPU code path (device, bf16 autocast) runs on the CPU; a run continues from an exported
    model, and a compact checkpoint (fp16, no optimizer) resumes a fresh run directory."""
    from safetensors.torch import load_file

    from compinv_rt.apps.world.recipe import _load_tensors

    init = tiny_run / "model"
    run = tmp_path / "v2"
    common = ["train", "--tiny", "--stages", "cache,unet", "--cache-scenes", "16", "--procs", "1",
              "--device", "cpu", "--precision", "bf16", "--unet-lr", "1e-4", "--warmup", "1",
              "--ckpt-every", "1", "--snapshot-every", "2", "--seed", "1", "--force"]
    r = CliRunner().invoke(world_app, common + ["--run-dir", str(run), "--init-from", str(init),
                                                "--unet-steps", "2"])
    assert r.exit_code == 0, r.output
    t, meta = _load_tensors(run / "unet_ckpt.safetensors")
    assert meta["step"] == 2
    # started from the exported weights, not from the (seed 1) random initialisation
    w0 = load_file(str(init / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    assert (t["unet." + key] - w0[key].float()).abs().max() < 5e-3
    assert all(bool(v.isfinite().all()) for v in t.values() if v.is_floating_point())
    lat, lmeta = _load_tensors(run / "latents.safetensors")
    vae_cfg = json.loads((init / "vae" / "config.json").read_text())
    assert lmeta["scale"] == vae_cfg["scaling_factor"]
    assert all(len(o) == 5 for rec in lmeta["scenes"] for o in rec[1])  # boxes kept

    ck = tmp_path / "compact.safetensors"
    r = CliRunner().invoke(world_app, ["checkpoint", "--run-dir", str(run), "--out", str(ck)])
    assert r.exit_code == 0, r.output
    c, cmeta = _load_tensors(ck)
    assert cmeta["step"] == 2 and not any(k.startswith("opt.") for k in c)
    assert all(v.dtype.is_floating_point is False or v.dtype.itemsize == 2 for v in c.values())
    run2 = tmp_path / "v2b"
    r = CliRunner().invoke(world_app, common + ["--run-dir", str(run2), "--init-from", str(init),
                                                "--resume-from", str(ck), "--unet-steps", "3"])
    assert r.exit_code == 0, r.output
    t2, meta2 = _load_tensors(run2 / "unet_ckpt.safetensors")
    assert meta2["step"] == 3 and any(k.startswith("opt.") for k in t2)
    assert (t2["ema_unet." + key] - c["ema_unet." + key].float()).abs().max() < 5e-3

    r = CliRunner().invoke(world_app, common + ["--run-dir", str(tmp_path / "bad"), "--device", "tpu"])
    assert r.exit_code == 1 and "error:" in r.output and "--device" in r.output


def test_score_rejects_unknown_kinds():
    r = CliRunner().invoke(world_app, ["score", "--kinds", "single,four"])
    assert r.exit_code == 1 and "error:" in r.output and "four" in r.output


def test_grown_unet_starts_exactly_equal_to_the_shipped_one():
    """Issue 22: cross-attention added at 16x16 starts as the identity, so the grown base computes
    bit for bit what the shipped one does until it trains; a state that does not fit is refused."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from compinv_rt.apps.world.model import ArchConfig, build_unet, default_model_dir, grow_unet
    from compinv_rt.core.errors import ModelError

    w = {k: v.float() for k, v in
         load_file(str(default_model_dir() / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    base = build_unet(ArchConfig()).eval()
    base.load_state_dict(w)
    torch.manual_seed(0)
    grown_arch = replace(ArchConfig(), unet_attn=(True, True, True))
    grown = build_unet(grown_arch).eval()
    prefixes = grow_unet(grown, w)
    assert prefixes == ["down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        a = base(x, torch.tensor([999, 400]), enc).sample
        b = grown(x, torch.tensor([999, 400]), enc).sample
    assert torch.equal(a, b)
    # a trained grown block changes the output (the test can fail: the blocks are wired in)
    with torch.no_grad():
        grown.get_submodule(prefixes[0] + ".proj_out").weight.fill_(0.01)
        c = grown(x, torch.tensor([999, 400]), enc).sample
    assert not torch.equal(a, c)
    bad = dict(w)
    bad.pop("conv_in.weight")
    with pytest.raises(ModelError, match="conv_in.weight"):
        grow_unet(build_unet(grown_arch), bad)
    with pytest.raises(ModelError):  # a grown block's weights must not half-come from the state
        grow_unet(build_unet(replace(ArchConfig(), unet_attn=(True, True, True))),
                  {**w, "down_blocks.0.attentions.0.norm.weight": torch.ones(32)})


def test_ship_rule_two_proportion_test_and_intervals():
    from compinv_rt.apps.world.score import compare, compare_markdown, two_proportion_p, wilson

    lo, hi = wilson(121, 125)
    assert lo < 121 / 125 < hi and 0.9 < lo and hi < 0.995
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert two_proportion_p(121, 125, 123, 125) > 0.3  # 96.8 vs 98.4 %: noise
    assert two_proportion_p(79, 125, 123, 125) < 1e-6  # 63.2 vs 98.4 %: not noise

    def summ(**kinds):
        return {k: {"exact": h / n, "samples": n} for k, (h, n) in kinds.items()}

    shipped = summ(single=(123, 125), two=(79, 125), three=(30, 125))
    cand = summ(single=(121, 125), two=(123, 125), three=(90, 125))
    c = compare(shipped, cand)
    assert c["ship"] and c["bars_old"] == 1 and c["bars_new"] == 2 and not c["worse"]
    assert "**ship**" in compare_markdown(c)
    c = compare(shipped, summ(single=(100, 125), two=(123, 125), three=(90, 125)))
    assert not c["ship"] and c["worse"] == ["single"]
    assert not compare(shipped, shipped)["ship"]  # no more bars met: keep the shipped one
