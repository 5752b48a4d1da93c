"""`compinv-rt train`: semantic inversion on tiny models, artifacts, diffusers compatibility,
`--concept` in generate, bad input, and resume after kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app

runner = CliRunner()
TOKEN = "<my-heart>"  # the token of the `trained` fixture (conftest.py)
FAST = ["--batch", "1", "--resolution", "64", "--variants", "2"]


def _table(text_encoder) -> torch.Tensor:
    return text_encoder.get_input_embeddings().weight.detach()


# ------------------------------------------------------------------------------------------------
# embedding rows, vectors, artifacts


@pytest.mark.slow
def test_only_placeholder_rows_change_and_every_vector_trains(trained, tiny_model):
    from compinv_rt.models.artifact import read_embedding_file
    from compinv_rt.models.loading import load_model

    fresh = load_model(str(tiny_model), device="cpu")
    before, after = _table(fresh.text_encoder), _table(trained.model.text_encoder)
    n0 = before.shape[0]
    assert after.shape[0] == n0 + 2
    assert torch.equal(after[:n0], before), "a row other than the placeholder rows changed"
    name, emb, meta = read_embedding_file(trained.out / "embeddings.safetensors")
    assert name == TOKEN and emb.shape == (2, before.shape[1])
    assert torch.equal(after[n0:], emb)
    heart = before[fresh.tokenizer.convert_tokens_to_ids("heart</w>")]
    for i in range(2):  # both vectors were trained (the reference only ever trained the first)
        assert (emb[i] - heart).abs().max() > 1e-4, f"vector {i} never moved from its init"
    assert not torch.equal(emb[0], emb[1])
    assert meta["base_model_hash"] == fresh.hash


def test_placeholder_embedding_gradient_reaches_only_the_vectors(tiny_model):
    from compinv_rt.models import tokens as T
    from compinv_rt.models.loading import load_model

    m = load_model(str(tiny_model), device="cpu")
    ids = T.add_placeholders(m.tokenizer, m.text_encoder, "<x>", 3)
    table = _table(m.text_encoder).clone()
    wrapper = T.install(m.text_encoder, ids[0], torch.randn(3, table.shape[1]) * 0.02)
    prompt = T.expand_prompt("a photo of a <x> heart", "<x>", 3)
    assert prompt == "a photo of a <x> <x>_1 <x>_2 heart"
    assert T.expand_prompt(prompt, "<x>", 3) == prompt  # already expanded: unchanged
    input_ids = m.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert all(i in input_ids[0].tolist() for i in ids)
    opt = torch.optim.AdamW([wrapper.vectors], lr=0.1, weight_decay=0.1)
    m.text_encoder(input_ids)[0].pow(2).mean().backward()
    assert (wrapper.vectors.grad.abs().sum(-1) > 0).all(), "a vector got no gradient"
    opt.step()
    assert torch.equal(_table(m.text_encoder), table)
    T.uninstall(m.text_encoder, wrapper)
    after = _table(m.text_encoder)
    assert torch.equal(after[:ids[0]], table[:ids[0]])
    assert torch.equal(after[ids[0]:], wrapper.vectors.detach())


@pytest.mark.slow
def test_artifact_json_and_files(trained):
    from compinv_rt.models.artifact import file_sha256

    art = json.loads((trained.out / "artifact.json").read_text())
    assert art["schema_version"] == 1 and art["token"] == TOKEN
    assert art["tokens"] == [TOKEN, f"{TOKEN}_1"] and art["vectors"] == 2
    assert art["base_model"]["hash"] == trained.model.hash
    assert art["anchors"][0]["word"] == "heart" and art["anchors"][0]["coefficient"] == 1.0
    assert art["config"]["anchor_weight"] == 0.95 and art["config"]["steps"] == 4
    assert art["steps_done"] == 4 and len(art["loss"]["final"]) == 6  # + the context term
    assert all(np.isfinite(art["loss"]["final"]))
    for name, digest in art["files"].items():
        assert file_sha256(trained.out / name) == digest
    assert (trained.out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vec = art["analysis"]["vectors"][0]
    assert 0 <= vec["norm_percentile"] <= 100 and vec["nearest_word_distance"] >= 0
    assert sorted(p.name for p in (trained.out / "checkpoints").iterdir()) == [
        "step-0000002.safetensors", "step-0000004.safetensors"]


@pytest.mark.slow
def test_stock_diffusers_loads_the_embeddings(trained, tiny_model, stock_pipeline_cls):
    """load_textual_inversion reads our file; the common single-file reading (one tensor, (N, D))
    works too; and the text encoder then sees exactly what our load_concepts gives."""
    from safetensors.torch import load_file

    from compinv_rt.models.concepts import expand_prompt, load_concepts
    from compinv_rt.models.loading import load_model
    from compinv_rt.sampling.pipeline import Pipeline

    path = trained.out / "embeddings.safetensors"
    sd = load_file(str(path))
    assert list(sd) == [TOKEN] and next(iter(sd.values())).shape[0] == 2  # single-file layout

    pipe = stock_pipeline_cls.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion(str(path))
    assert pipe.tokenizer.convert_tokens_to_ids(f"{TOKEN}_1") == pipe.tokenizer.convert_tokens_to_ids(TOKEN) + 1
    prompt = f"a photo of a {TOKEN} heart on grass"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]

    m = load_model(str(tiny_model), device="cpu")
    concepts = load_concepts(m, [trained.out])
    assert concepts[0].token == TOKEN and concepts[0].vectors == 2
    ours = Pipeline(m).encode_prompts([expand_prompt(prompt, concepts)])
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.slow
def test_generate_with_concept_matches_stock_diffusers(trained, tiny_model, tmp_path,
                                                       stock_pipeline_cls):
    prompt = f"a {TOKEN} heart on grass"
    res = runner.invoke(app, ["generate", prompt, "--model", str(tiny_model), "--concept",
                              str(trained.out), "-n", "1", "--steps", "3", "--seed", "5",
                              "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    png = next((tmp_path / "g").glob("*_5.png"))
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["concepts"][0]["token"] == TOKEN and side["prompt"] == prompt

    from PIL import Image

    pipe = stock_pipeline_cls.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion(str(trained.out / "embeddings.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(5)]).images[0]
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert np.abs(a - np.asarray(ref, dtype=np.int16)).max() <= 1


@pytest.mark.slow
def test_concept_from_another_base_model_is_refused(trained, tiny_vpred_model, tmp_path):
    from compinv_rt.core.errors import ArtifactError
    from compinv_rt.models.concepts import load_concepts
    from compinv_rt.models.loading import load_model

    m = load_model(str(tiny_vpred_model), device="cpu")
    with pytest.raises(ArtifactError, match="another base model"):
        load_concepts(m, [trained.out])
    out = tmp_path / "g"
    res = runner.invoke(app, ["generate", "a heart", "--model", str(tiny_vpred_model),
                              "--concept", str(trained.out), "--out", str(out)])
    assert res.exit_code == 1 and res.stderr.startswith("error: ")
    assert "another base model" in res.stderr and not out.exists()


def test_concept_folder_without_artifact_is_refused(tiny_model, tmp_path):
    (tmp_path / "half").mkdir()
    res = runner.invoke(app, ["generate", "a heart", "--model", str(tiny_model), "--concept",
                              str(tmp_path / "half"), "--out", str(tmp_path / "g")])
    assert res.exit_code == 1 and "artifact.json is missing" in res.stderr


# ------------------------------------------------------------------------------------------------
# losses and anchors


def test_masked_mse_counts_only_masked_pixels():
    from compinv_rt.train.losses import masked_mse

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    pred = target + 100.0 * (1 - mask)  # wrong only outside the mask
    assert masked_mse(pred, target, mask) == 0
    pred = target + torch.randn(2, 4, 8, 8, generator=g)
    inside = ((pred - target) ** 2)[mask.expand(-1, 4, -1, -1).bool()]
    assert torch.allclose(masked_mse(pred, target, mask), inside.mean())
    assert not torch.allclose(masked_mse(pred, target, mask), ((pred - target) ** 2).mean())


def test_prediction_targets(tiny_vpred_model):
    from diffusers import DDPMScheduler

    from compinv_rt.train.losses import diffusion_target

    sched = DDPMScheduler(prediction_type="v_prediction")
    x, n, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * n - (1 - a).sqrt() * x
    assert torch.allclose(diffusion_target(sched, "v_prediction", x, n, t), v, atol=1e-5)
    assert torch.equal(diffusion_target(sched, "epsilon", x, n, t), n)


def test_anchor_loss_uses_the_reference_normalization():
    from compinv_rt.train.anchors import AnchorTarget, anchor_loss

    d = 16
    a = torch.randn(1, d)
    delta = torch.randn(2, d)
    att, l1 = anchor_loss(a + delta, AnchorTarget(a), seq_len=77, l1=0.5)
    assert torch.allclose(att, (delta ** 2).sum() / (77 * d))
    assert l1 == 0  # one fixed anchor: no coefficients to sparsify


def test_k_anchors_are_a_sparse_nonnegative_combination():
    from compinv_rt.train.anchors import AnchorTarget, anchor_loss, report

    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(4, 32, generator=g)
    v = (0.7 * anchors[2] + 0.3 * anchors[0])[None]  # the concept sits between anchors 2 and 0
    target = AnchorTarget(anchors)
    opt = torch.optim.Adam([target.coefs], lr=0.02)
    for _ in range(600):
        att, l1 = anchor_loss(v, target, 77, l1=0.01)
        opt.zero_grad()
        (att + l1).backward()
        opt.step()
        target.project()
    c = target.coefs.detach()
    assert (c >= 0).all()
    assert c[1] == 0 and c[3] == 0, c  # exact zeros
    assert abs(float(c[2]) - 0.7) < 0.1 and abs(float(c[0]) - 0.3) < 0.1, c

    class Tok:
        def convert_ids_to_tokens(self, i):
            return f"w{i}</w>"

    rep = report(Tok(), [10, 11, 12, 13], target)
    assert [r.carries_weight for r in rep] == [True, False, True, False]


@pytest.mark.slow
def test_anchor_term_reaches_the_vectors_in_the_loop(tiny_model, photos, tmp_path):
    """Weight 0 is plain TI; a huge anchor weight pins the vector near the anchor. (0.95 with the
    reference normalization is a gentle pull: over a few steps it is close to plain TI.)"""
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    dist = {}
    for w in (0.0, 1e5):
        cfg = TrainConfig(token="<p>", class_word="heart", anchor_weight=w, steps=8, batch=1,
                          resolution=64, variants=2, checkpoint_every=8, norm="none")
        res = train_concept(prepare(cfg, photos, tiny_model), tmp_path / str(w), device="cpu")
        dist[w] = res.record["anchor_target_distance"]
        assert res.record["method"] == ("textual-inversion" if w == 0 else "semantic-inversion")
    assert dist[0.0] > 0.02 and dist[1e5] < 0.3 * dist[0.0], dist


def test_auto_k_picks_the_nearest_real_words(tiny_model):
    from compinv_rt.models.loading import load_model
    from compinv_rt.train.anchors import real_word_ids, resolve_anchor_ids

    m = load_model(str(tiny_model), device="cpu")
    table = _table(m.text_encoder)
    init = m.tokenizer.convert_tokens_to_ids("heart</w>")
    ids = resolve_anchor_ids(m.tokenizer, table, "auto:4", "heart", init)
    assert len(ids) == 4 and len(set(ids)) == 4 and ids[0] == init
    words = real_word_ids(m.tokenizer)
    assert set(ids) <= set(words)
    assert all(re.fullmatch(r"[a-z]{2,}</w>", m.tokenizer.convert_ids_to_tokens(i)) for i in ids)
    cos = torch.nn.functional.cosine_similarity(table[words], table[init][None], dim=-1)
    kth = torch.nn.functional.cosine_similarity(table[ids[-1]], table[init], dim=0)
    assert int((cos > kth + 1e-6).sum()) == 3  # exactly the three others are nearer than the 4th


@pytest.mark.slow
def test_semantic_inversion_with_auto_anchors_on_v_prediction(tiny_vpred_model, photos, tmp_path):
    out = tmp_path / "c"
    res = runner.invoke(app, ["train", "--images", str(photos), "--token", "<zz-heart>",
                              "--class-word", "heart", "--out", str(out), "--model",
                              str(tiny_vpred_model), "--anchors", "auto:3", "--steps", "3",
                              "--grad-accum", "2", "--no-augment", *FAST])
    assert res.exit_code == 0, res.output
    assert "anchors carrying weight:" in res.stdout
    art = json.loads((out / "artifact.json").read_text())
    assert art["base_model"]["prediction_type"] == "v_prediction"
    assert [a["word"] for a in art["anchors"]][0] == "heart" and len(art["anchors"]) == 3
    assert art["images"]["variants"] == 3  # --no-augment: the images only
    assert sum(a["coefficient"] for a in art["anchors"]) > 0
    assert art["effective_lr"] == pytest.approx(5e-3 * 1 * 2)  # lr x batch x grad-accum


# ------------------------------------------------------------------------------------------------
# bad input


def _bad(args, out, expect):
    res = runner.invoke(app, ["train", *args, "--out", str(out), "--steps", "2"])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("error: ") and expect in err, err
    assert not out.exists(), "something was written for a refused run"
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "in-vocab", "anchor", "auto-k",
                                  "auto-0", "init", "resolution"])
def test_bad_input(case, tiny_model, photos, tmp_path):
    import shutil

    images, token, extra = photos, TOKEN, []
    if case == "missing":
        images = tmp_path / "nope"
    elif case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "corrupt":
        images = tmp_path / "imgs"
        shutil.copytree(photos, images)
        f = images / "photo_001.png"
        f.write_bytes(f.read_bytes()[:120])
    elif case == "in-vocab":
        token = "Heart"
    elif case == "anchor":
        extra = ["--anchors", "heart,polkadot"]
    elif case == "auto-k":
        extra = ["--anchors", "auto:many"]
    elif case == "auto-0":
        extra = ["--anchors", "auto:0"]
    elif case == "init":
        extra = ["--init-word", "polkadot"]
    elif case == "resolution":
        extra = ["--resolution", "72"]
    expect = {"missing": "not found", "empty": "no images", "corrupt": "corrupt image",
              "in-vocab": "already in the tokenizer's vocabulary", "anchor": "unknown anchor word",
              "auto-k": "auto:K", "auto-0": "auto:K", "init": "unknown init word",
              "resolution": "not a multiple of 16"}[case]
    _bad(["--images", str(images), "--token", token, "--class-word", "heart", "--model",
          str(tiny_model), *extra], tmp_path / "out", expect)


def test_non_empty_out_needs_resume(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    res = runner.invoke(app, ["train", "--images", str(photos), "--token", TOKEN, "--class-word",
                              "heart", "--model", str(tiny_model), "--out", str(out)])
    assert res.exit_code == 1 and "--resume" in res.stderr


@pytest.mark.slow
def test_resume_refuses_a_different_config(trained, photos, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained.out, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = runner.invoke(app, ["train", "--images", str(photos), "--token", TOKEN, "--class-word",
                              "heart", "--model", str(trained.model.root), "--out", str(out),
                              "--vectors", "2", "--steps", "4", "--batch", "2", "--resolution", "64",
                              "--variants", "2", "--lr", "0.001", "--resume"])
    assert res.exit_code == 1 and "different lr" in res.stderr, res.output
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------------
# resume after kill -9


@pytest.mark.slow
def test_resume_after_kill_9_repeats_the_uninterrupted_run(tiny_model, photos, tmp_path):
    from compinv_rt.models.artifact import read_embedding_file

    every, steps = 10, 150
    args = ["train", "--images", str(photos), "--token", TOKEN, "--class-word", "heart",
            "--model", str(tiny_model), "--steps", str(steps), "--checkpoint-every", str(every),
            "--seed", "3", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "compinv_rt.apps.cli", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints"
    deadline = time.time() + 150
    while time.time() < deadline and not (ck / "step-0000020.safetensors").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in ck.glob("step-*.safetensors"))
    assert saved and not (out / "artifact.json").exists(), "the run must be killed part-way"
    newest = int(saved[-1][5:12])
    assert 20 <= newest < steps

    res = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    resumed_at = int(re.search(r"resuming from checkpoint at step (\d+)", res.stderr).group(1))
    assert resumed_at == newest  # at most one interval of work lost
    art = json.loads((out / "artifact.json").read_text())
    assert art["steps_done"] == steps
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    clean = tmp_path / "clean"
    assert runner.invoke(app, [*args, "--out", str(clean)]).exit_code == 0
    _, resumed, _ = read_embedding_file(out / "embeddings.safetensors")
    _, straight, _ = read_embedding_file(clean / "embeddings.safetensors")
    assert torch.equal(resumed, straight)
    assert json.loads((clean / "artifact.json").read_text())["loss"] == art["loss"]


# ------------------------------------------------------------------------------------------------
# what the photos show besides the concept: captions, masks, the context token


def test_world_photos_write_background_captions_and_subject_masks(photos):
    from PIL import Image

    from compinv_rt.apps.world.scenes import BG_PHRASES, _box_from_mask

    concept = json.loads((photos / "concept.json").read_text())
    captions = json.loads((photos / "captions.json").read_text())
    assert set(captions) == set(concept["files"])
    assert all(c in BG_PHRASES[concept["background"]] for c in captions.values())
    for name, box in zip(concept["files"], concept["boxes"]):
        mask = np.asarray(Image.open(photos / "masks" / name), np.float32) / 255
        assert 0.05 < (mask > 0.5).mean() < 0.6  # a silhouette, not the whole photo
        x0, y0, x1, y1 = _box_from_mask(mask)  # the fill plus a 1-pixel outline
        assert all(abs(a - b) <= 1 for a, b in zip((x0, y0, x1, y1), box)), (name, box)
        inside = mask[box[1]:box[3], box[0]:box[2]].mean()
        assert inside < 0.95  # the shape's silhouette, not its box


def test_captions_auto_file_and_none(photos, tmp_path):
    import shutil

    from compinv_rt.core.errors import ConfigError
    from compinv_rt.train.data import list_images, read_captions

    files = list_images(photos)
    auto = read_captions("auto", files)
    assert auto == [json.loads((photos / "captions.json").read_text())[f.name] for f in files]
    assert read_captions("none", files) is None
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in files:
        shutil.copy(f, bare / f.name)
    bare_files = list_images(bare)
    assert read_captions("auto", bare_files) is None  # nothing to detect
    for f in bare_files:  # per-photo .txt sidecars
        f.with_suffix(".txt").write_text(f"  on the {f.stem}\n")
    assert read_captions("auto", bare_files) == [f"on the {f.stem}" for f in bare_files]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({files[0].name: "on grass"}))
    with pytest.raises(ConfigError, match="no caption for"):
        read_captions(str(partial), files)


def test_training_prompts_name_each_photos_context(tiny_model, photos):
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.data import build_prompts, make_variants
    from compinv_rt.train.loop import prepare

    plan = prepare(TrainConfig(token="<c>", class_word="heart", context_token=True,
                               resolution=64), photos, tiny_model)
    ctx = plan.prompt_contexts()
    captions = json.loads((photos / "captions.json").read_text())
    assert ctx == [f"{captions[f.name]} <c>_ctx" for f in plan.image_files]
    variants = make_variants(plan.images, 64, True, 3, 0, None, ctx)
    table = build_prompts(plan.tokenizer, ("a photo of a {}",), "<c>", "heart", ctx)
    for v, image_ctx in zip(variants[::3], ctx):
        assert v.context == image_ctx
        texts = [table.prompts[r] for r in table.rows[v.group, v.context]]
        assert texts == [f"a photo of a <c> heart {image_ctx}"]
    plain = prepare(TrainConfig(token="<c>", class_word="heart", captions="none"), photos,
                    tiny_model)
    assert plain.prompt_contexts() is None


def test_masks_are_soft_and_follow_the_augmentation(photos):
    from compinv_rt.train.data import list_images, make_variants, read_images, read_masks

    files = list_images(photos)
    masks = read_masks(str(photos / "masks"), files)
    m = masks[0]
    assert m.max() == pytest.approx(1.0) and m.min() == 0.0
    border = (m > 0.02) & (m < 0.98)
    assert border.sum() > (m >= 0.98).sum() * 0.1  # a soft border around the silhouette
    variants = make_variants(read_images(files), 64, True, 6, 0, masks)
    for v in variants:
        assert v.mask.shape == (64, 64) and 0 <= v.mask.min() and v.mask.max() <= 1
        assert v.mask.mean() < 0.8  # the subject only, wherever the augmentation moved it
    flat = make_variants(read_images(files), 64, False, 1, 0, None)
    assert all(v.mask.min() == 1 for v in flat)


def test_context_token_is_trained_and_never_saved(tiny_model, photos, tmp_path):
    from compinv_rt.models.artifact import read_embedding_file
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    cfg = TrainConfig(token="<k>", class_word="heart", context_token=True, steps=3, batch=1,
                      resolution=64, variants=2, checkpoint_every=3, masks=str(photos / "masks"))
    res = train_concept(prepare(cfg, photos, tiny_model), tmp_path / "c", device="cpu")
    name, emb, _ = read_embedding_file(tmp_path / "c" / "embeddings.safetensors")
    assert name == "<k>" and emb.shape[0] == 1
    assert res.record["tokens"] == ["<k>"]


def test_norm_auto_constrains_plain_ti_only():
    from compinv_rt.train.config import NORM_FOR_TI, TrainConfig

    assert TrainConfig(token="<a>", class_word="heart", anchor_weight=0).norm_spec == NORM_FOR_TI
    assert TrainConfig(token="<a>", class_word="heart").norm_spec == "none"  # semantic inversion
    assert TrainConfig(token="<a>", class_word="heart", anchor_weight=0, norm="3").norm_spec == "3"


def test_norm_specs_parse():
    from compinv_rt.train.regularizers import parse_norm

    assert parse_norm("vocab") == ("vocab", 1.0) and parse_norm("Vocab:2.5") == ("vocab", 2.5)
    assert parse_norm("3") == ("fixed", 3.0) and parse_norm(None) == ("none", None)
    for bad in ("vocab:0", "vocab:x", "vocabx", "vocab:", "-1", "inf", "huge", "fixed:2"):
        with pytest.raises(ValueError):
            parse_norm(bad)


@pytest.mark.parametrize("spec,factor", [("vocab", 1.0), ("vocab:2", 2.0)])
def test_norm_constraint_keeps_the_vocabulary_norm(spec, factor, tiny_model, photos, tmp_path):
    from compinv_rt.models.artifact import read_embedding_file
    from compinv_rt.train.analysis import vocabulary_ids
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept
    from compinv_rt.train.regularizers import vocabulary_norm

    cfg = TrainConfig(token="<n>", class_word="heart", norm=spec, vectors=2, steps=3, batch=1,
                      resolution=64, variants=2, checkpoint_every=3, lr=0.5, anchor_weight=0)
    res = train_concept(prepare(cfg, photos, tiny_model), tmp_path / "n", device="cpu")
    _, emb, _ = read_embedding_file(tmp_path / "n" / "embeddings.safetensors")
    table = res.model.text_encoder.get_input_embeddings().weight.detach()
    want = factor * vocabulary_norm(table, vocabulary_ids(res.model.tokenizer))
    assert res.record["norm_constraint"] == {"spec": spec, "value": pytest.approx(want, rel=1e-5)}
    assert torch.allclose(emb.norm(dim=-1), torch.full((2,), want), rtol=1e-4)
    heart = table[res.model.tokenizer.convert_tokens_to_ids("heart</w>")]
    assert (emb[0] - heart * want / heart.norm()).abs().max() > 1e-3  # the direction moved


def test_context_regularizer_compares_the_other_tokens_only(tiny_model):
    from compinv_rt.models import tokens as T
    from compinv_rt.models.loading import load_model
    from compinv_rt.train.regularizers import ContextRegularizer

    m = load_model(str(tiny_model), device="cpu")
    ids = T.add_placeholders(m.tokenizer, m.text_encoder, "<r>", 2)
    table = m.text_encoder.get_input_embeddings().weight.detach()
    heart = table[m.tokenizer.convert_tokens_to_ids("heart</w>")]
    wrapper = T.install(m.text_encoder, ids[0], heart[None].repeat(2, 1))
    reg = ContextRegularizer(m.tokenizer, m.text_encoder, ("a photo of a {}",), "<r> <r>_1",
                             "heart", 2, ("a dog", "a red cup"), use_mask=False)
    ref_ids = m.tokenizer(["a photo of a heart and a dog"], padding="max_length",
                          max_length=m.tokenizer.model_max_length).input_ids[0]
    s = int(reg.start[0])
    assert reg.ids[0, s:s + 2].tolist() == ids  # the two vectors, then the class word
    assert reg.ids[0, s + 3:].tolist() == ref_ids[s + 1:len(ref_ids) - 2]  # aligned after it
    loss = reg.loss(m.text_encoder, torch.Generator().manual_seed(0), 2)
    loss.backward()
    assert loss.item() > 0 and wrapper.vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["norm", "captions", "masks", "context-weight"])
def test_bad_context_options(case, photos, tmp_path):
    args = {"norm": ["--norm", "huge"], "captions": ["--captions", str(tmp_path / "none.json")],
            "masks": ["--masks", str(tmp_path / "nomasks")],
            "context-weight": ["--context-weight", "-1"]}[case]
    expect = {"norm": "bad --norm", "captions": "--captions file not found",
              "masks": "is not a folder", "context-weight": "--context-weight must be >= 0"}[case]
    _bad(["--images", str(photos), "--token", "<q>", "--class-word", "heart", *args],
         tmp_path / "out", expect)


def test_auto_masks_from_the_base_models_attention(tiny_model, photos, tmp_path):
    from compinv_rt.models.loading import load_model
    from compinv_rt.train.auto_masks import attention_masks, iou
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.data import list_images, read_images
    from compinv_rt.train.loop import prepare, train_concept

    m = load_model(str(tiny_model), device="cpu")
    images = read_images(list_images(photos))
    masks = attention_masks(m, images, 64, "heart")
    assert len(masks) == len(images)
    for mask in masks:
        assert mask.shape == (64, 64) and mask.min() == 0.0 and mask.max() == 1.0
    again = attention_masks(m, images, 64, "heart")  # seeded: the same masks again
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))
    assert iou(masks[0], masks[0]) == 1.0 and iou(masks[0], 1 - masks[0], 0.5) < 1.0
    cfg = TrainConfig(token="<am>", class_word="heart", masks="auto", steps=2, batch=1,
                      resolution=64, variants=2, checkpoint_every=2)
    plan = prepare(cfg, photos, tiny_model)
    assert plan.masks is None  # made once the model is loaded
    train_concept(plan, tmp_path / "am", device="cpu")
    saved = sorted((tmp_path / "am" / "auto_masks").glob("*.png"))
    assert [p.stem for p in saved] == [f.stem for f in list_images(photos)]


# ------------------------------------------------------------------------------------------------
# inputs that would silently change what is learned (issue 28, item 2): refused up front, before
# any weights load or any file is written


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if a refused run gets as far as loading the model's weights."""
    import compinv_rt.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded for a run that must be refused")

    monkeypatch.setattr(loading, "load_model", refuse)


