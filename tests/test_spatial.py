"""Spatial inversion: layouts, token lookup, bias maps, guidance, heatmaps, the layout model, CLI."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.core.errors import ArtifactError, ConfigError
from compinv_rt.sampling.denoise import AttentionBias, Step
from compinv_rt.spatial.bias_maps import bias_batch, bias_map, region_mask
from compinv_rt.spatial.heatmaps import box_from_map
from compinv_rt.spatial.layouts import (
    REFERENCE_BOXES,
    LayoutSource,
    concept_phrases,
    concept_tokens,
    parse_layout,
    resolve_layout,
    token_positions,
)
from compinv_rt.spatial.plan import MAX_STRENGTH, resolve_steps

runner = CliRunner()
PROMPT = "a red star and a blue circle on grass"
LAYOUT = "red star=0.1,0.2,0.5,0.8;blue circle=0.6,0.2,0.95,0.8"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from compinv_rt.models.loading import load_model

    return load_model(str(tiny_model), device="cpu")


# --- layouts and tokens --------------------------------------------------------------------


def test_parse_layout_forms():
    assert parse_layout(None).kind == "none" and parse_layout("none").kind == "none"
    assert parse_layout("auto").kind == "auto" and parse_layout("auto").needs_boxes
    spec = parse_layout("red star = 0.1,0.2,0.5,0.8; blue  circle=0.6,0.2,0.95,0.8;red star=0,0,0.1,0.1")
    assert [r.phrase for r in spec.regions] == ["red star", "blue circle"]
    assert spec.regions[0].boxes == ((0.1, 0.2, 0.5, 0.8), (0.0, 0.0, 0.1, 0.1))  # two boxes
    assert not spec.needs_boxes
    assert parse_layout("red star;blue circle").needs_boxes  # phrases only: boxes from the model


@pytest.mark.parametrize("text, message", [
    ("star=0.1,0.2,0.5", "4 numbers"),
    ("star=a,b,c,d", "4 comma-separated numbers"),
    ("=0,0,1,1", "no phrase"),
    ("star=0,0,1,1;;circle=0,0,1,1", "empty entry"),
    ("star=0,0,1,1=2", "more than one"),
    ("star=0,0,1.5,1", "outside [0, 1]"),
    ("star=-0.1,0,1,1", "outside [0, 1]"),
    ("star=0.5,0,0.2,1", "inverted"),
    ("star=0.2,0.3,0.4,0.3", "inverted"),
    ("a;b;c;d;e", "at most 4"),
    ("star 0.1,0.2,0.5,0.8", "malformed"),
    ("star=0,0,1,1;circle", "for some phrases but not"),
])
def test_parse_layout_rejects(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_layout(text)


def test_token_positions_multi_token_and_repeats(tokenizer):
    assert token_positions(tokenizer, PROMPT, "red star") == [2, 3]
    assert token_positions(tokenizer, PROMPT, "Blue Circle") == [6, 7]  # tokenizer lower-cases
    assert token_positions(tokenizer, PROMPT, "grass") == [9]
    # a phrase named twice finds its next occurrence; words inside other words do not match
    assert concept_tokens(tokenizer, "a star and a star", ["star", "star"]) == [[2], [5]]
    with pytest.raises(ConfigError, match="not in the prompt"):
        token_positions(tokenizer, "a red stars on grass", "red star")
    with pytest.raises(ConfigError, match="not in the prompt"):
        token_positions(tokenizer, PROMPT, "green square")
    long = " ".join(["word"] * 80) + " cat"
    with pytest.raises(ConfigError, match="token limit"):
        token_positions(tokenizer, long, "cat")


def test_token_positions_follow_added_multi_vector_tokens(tiny_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    tok.add_tokens(["<c>", "<c>_1", "<c>_2"])
    prompt = "a photo of <c> <c>_1 <c>_2 cat and a dog"
    pos = token_positions(tok, prompt, "<c> <c>_1 <c>_2 cat")
    assert len(pos) == 4 and pos == list(range(pos[0], pos[0] + 4))
    assert tok.convert_ids_to_tokens(tok(prompt).input_ids[pos[0]:pos[0] + 3]) == ["<c>", "<c>_1", "<c>_2"]
    # a user phrase naming the placeholder covers all its vectors once expanded like the prompt
    layout = resolve_layout(parse_layout("<c> cat=0,0,0.5,1;dog=0.5,0,1,1"), tok, prompt,
                            expand=lambda s: s.replace("<c>", "<c> <c>_1 <c>_2"))
    assert layout.concepts[0].phrase == "<c> cat" and list(layout.concepts[0].tokens) == pos


def test_concept_phrases_and_fixed_boxes(tokenizer):
    assert concept_phrases("a photo of a cat and a dog on grass") == ["cat", "dog"]
    assert concept_phrases("A red star, a blue circle and a green heart in the sky") == [
        "red star", "blue circle", "green heart"]
    layout = resolve_layout(parse_layout("auto"), tokenizer, PROMPT)
    assert layout.source is LayoutSource.fixed
    assert [c.boxes[0] for c in layout.concepts] == list(REFERENCE_BOXES)
    assert [c.tokens for c in layout.concepts] == [(2, 3), (6, 7)]
    with pytest.raises(ConfigError, match="at most 4"):
        resolve_layout(parse_layout("auto"), tokenizer, "a cat, a dog, a cow, a pig and a hen")


# --- bias maps -----------------------------------------------------------------------------


def test_bias_map_values(tokenizer):
    layout = resolve_layout(parse_layout("red star=0,0,0.5,1;blue circle=0.5,0,1,0.5"), tokenizer, PROMPT)
    bias = bias_map(layout, 3.0, 16, 16)
    assert bias.shape == (77, 16, 16)
    for p in (2, 3):
        assert (bias[p, :, :8] == 3.0).all() and (bias[p, :, 8:] == -3.0).all()
    for p in (6, 7):
        assert (bias[p, :8, 8:] == 3.0).all() and (bias[p, 8:, :] == -3.0).all()
        assert (bias[p, :, :8] == -3.0).all()
    others = [p for p in range(77) if p not in (2, 3, 6, 7)]
    assert (bias[others] == 0).all()
    # partial cells get the covered fraction: half a cell in -> 0
    assert region_mask([(0, 0, 0.5 / 16, 1)], 16, 16)[0, 0].item() == pytest.approx(0.5)
    batch = bias_batch([layout, None], 3.0, 16, 16)
    assert batch.shape == (2, 77, 16, 16) and (batch[1] == 0).all()
    assert bias_batch([None, None], 3.0, 16, 16) is None


def test_bias_is_finite_in_fp16_at_max_strength(tokenizer, loaded):
    from compinv_rt.unet.attention import bias_for_layer

    layout = resolve_layout(parse_layout(LAYOUT), tokenizer, PROMPT)
    bias = bias_map(layout, MAX_STRENGTH, 16, 16, dtype=torch.float16)
    assert bias.dtype == torch.float16 and torch.isfinite(bias).all()
    assert torch.isfinite(bias_for_layer(bias[None], 16)).all()  # pooled to 4x4
    with pytest.raises(ConfigError, match="bias-strength"):
        bias_map(layout, MAX_STRENGTH * 2, 16, 16)
    with pytest.raises(ConfigError, match="bias-strength"):
        bias_map(layout, float("nan"), 16, 16)
    # a half-precision UNet step with the strongest bias stays finite
    import copy

    from compinv_rt.unet.attention import BiasedUNet

    unet = BiasedUNet(copy.deepcopy(loaded.unet).to(torch.float16))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16, dtype=torch.float16), torch.tensor([500]),
                   torch.randn(1, 77, 64, dtype=torch.float16), bias[None])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("value, total, expected", [
    ("0.2", 50, 10), ("0.25", 10, 2), ("1.0", 25, 25), ("0", 25, 0), ("10", 50, 10), ("80", 50, 50),
    ("0.5", 7, 4),
])
def test_bias_steps_fraction_or_count(value, total, expected):
    assert resolve_steps(value, total) == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "ten", "nan"])
def test_bias_steps_rejects(value):
    with pytest.raises(ConfigError, match="bias-steps"):
        resolve_steps(value, 50)


def test_denoise_biases_only_the_conditional_half_and_first_steps():
    from diffusers import DDIMScheduler

    from compinv_rt.sampling.denoise import AttentionBias, BiasedModel, GuidedDenoiser, denoise

    seen = []

    def fake_unet(sample, t, context, bias):
        seen.append(None if bias is None else bias.clone())
        return torch.zeros_like(sample)

    sched = DDIMScheduler()
    sched.set_timesteps(6)
    bias = torch.full((2, 77, 4, 4), 2.0)
    hooked = []
    model = BiasedModel(fake_unet, AttentionBias(bias, 2), sched.timesteps[0])
    denoiser = GuidedDenoiser(model, torch.randn(2, 77, 8), torch.randn(2, 77, 8), 7.5)
    denoise(denoiser, sched, torch.randn(2, 4, 4, 4), hook=lambda step: hooked.append(step.done))
    assert [b is not None for b in seen] == [True, True, False, False, False, False]
    assert (seen[0][:2] == 0).all() and (seen[0][2:] == 2.0).all()  # [uncond; cond]
    assert hooked == list(range(7))  # every boundary: before each step and after the last


# --- attention capture, bias effect, guidance ----------------------------------------------


def _cross_layer(unet):
    from compinv_rt.unet.capture import cross_attention_layers

    name, attn = next(iter(cross_attention_layers(unet).items()))
    return name, attn


def test_capture_processor_matches_bias_processor(loaded):
    from compinv_rt.unet.attention import BiasAttnProcessor
    from compinv_rt.unet.capture import CaptureAttnProcessor

    _, attn = _cross_layer(loaded.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    bias = torch.randn(2, 77, 16, 16, generator=g) * 3
    probs = []
    cap = CaptureAttnProcessor("layer", lambda name, p: probs.append(p))
    with torch.no_grad():
        for b in (bias, None):
            ref = BiasAttnProcessor()(attn, x, ctx, attention_bias=b)
            got = cap(attn, x, ctx, attention_bias=b)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert probs[0].shape == (2, attn.heads, 256, 77)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, attn.heads, 256))
    assert not torch.allclose(probs[0], probs[1])  # the bias really changed the attention


def _in_region_share(loaded, backend_bias, tokenizer, steps=4):
    """Mean attention of the concept tokens inside their boxes / everywhere, with a recorder."""
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig
    from compinv_rt.spatial.bias_maps import concept_masks
    from compinv_rt.spatial.heatmaps import AttentionRecorder, box_from_map
    from compinv_rt.spatial.layout_model import box_iou

    layout = resolve_layout(parse_layout(LAYOUT), tokenizer, PROMPT)
    rec = AttentionRecorder(1, 16, 16)
    bias = AttentionBias(bias_batch([layout], 3.0, 16, 16), steps) if backend_bias else None
    Pipeline(loaded).generate([PROMPT], [1], SamplingConfig(steps=steps), bias=bias, attention_recorder=rec)
    maps = rec.maps()[0]
    masks = concept_masks(layout, 16, 16)
    share = [(maps[list(c.tokens)] * m).sum() / maps[list(c.tokens)].sum()
             for c, m in zip(layout.concepts, masks)]
    recovered = [box_from_map(maps[list(c.tokens)].mean(0)) for c in layout.concepts]
    iou = box_iou(torch.tensor(recovered), torch.tensor([c.boxes[0] for c in layout.concepts]))
    return torch.stack(share), iou


def test_bias_moves_concept_attention_into_its_region(loaded, tokenizer):
    """...and the attention-recovery box reader finds the region again from the maps."""
    plain, plain_iou = _in_region_share(loaded, False, tokenizer)
    biased, biased_iou = _in_region_share(loaded, True, tokenizer)
    assert (biased > plain + 0.2).all(), (plain, biased)
    assert (biased_iou > 0.6).all() and (plain_iou < 0.5).all(), (plain_iou, biased_iou)


def test_box_from_map_keeps_the_peak_component():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((xx - 4) ** 2 + (yy - 9) ** 2) / 4)  # peak at cell x 4, y 9: 3x3 above 0.5
    blob[0, 15] = 0.9  # a stray hot cell far away
    x0, y0, x1, y1 = box_from_map(blob)
    assert (x0 * 16, y0 * 16, x1 * 16, y1 * 16) == (3, 8, 6, 11)


@pytest.mark.parametrize("up_types,expected_up", [
    # SD 1.x/2.x structure: up block 0 has no attention -> up_blocks.1 (16x16 at 512 px)
    (("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "up_blocks.1.attentions.0."),
    # the embedded model's structure: attention already in up block 0 (4x4) -> still up_blocks.1
    (("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "up_blocks.1.attentions.0."),
    # only up block 0 attends: fall back to it
    (("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "up_blocks.0.attentions.0."),
])
def test_guidance_layers_follow_the_reference_structure(up_types, expected_up):
    from diffusers import UNet2DConditionModel

    from compinv_rt.unet.capture import guidance_layers

    down = tuple("CrossAttnDownBlock2D" if t == "CrossAttnUpBlock2D" else "DownBlock2D"
                 for t in reversed(up_types))
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(8, 8, 8), layers_per_block=1,
                                down_block_types=down, up_block_types=up_types,
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    layers = guidance_layers(unet)
    assert layers[0].startswith("mid_block.") and len(layers) == 2
    assert layers[1].startswith(expected_up), layers


def test_guidance_lowers_the_layout_loss_and_only_early(loaded, tokenizer):
    from diffusers import DDIMScheduler

    from compinv_rt.sampling.pipeline import Pipeline
    from compinv_rt.spatial.guidance import GuidanceConfig, LayoutGuidance, step_size
    from compinv_rt.unet.backends import TorchBackend

    layout = resolve_layout(parse_layout(LAYOUT), tokenizer, PROMPT)
    backend = TorchBackend(loaded.unet)
    guide = LayoutGuidance(backend.module, [layout, None], (16, 16),
                           GuidanceConfig(steps=1, iterations=3, threshold=0.0, scale=3000.0))
    assert guide.layers == ["mid_block.attentions.0.transformer_blocks.0.attn2",
                            "up_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    sched = DDIMScheduler.from_config(loaded.files.scheduler_config)
    sched.set_timesteps(10)
    cond = Pipeline(loaded, backend).encode_prompts([PROMPT] * 2)
    x = torch.randn(2, 4, 16, 16)
    with torch.inference_mode():  # as inside the pipeline
        out = guide(Step(0, 10, sched.timesteps[0], x, cond, sched))
        assert guide(Step(1, 10, sched.timesteps[1], x, cond, sched)) is None  # past its steps: unchanged
    losses = [h["loss"][0] for h in guide.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert all(h["loss"][1] == 0 for h in guide.history)  # no layout, no loss
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
    assert 0 < step_size(sched, sched.timesteps[0], x) < 1  # VP latents: 1 - alpha_bar


# --- the layout model ----------------------------------------------------------------------


def _synthetic(words, boxes):
    from compinv_rt.spatial.layout_model import LayoutExample

    return [LayoutExample(f"a {a} and a {b}", (a, b), (boxes[a], boxes[b]))
            for a in words for b in words if a != b]


@pytest.mark.slow
def test_layout_model_learns_boxes_from_concept_tokens_and_round_trips(loaded, tmp_path):
    from compinv_rt.spatial import layout_model as lm

    words = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee"]
    g = torch.Generator().manual_seed(0)
    boxes = {}
    for w in words:  # each word has its own box
        x0, y0 = (torch.rand(2, generator=g) * 0.5).tolist()
        boxes[w] = (x0, y0, x0 + 0.45, y0 + 0.45)
    data = _synthetic(words, boxes)
    held = {("cat", "dog"), ("pig", "owl"), ("bee", "fox"), ("hen", "cow"), ("dog", "bee")}
    train = [e for e in data if e.phrases not in held]
    test = [e for e in data if e.phrases in held]
    net = lm.fit(train, loaded.tokenizer, loaded.text_encoder, lm.FitConfig(epochs=150, batch=16))
    res = lm.evaluate(net, test, loaded.tokenizer, loaded.text_encoder)
    assert res["mean_iou"] > 0.6 and res["mean_iou"] > res["fixed_boxes_iou"] + 0.2, res

    lm.save(net, tmp_path / "lm", {"source": "test"})
    assert json.loads((tmp_path / "lm" / lm.CONFIG).read_text())["config"]["hidden"] == 64
    again, meta = lm.load(tmp_path / "lm")
    pred = lm.LayoutPredictor(again, loaded.tokenizer, loaded.text_encoder)
    toks = concept_tokens(loaded.tokenizer, "a cat and a dog", ["cat", "dog"])
    assert pred("a cat and a dog", toks) == lm.LayoutPredictor(net, loaded.tokenizer,
                                                              loaded.text_encoder)("a cat and a dog", toks)
    assert meta["source"] == "test" and not list((tmp_path / "lm").glob(".*tmp"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / lm.WEIGHTS).write_bytes((tmp_path / "lm" / lm.WEIGHTS).read_bytes()[:300])
    with pytest.raises(ArtifactError, match="corrupt layout model"):
        lm.load(tmp_path / "bad")
    with pytest.raises(ArtifactError, match="no layout model"):
        lm.load(tmp_path / "missing")


PLACE_BOXES = {"top left": (0.05, 0.05, 0.45, 0.45), "top right": (0.55, 0.05, 0.95, 0.45),
               "bottom left": (0.05, 0.55, 0.45, 0.95), "bottom right": (0.55, 0.55, 0.95, 0.95)}


@pytest.mark.slow
def test_layout_model_learns_boxes_from_position_words(loaded):
    """The place words said after a concept decide its box; the concept's own words do not. Held
    out: word-place combinations never seen in training. (Without the pooled following words the
    model reads place words only from the flattened prompt: 0.49 here, 0.65 with them.)"""
    from compinv_rt.spatial import layout_model as lm

    words = ["cat", "dog", "cow", "pig", "hen", "fox"]
    places = list(PLACE_BOXES)
    scenes = [((w, p),) for w in words for p in places]
    scenes += [((a, p), (b, q)) for a in words for b in words if a != b
               for p in places for q in places if p != q]
    unseen = {(w, p) for i, w in enumerate(words) for j, p in enumerate(places) if (i + j) % 4 == 0}
    train, test = [], []
    for objs in scenes:
        e = lm.LayoutExample(" and ".join(f"a {w} at the {p}" for w, p in objs),
                             tuple(w for w, _ in objs), tuple(PLACE_BOXES[p] for _, p in objs))
        (test if unseen.intersection(objs) else train).append(e)
    assert len(test) > 20
    net = lm.fit(train, loaded.tokenizer, loaded.text_encoder, lm.FitConfig(epochs=150, batch=32))
    res = lm.evaluate(net, test, loaded.tokenizer, loaded.text_encoder)
    assert res["mean_iou"] > 0.6 and res["mean_iou"] > res["fixed_boxes_iou"] + 0.2, res


def test_layout_model_format_1_still_loads_and_predicts(loaded, tmp_path):
    """Format 1 (no following-words feature) is read as before; an unknown format is refused."""
    from safetensors.torch import save_file

    from compinv_rt.spatial import layout_model as lm

    torch.manual_seed(0)
    old = lm.LayoutMLP(lm.LayoutModelConfig(hidden=64))
    cfg = {k: v for k, v in dataclasses.asdict(old.cfg).items() if k != "context"}
    for version, name in ((1, "v1"), (99, "v99")):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in old.state_dict().items()}, tmp_path / name / lm.WEIGHTS,
                  metadata={"compinv_rt": json.dumps({"format_version": version, "config": cfg})})
    net, meta = lm.load(tmp_path / "v1")
    assert not net.cfg.context and meta["format_version"] == 1
    prompt = "a red star at the top left and a blue circle on grass"
    toks = concept_tokens(loaded.tokenizer, prompt, ["red star", "blue circle"])
    expected = old.eval()(lm.encode(loaded.tokenizer, loaded.text_encoder, [prompt]),
                          lm.token_weights(toks)[None])[0]
    got = lm.LayoutPredictor(net, loaded.tokenizer, loaded.text_encoder)(prompt, toks)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-4)
    with pytest.raises(ArtifactError, match="has format 99"):
        lm.load(tmp_path / "v99")


def test_context_weights_cover_the_words_up_to_the_next_concept():
    from compinv_rt.spatial.layout_model import context_weights

    # BOS a red star at the top left and a blue circle on grass EOS: 14 tokens
    w = context_weights([[2, 3], [10, 11]], n_tokens=15)
    assert w[0].nonzero().flatten().tolist() == [4, 5, 6, 7, 8, 9]  # "at the top left and a"
    assert w[1].nonzero().flatten().tolist() == [12, 13]  # "on grass", EOS excluded
    assert context_weights([[1]], n_tokens=3).sum() == 0  # nothing after the concept


def test_layout_auto_on_the_embedded_model_places_boxes_from_place_words(tmp_path):
    """The embedded model ships a layout model (`<model>/layout/`): `--layout auto` takes its
    boxes, and a stated place moves the box there."""
    from compinv_rt.models.embedded import default_model_dir
    from compinv_rt.spatial.plan import LAYOUT_MODEL_SUBDIR

    assert (default_model_dir() / LAYOUT_MODEL_SUBDIR / "layout_model.safetensors").is_file()
    centres = {}
    for where in ("top left", "bottom right"):
        out = tmp_path / where.replace(" ", "_")
        res = runner.invoke(app, ["generate", f"a small red star at the {where} on grass", "--out",
                                  str(out), "-n", "1", "--steps", "2", "--layout", "auto"])
        assert res.exit_code == 0, res.output
        layout = json.loads(next(out.glob("*.json")).read_text())["spatial"]["layout"]
        assert layout["source"] == "model" and [c["phrase"] for c in layout["concepts"]] == ["small red star"]
        x0, y0, x1, y1 = layout["concepts"][0]["boxes"][0]
        centres[where] = ((x0 + x1) / 2, (y0 + y1) / 2)
    assert max(centres["top left"]) < 0.45 and min(centres["bottom right"]) > 0.55, centres


def test_fixed_layout_gives_the_reference_boxes_explicitly(tokenizer):
    from compinv_rt.spatial.layouts import fixed_layout

    layout = resolve_layout(fixed_layout(PROMPT), tokenizer, PROMPT, predictor=lambda *a: 1 / 0)
    assert layout.source is LayoutSource.explicit
    assert [c.phrase for c in layout.concepts] == ["red star", "blue circle"]
    assert [c.boxes[0] for c in layout.concepts] == list(REFERENCE_BOXES)


def test_pair_prompts_take_one_or_two_concept_templates():
    from compinv_rt.spatial.layout_data import pair_prompts

    got = pair_prompts(["red star", "blue circle"], ["a {a} at the top left", "a {a} and a {b}"])
    assert got == [("a red star at the top left", ("red star",)),
                   ("a blue circle at the top left", ("blue circle",)),
                   ("a red star and a blue circle", ("red star", "blue circle")),
                   ("a blue circle and a red star", ("blue circle", "red star"))]
    for bad in ("a {b} alone", "a {a} and a {a}"):
        with pytest.raises(ConfigError, match="--template"):
            pair_prompts(["a", "b"], [bad])


def test_world_data_captions_state_places_as_the_world_makes_them(tmp_path):
    """`layout world-data` writes the world's own captions: with --places stated every object's
    place and size is in the caption and its ground-truth box lies in that place."""
    from compinv_rt.apps.world.scenes import in_place, parse_prompt
    from compinv_rt.spatial.layout_model import read_jsonl

    def rows(*args):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        res = runner.invoke(app, ["layout", "world-data", "--out", str(out), *args])
        assert res.exit_code == 0, res.output
        return read_jsonl(out)

    placed = rows("-n", "40", "--split", "heldout", "--places", "stated")
    assert len(placed) == 40
    for e in placed:
        spec = parse_prompt(e.prompt)
        assert len(spec.places) == len(e.phrases) and all(spec.places)
        for phrase, box, place in zip(e.phrases, e.boxes, spec.places):
            assert phrase.split()[0] in ("small", "large") and phrase in e.prompt
            assert in_place(64 * (box[0] + box[2]) / 2, 64 * (box[1] + box[3]) / 2, 64, place, margin=0)
    assert not any(parse_prompt(e.prompt).places for e in rows("-n", "40", "--places", "unstated"))
    mixed = rows("-n", "300")
    assert 0.3 < sum(bool(parse_prompt(e.prompt).places) for e in mixed) / 300 < 0.5
    assert all(p in e.prompt for e in mixed for p in e.phrases)
    bad = runner.invoke(app, ["layout", "world-data", "--out", str(tmp_path / "x.jsonl"), "-n", "2",
                              "--places", "sometimes"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "--places" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


# --- the CLI -------------------------------------------------------------------------------


def _gen(model, out, *extra, prompt=PROMPT):
    return runner.invoke(app, ["generate", prompt, "--model", str(model), "--out", str(out),
                               "-n", "2", "--steps", "4", "--seed", "3", *extra])


def test_generate_with_bias_layout_and_heatmaps(tiny_model, tmp_path):
    import numpy as np
    from PIL import Image

    plain = _gen(tiny_model, tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    res = _gen(tiny_model, tmp_path / "bias", "--layout", LAYOUT, "--bias-strength", "4",
               "--bias-steps", "1.0", "--save-attention")
    assert res.exit_code == 0, res.output
    meta = json.loads(next((tmp_path / "bias").glob("*_3.json")).read_text())
    sp = meta["spatial"]
    assert sp["mode"] == "bias" and sp["regularized_steps"] == 4 and sp["layout"]["source"] == "explicit"
    assert [c["tokens"] for c in sp["layout"]["concepts"]] == [[2, 3], [6, 7]]
    assert [s["token"] for s in meta["attention"]["share"]] == PROMPT.split()
    assert sum(s["share"] for s in meta["attention"]["share"]) == pytest.approx(1, abs=1e-3)
    heat = tmp_path / "bias" / meta["attention"]["heatmaps"]
    assert Image.open(heat).size[0] > 128
    a = np.asarray(Image.open(next((tmp_path / "plain").glob("*_3.png"))), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "bias" / meta["image"]), dtype=np.int16)
    assert np.abs(a - b).max() > 10  # the bias changed the image
    assert json.loads(next((tmp_path / "plain").glob("*_3.json")).read_text())["spatial"]["mode"] == "none"


def test_generate_guidance_and_layout_model(tiny_model, tmp_path):
    from compinv_rt.spatial import layout_model as lm

    data = tmp_path / "layouts.jsonl"
    lm.write_jsonl(data, _synthetic(["star", "circle", "heart"],
                                    {"star": (0.0, 0.0, 0.5, 0.5), "circle": (0.5, 0.5, 1.0, 1.0),
                                     "heart": (0.2, 0.2, 0.7, 0.7)}))
    fit = runner.invoke(app, ["layout", "fit", "--data", str(data), "--model", str(tiny_model),
                              "--out", str(tmp_path / "lm"), "--epochs", "3"])
    assert fit.exit_code == 0, fit.output
    res = _gen(tiny_model, tmp_path / "g", "--spatial", "guidance", "--layout-model", str(tmp_path / "lm"),
               "--bias-steps", "1", prompt="a star and a circle on grass")
    assert res.exit_code == 0, res.output
    sp = json.loads(next((tmp_path / "g").glob("*_3.json")).read_text())["spatial"]
    assert sp["mode"] == "guidance" and sp["layout"]["source"] == "model"
    assert sp["regularized_steps"] == 1 and sp["guidance_iterations"] >= 1
    assert [c["phrase"] for c in sp["layout"]["concepts"]] == ["star", "circle"]


@pytest.mark.slow
def test_layout_fit_from_attention(tiny_model, tmp_path):
    res = runner.invoke(app, ["layout", "fit", "--from-attention", "--words", "cat,dog",
                              "--images-per-prompt", "1", "--steps", "2", "--epochs", "2",
                              "--model", str(tiny_model), "--out", str(tmp_path / "lm")])
    assert res.exit_code == 0, res.output
    recovered = (tmp_path / "lm" / "recovered_layouts.jsonl").read_text().splitlines()
    assert len(recovered) == 2 and json.loads(recovered[0])["phrases"] == ["cat", "dog"]
    meta = json.loads((tmp_path / "lm" / "layout_model.json").read_text())
    assert meta["source"] == "attention" and meta["examples"] == 2


def test_spatial_options_are_refused_with_jobs(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a red star"}\n')
    res = runner.invoke(app, ["generate", "--jobs", str(jobs), "--out", str(tmp_path / "o"),
                              "--spatial", "bias"])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "--jobs" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--layout", "red star=0.1,0.2,1.5,0.8"], "outside [0, 1]"),
    (["--layout", "red star=0.5,0.2,0.1,0.8"], "inverted"),
    (["--layout", "green square=0.1,0.2,0.5,0.8"], "not in the prompt"),
    (["--layout", "a;b;c;d;e"], "at most 4"),
    (["--layout", "red star=0.1,0.2"], "4 numbers"),
    (["--layout", "red star:0.1,0.2,0.5,0.8"], "malformed"),
    (["--spatial", "guidance", "--backend", "onnxruntime"], "--backend torch"),
    (["--save-attention", "--backend", "onnxruntime"], "--backend torch"),
    (["--spatial", "none", "--layout", LAYOUT], "no effect"),
    (["--bias-steps", "1.5", "--spatial", "bias"], "fraction"),
    (["--layout-model", "/nonexistent/lm", "--spatial", "bias"], "does not exist"),
    (["--spatial", "bias", "--bias-decay", "1"], "adaptive only"),
    (["--spatial", "adaptive", "--bias-decay", "-1"], "--bias-decay"),
    (["--spatial", "adaptive", "--bias-strength", "nan"], "--bias-strength"),
])
def test_bad_spatial_input_is_one_clear_line(tiny_model, tmp_path, extra, message):
    out = tmp_path / "out"
    res = _gen(tiny_model, out, *extra)
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_layout_phrase_with_a_multi_vector_concept_biases_every_vector(tiny_model, tmp_path):
    """`--concept` expands a placeholder into all its vectors; a layout phrase naming the
    placeholder covers every vector (and --layout auto finds them in the expanded prompt)."""
    from compinv_rt.apps.world.photos import make_photos
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    make_photos(tmp_path / "photos", count=2, size=64)
    cfg = TrainConfig(token="<my-heart>", class_word="heart", vectors=2, steps=1, batch=1,
                      resolution=64, variants=1, checkpoint_every=1)
    concept = tmp_path / "concept"
    train_concept(prepare(cfg, tmp_path / "photos", tiny_model), concept, device="cpu")
    prompt = "a <my-heart> heart and a blue circle on grass"
    for layout, out in ((["--layout", "<my-heart> heart=0.1,0.2,0.5,0.8;blue circle=0.6,0.2,0.95,0.8"], "a"),
                        (["--spatial", "bias"], "b")):
        res = _gen(tiny_model, tmp_path / out, "--concept", str(concept), *layout, prompt=prompt)
        assert res.exit_code == 0, res.output
        sp = json.loads(next((tmp_path / out).glob("*_3.json")).read_text())["spatial"]
        assert [c["tokens"] for c in sp["layout"]["concepts"]] == [[2, 3, 4], [7, 8]]


# --- adaptive bias: the map in units of each layer's logit spread, scheduled over the noise ----


def test_logit_spread_is_the_std_of_the_logits_over_keys():
    from compinv_rt.unet.attention import logit_spread

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 77, 16, generator=g) * 3
    ref = (q @ k.transpose(-1, -2) / 4).std(-1, unbiased=False, keepdim=True)  # d = 16
    torch.testing.assert_close(logit_spread(q, k), ref, rtol=1e-4, atol=1e-5)


def test_adaptive_processor_adds_the_bias_times_the_layers_spread(loaded):
    """gain [0, g]: softmax(QK^T/sqrt(d) + g * std_keys(QK^T/sqrt(d)) * bias) V, per head and
    query; [1, 0] is the fixed bias; [a, b] is their sum."""
    from compinv_rt.unet.attention import BiasAttnProcessor

    _, attn = _cross_layer(loaded.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    bias = torch.randn(2, 77, 16, 16, generator=g)
    n, d = attn.heads, attn.to_q.out_features // attn.heads

    def explicit(fixed, adaptive):
        q = attn.to_q(x).view(2, -1, n, d).transpose(1, 2)
        k = attn.to_k(ctx).view(2, -1, n, d).transpose(1, 2)
        v = attn.to_v(ctx).view(2, -1, n, d).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / d ** 0.5
        b = bias.flatten(2).transpose(1, 2)[:, None]  # (2, 1, 256, 77): this layer is 16x16
        logits = logits + b * (fixed + adaptive * logits.std(-1, unbiased=False, keepdim=True))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, n * d)
        return attn.to_out[0](out)

    with torch.no_grad():
        for fixed, adaptive in ((0.0, 1.5), (1.0, 0.0), (0.5, 2.0)):
            gain = torch.tensor([[fixed, adaptive]] * 2)
            got = BiasAttnProcessor()(attn, x, ctx, attention_bias=bias, bias_gain=gain)
            torch.testing.assert_close(got, explicit(fixed, adaptive), rtol=1e-4, atol=1e-5)
        fixed_only = BiasAttnProcessor()(attn, x, ctx, attention_bias=bias)
        assert torch.equal(fixed_only, BiasAttnProcessor()(
            attn, x, ctx, attention_bias=bias, bias_gain=torch.tensor([[1.0, 0.0]] * 2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaptive_bias_is_finite_in_half_precision(tokenizer, loaded, dtype):
    """The strongest map times a huge gain saturates at the finite floor, never -inf or NaN."""
    import copy

    from compinv_rt.unet.attention import BIAS_LIMIT, BiasedUNet, adaptive_bias, bias_for_layer

    layout = resolve_layout(parse_layout(LAYOUT), tokenizer, PROMPT)
    bias = bias_map(layout, MAX_STRENGTH, 16, 16, dtype=dtype)[None]
    gain = torch.tensor([[1.0, 1000.0]], dtype=dtype)
    q, k = torch.randn(1, 2, 16, 8, dtype=dtype) * 50, torch.randn(1, 2, 77, 8, dtype=dtype) * 50
    eff = adaptive_bias(bias_for_layer(bias, 16), gain, q, k)
    assert eff.dtype == dtype and torch.isfinite(eff).all()
    assert eff.min().item() == -BIAS_LIMIT and eff.max().item() == BIAS_LIMIT
    others = [p for p in range(77) if p not in (2, 3, 6, 7)]  # tokens without a region stay 0
    assert (eff[..., others] == 0).all()
    unet = BiasedUNet(copy.deepcopy(loaded.unet).to(dtype))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16, dtype=dtype), torch.tensor([500]),
                   torch.randn(1, 77, 64, dtype=dtype), bias, gain)
    assert torch.isfinite(out).all()


def test_bias_schedule_over_the_noise_level():
    from compinv_rt.spatial.bias_maps import BiasSchedule

    assert BiasSchedule()(0.3).tolist() == [0.0, 1.0]
    torch.testing.assert_close(BiasSchedule(2.0)(0.5), torch.tensor([0.0, 0.25]))
    assert BiasSchedule(2.0)(1.0).tolist() == [0.0, 1.0]


def test_denoise_feeds_one_gain_per_biased_step():
    from diffusers import DDIMScheduler

    from compinv_rt.sampling.denoise import AttentionBias, BiasedModel, GuidedDenoiser, denoise
    from compinv_rt.spatial.bias_maps import BiasSchedule

    seen = []

    def fake_unet(sample, t, context, bias=None, gain=None):
        seen.append((float(t[0]), bias is not None, None if gain is None else gain.clone()))
        return torch.zeros_like(sample)

    sched = DDIMScheduler()
    sched.set_timesteps(6)
    model = BiasedModel(fake_unet, AttentionBias(torch.ones(2, 77, 4, 4), 3, BiasSchedule(2.0)), sched.timesteps[0])
    denoise(GuidedDenoiser(model, torch.randn(2, 77, 8), torch.randn(2, 77, 8), 7.5), sched, torch.randn(2, 4, 4, 4))
    t0 = seen[0][0]
    assert [b for _, b, _ in seen] == [True] * 3 + [False] * 3
    for t, biased, gain in seen:
        if biased:  # one row per UNet sample ([uncond; cond]), the weight falls with the noise
            assert gain.shape == (4, 2)
            torch.testing.assert_close(gain, torch.tensor([[0.0, (t / t0) ** 2]] * 4))
        else:
            assert gain is None


def test_adaptive_bias_moves_concept_attention_into_its_region(loaded, tokenizer):
    from compinv_rt.sampling.pipeline import Pipeline, SamplingConfig
    from compinv_rt.spatial.bias_maps import BiasSchedule, concept_masks
    from compinv_rt.spatial.heatmaps import AttentionRecorder

    layout = resolve_layout(parse_layout(LAYOUT), tokenizer, PROMPT)
    shares = []
    for gain in (None, BiasSchedule()):
        rec = AttentionRecorder(1, 16, 16)
        bias = AttentionBias(bias_batch([layout], 4.0, 16, 16), 4, gain) if gain is not None else None
        Pipeline(loaded).generate([PROMPT], [1], SamplingConfig(steps=4), bias=bias, attention_recorder=rec)
        maps = rec.maps()[0]
        shares.append(torch.stack([(maps[list(c.tokens)] * m).sum() / maps[list(c.tokens)].sum()
                                   for c, m in zip(layout.concepts, concept_masks(layout, 16, 16))]))
    assert (shares[1] > shares[0] + 0.2).all(), shares


def test_generate_with_adaptive_bias(tiny_model, tmp_path):
    import numpy as np
    from PIL import Image

    runs = {}
    for name, extra in (("bias", ["--spatial", "bias"]),
                        ("adaptive", ["--spatial", "adaptive", "--bias-decay", "2"])):
        res = _gen(tiny_model, tmp_path / name, "--layout", LAYOUT, "--bias-steps", "1.0", *extra)
        assert res.exit_code == 0, res.output
        meta = json.loads(next((tmp_path / name).glob("*_3.json")).read_text())
        runs[name] = (meta["spatial"], np.asarray(Image.open(tmp_path / name / meta["image"]), dtype=np.int16))
    sp = runs["adaptive"][0]
    assert sp["mode"] == "adaptive" and sp["bias_decay"] == 2.0 and sp["regularized_steps"] == 4
    assert sp["bias_strength"] == 3.0 and runs["bias"][0]["bias_strength"] == 2.0  # per-mode defaults
    assert runs["bias"][0]["steps"] == "1.0"
    assert np.abs(runs["bias"][1] - runs["adaptive"][1]).max() > 10