def _bare_photos(photos, tmp_path, name="imgs", masks=False):
    """The session photos without their captions (and masks unless asked), to edit freely."""
    import shutil

    d = tmp_path / name
    d.mkdir()
    for f in sorted(photos.glob("photo_*.png")):
        shutil.copy(f, d / f.name)
    if masks:
        shutil.copytree(photos / "masks", d / "masks")
    return d


def _refused(images, tmp_path, expect, *extra, model=None):
    return _bad(["--images", str(images), "--token", "<ok>", "--class-word", "heart",
                 *(["--model", str(model)] if model else []), *FAST, *extra],
                tmp_path / "out", expect)


def test_some_photos_without_a_caption_file_are_refused(tiny_model, photos, tmp_path,
                                                         no_weights):
    """Only some <photo>.txt: all captions used to be dropped without a word."""
    imgs = _bare_photos(photos, tmp_path)
    (imgs / "photo_000.txt").write_text("on the sand\n")
    err = _refused(imgs, tmp_path, "photo_001.png", model=tiny_model)
    assert "photo_002.png" in err and "caption" in err and "photo_000.png" not in err


@pytest.mark.parametrize("value", [5, None, ["on", "sand"], True, {"a": 1}])
def test_non_string_captions_are_refused(value, tiny_model, photos, tmp_path, no_weights):
    imgs = _bare_photos(photos, tmp_path)
    table = {f.name: "on the sand" for f in sorted(imgs.glob("*.png"))}
    table["photo_001.png"] = value
    (imgs / "captions.json").write_text(json.dumps(table))
    err = _refused(imgs, tmp_path, "photo_001.png", model=tiny_model)
    assert "text" in err


def test_caption_file_with_invalid_utf8_is_refused(tiny_model, photos, tmp_path, no_weights):
    imgs = _bare_photos(photos, tmp_path)
    for f in sorted(imgs.glob("*.png")):
        f.with_suffix(".txt").write_text("on the sand")
    (imgs / "photo_002.txt").write_bytes(b"on the \xff\xfe sand")
    err = _refused(imgs, tmp_path, "photo_002.txt", model=tiny_model)
    assert "UTF-8" in err


def test_caption_bom_is_not_part_of_the_caption(photos, tmp_path):
    from compinv_rt.train.data import list_images, read_captions

    imgs = _bare_photos(photos, tmp_path)
    for f in sorted(imgs.glob("*.png")):
        f.with_suffix(".txt").write_bytes("\ufeffon the sand".encode())
    assert read_captions("auto", list_images(imgs)) == ["on the sand"] * 3


@pytest.mark.parametrize("where", ["caption", "template", "vectors"])
def test_training_prompts_over_77_tokens_are_refused(where, tiny_model, photos, tmp_path,
                                                      no_weights):
    """Training prompts used to be cut at 77 tokens (generate refuses such prompts)."""
    imgs, extra = _bare_photos(photos, tmp_path), []
    if where == "caption":  # within the 200 characters of a caption, over 77 tokens
        for f in sorted(imgs.glob("*.png")):
            f.with_suffix(".txt").write_text("on the sand")
        (imgs / "photo_001.txt").write_text("on the " + " ".join(["x"] * 80))
    elif where == "template":
        tpl = tmp_path / "templates.txt"
        tpl.write_text(f"a photo of a {{}}\na {' '.join(['very'] * 70)} photo of a {{}}\n")
        extra = ["--templates", str(tpl)]
    else:
        tpl = tmp_path / "templates.txt"
        tpl.write_text(f"a {' '.join(['very'] * 20)} photo of a {{}}\n")
        extra = ["--vectors", "60", "--templates", str(tpl)]
    err = _refused(imgs, tmp_path, "tokens", *extra, model=tiny_model)
    assert "77" in err
    assert {"caption": "photo_001.png", "template": "a very very",
            "vectors": "60 vectors"}[where] in err


@pytest.mark.parametrize("context_token", [False, True])
def test_training_prompts_of_77_tokens_are_accepted(context_token, tiny_model, photos, tmp_path):
    """The longest prompt, "a photo of a a far away <ok> <ok>_1 heart x ... [<ok>_ctx]", is
    exactly 77 tokens: accepted, and the tokenizer with the placeholders added keeps it whole."""
    from compinv_rt.models.tokens import placeholder_tokens
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.data import build_prompts
    from compinv_rt.train.loop import prepare

    imgs = _bare_photos(photos, tmp_path)
    # start + "a photo of a" + "a far away" + 2 vectors + heart + end = 12 tokens
    n = 77 - 12 - int(context_token)
    for f in sorted(imgs.glob("*.png")):
        f.with_suffix(".txt").write_text(" ".join(["x"] * n))
    cfg = TrainConfig(token="<ok>", class_word="heart", templates=("a photo of a {}",), vectors=2,
                      context_token=context_token)
    plan = prepare(cfg, imgs, tiny_model)
    tok = plan.tokenizer
    tok.add_tokens(placeholder_tokens("<ok>", 2) + ["<ok>_ctx"])
    table = build_prompts(tok, cfg.templates, "<ok> <ok>_1", "heart", plan.prompt_contexts())
    assert (table.ids[:, -1] == tok.eos_token_id).any()  # one prompt fills all 77, uncut
    from compinv_rt.core.errors import ConfigError

    (imgs / "photo_000.txt").write_text(" ".join(["x"] * (n + 1)))  # one token more: refused
    with pytest.raises(ConfigError, match="78 tokens"):
        prepare(cfg, imgs, tiny_model)


@pytest.mark.parametrize("norm", ["1e-30", "0.0009", "1e9", "vocab:1e-9", "vocab:1e6"])
def test_norm_out_of_bounds_is_refused(norm, tiny_model, photos, tmp_path, no_weights):
    err = _refused(photos, tmp_path, "--norm", "--norm", norm, model=tiny_model)
    assert "0.001" in err and "100" in err


def test_norm_bounds_are_inclusive():
    from compinv_rt.train.regularizers import NORM_MAX, NORM_MIN, parse_norm

    assert parse_norm(str(NORM_MIN)) == ("fixed", NORM_MIN)
    assert parse_norm(f"vocab:{NORM_MAX}") == ("vocab", NORM_MAX)


def test_mask_of_another_shape_is_refused(tiny_model, photos, tmp_path, no_weights):
    """A 7x3 mask for a 64x64 photo used to be stretched over it."""
    from PIL import Image

    imgs = _bare_photos(photos, tmp_path, masks=True)
    Image.new("L", (7, 3), 255).save(imgs / "masks" / "photo_001.png")
    err = _refused(imgs, tmp_path, "7x3", "--masks", str(imgs / "masks"), model=tiny_model)
    assert "photo_001.png" in err and "64x64" in err


def test_mask_of_the_same_aspect_is_resized(photos, tmp_path):
    """A half-size mask (a segmentation tool's output) is the photo's mask, resized."""
    from PIL import Image

    from compinv_rt.train.data import list_images, read_masks

    imgs = _bare_photos(photos, tmp_path, masks=True)
    full = read_masks(str(imgs / "masks"), list_images(imgs))
    with Image.open(imgs / "masks" / "photo_001.png") as m:
        m.convert("L").resize((32, 32), Image.BILINEAR).save(imgs / "masks" / "photo_001.png")
    half = read_masks(str(imgs / "masks"), list_images(imgs))
    assert half[1].shape == full[1].shape == (64, 64)
    assert np.abs(half[1] - full[1]).mean() < 0.05


@pytest.mark.parametrize("token,fmt,clash", [
    ("<embeddings>", "a1111", "embeddings.safetensors"),
    ("<Embeddings>", "both", "embeddings.safetensors"),
    ("<learned_embeds>", "a1111", "learned_embeds.safetensors"),
    ("embeddings", "both", "embeddings.safetensors"),
])
def test_token_whose_portable_file_clashes_with_the_folders_own_is_refused(
        token, fmt, clash, tiny_model, photos, tmp_path, no_weights):
    err = _bad(["--images", str(photos), "--token", token, "--class-word", "heart", "--model",
                str(tiny_model), "--format", fmt, *FAST], tmp_path / "out", clash)
    assert "--token" in err


def test_token_clash_matters_only_for_a1111_copies():
    from compinv_rt.train.portable import check_portable_names

    check_portable_names("<embeddings>", "diffusers")  # no <name>.* copy is written
    check_portable_names("<artifact>", "both")  # artifact.pt/.safetensors: no clash


@pytest.mark.parametrize("args,expect", [
    (["--lr", "1e6"], "--lr"),
    (["--lr", "10.5"], "--lr"),
    (["--token", "<" + "x" * 498 + ">"], "64 characters"),
    (["--token", "<a\x00b>"], "--token"),
    (["--variants", "1000000000"], "--variants"),
    (["--grad-accum", "1000000000"], "--grad-accum"),
])
def test_unbounded_training_options_are_refused_up_front(args, expect, tiny_model, photos,
                                                         tmp_path, no_weights):
    _bad(["--images", str(photos), "--token", "<ok>", "--class-word", "heart", "--model",
          str(tiny_model), *FAST, *args], tmp_path / "out", expect)


@pytest.mark.parametrize("field,value,expect", [
    ("lr", 1e6, "--lr"), ("variants", 10**9, "max_variants"),
    ("grad_accum", 10**9, "max_grad_accum"), ("token", "<" + "x" * 100 + ">", "64 characters"),
])
def test_train_config_bounds(field, value, expect):
    """The library's own check (TrainConfig), whatever the command line checked before it."""
    from compinv_rt.core.errors import ConfigError
    from compinv_rt.train.config import TrainConfig

    with pytest.raises(ConfigError, match=re.escape(expect)):
        TrainConfig(**{"token": "<ok>", "class_word": "heart", field: value})


def test_variant_and_grad_accum_limits_are_configurable(monkeypatch):
    from compinv_rt.core.schemas import _limits_from
    from compinv_rt.train.config import TrainConfig

    monkeypatch.setenv("COMPINV_LIMITS", json.dumps({"max_variants": 1000,
                                                     "max_grad_accum": 5000}))
    _limits_from.cache_clear()
    try:
        TrainConfig(token="<ok>", class_word="heart", variants=1000, grad_accum=5000)
    finally:
        monkeypatch.delenv("COMPINV_LIMITS")
        _limits_from.cache_clear()
