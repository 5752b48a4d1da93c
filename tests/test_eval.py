"""`compinv-rt eval`: protocol files, metrics, report, cache reuse, resume, CLIP/DETR, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compinv_rt.apps.cli import app
from compinv_rt.apps.eval import metrics as M
from compinv_rt.apps.eval import protocol as P
from compinv_rt.apps.world.judge import Detection, Judgement
from compinv_rt.core.errors import ConfigError

pytestmark = pytest.mark.xdist_group("eval")
runner = CliRunner()

CONCEPTS = [
    {"name": "heart", "shape": "heart", "colour": "orange", "pattern": "dotted", "background": "sand"},
    {"name": "square", "shape": "square", "colour": "red", "pattern": "striped", "background": "night"},
]
PROMPTS = [
    {"prompt": "a {heart} and a blue circle on grass", "detect": ["circle"]},
    "a {heart} and a {square} on grass",
    {"prompt": "a {square} and a {heart} on grass", "id": "pair-b"},
]


def _write(tmp_path, name, items, jsonl=False):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(i) for i in items) if jsonl else json.dumps(items))
    return p


# --- protocol --------------------------------------------------------------------------------


def test_protocol_files_parse_and_render(tmp_path):
    concepts = P.read_concepts(_write(tmp_path, "c.jsonl", CONCEPTS, jsonl=True))
    assert [c.name for c in concepts] == ["heart", "square"]
    prompts = P.read_prompts(_write(tmp_path, "p.json", PROMPTS), concepts)
    assert [p.kind for p in prompts] == ["pretrained", "inverted", "inverted"]
    assert prompts[0].detect == ("circle",) and prompts[2].id == "pair-b"
    by = {c.name: c for c in concepts}
    assert prompts[1].render(by, "tokens", "si") == "a <heart-si> heart and a <square-si> square on grass"
    assert prompts[1].render(by, "plain") == "a heart and a square on grass"
    assert prompts[1].render(by, "world") == "a dotted orange heart and a striped red square on grass"
    # ids are unique, also for prompts without one
    assert len({p.id for p in prompts}) == 3


def test_default_protocol_shape():
    quick, full = P.default_protocol(True), P.default_protocol(False)
    assert len(quick.concepts) == 2 and len(full.concepts) == 3
    kinds = [p.kind for p in full.prompts]
    assert kinds.count("inverted") == 6 and kinds.count("pretrained") == 15  # both orders
    assert kinds.count("single") == 3  # each concept alone: "a {c} on grass"
    for p in full.prompts:  # pretrained objects never share the concept's colour or shape
        if p.kind == "pretrained":
            c = full.by_name[p.concepts[0]]
            other = p.template.split(" and a ")[1]
            assert c.colour not in other and c.shape not in other
    assert [m.name for m in P.METHODS] == ["words", "ti", "si", "ti_bias", "ti_guidance", "full"]


@pytest.mark.parametrize("items,msg", [
    ([{"name": "x", "shape": "blob", "colour": "red", "background": "sand"}], "shape 'blob'"),
    ([{"name": "Bad Name!", "shape": "heart", "colour": "red", "background": "sand"}], "name"),
    ([CONCEPTS[0], {**CONCEPTS[0], "name": "Heart"}], "used twice"),  # tokens are lower case
    ([{"name": "x"}], "photos"),
    ([{"name": "x", "photos": "nope"}], "photos folder not found"),
    ([{"name": "x", "shape": "heart", "colour": "red", "background": "sand", "colour2": 1}], "unknown field"),
    ([CONCEPTS[0], CONCEPTS[0]], "used twice"),
    (["just a string"], "expected an object"),
])
def test_bad_concept_files(tmp_path, items, msg):
    with pytest.raises(ConfigError, match=msg):
        P.read_concepts(_write(tmp_path, "c.json", items))


@pytest.mark.parametrize("items,msg", [
    (["a {nobody} and a blue circle"], "unknown concept 'nobody'"),
    (["a heart and a blue circle"], "names 0 concepts"),
    (["a {heart} and a {heart}"], "same concept twice"),
    (["a {heart and a blue circle"], "unbalanced"),
    ([{"text": "a {heart}"}], "expected a string or an object"),
    ([{"prompt": "a {heart}", "detect": [3]}], "detect"),
])
def test_bad_prompt_files(tmp_path, items, msg):
    concepts = P.read_concepts(_write(tmp_path, "c.json", CONCEPTS))
    with pytest.raises(ConfigError, match=msg):
        P.read_prompts(_write(tmp_path, "p.json", items), concepts)


def test_bad_json_and_empty_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"name\": ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        P.read_concepts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="no entries"):
        P.read_concepts(empty)
    with pytest.raises(ConfigError, match="not found"):
        P.read_concepts(tmp_path / "missing.json")


@pytest.mark.parametrize("args,msg", [
    (["--concepts", "{bad}"], "not valid JSON"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--clip", "/no/such/dir"], "--clip /no/such/dir is not a folder"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, args, msg):
    if args[0] == "--concepts":
        f = tmp_path / "c.json"
        f.write_text("[" + args[1])
        args = ["--concepts", str(f)]
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "--out", str(out), *args])
    assert res.exit_code == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0]
    assert not out.exists()


# --- metrics ---------------------------------------------------------------------------------


def _det(colour, shape, pattern, x0, y0, size=20):
    return Detection(shape, colour, pattern, 0.9, (x0, y0, x0 + size, y0 + size), "left")


def _slots(template, concepts=None):
    concepts = concepts or {c["name"]: P.EvalConcept(c["name"], c["shape"], None, c["shape"],
                                                 c["colour"], c["pattern"], c["background"])
                            for c in CONCEPTS}
    refs = P.parse_template(template, concepts, "test")
    return M.prompt_slots(P.Prompt(template, refs), concepts)


def test_metrics_pretrained_composition():
    slots, bg = _slots("a {heart} and a blue circle on grass")
    assert [s.concept for s in slots] == ["heart", None] and bg == "grass"
    heart_left, circle_right = _det("orange", "heart", "dotted", 8, 22), _det("blue", "circle", "plain", 44, 22)
    perfect = M.score_image(slots, bg, Judgement("grass", (heart_left, circle_right)), 64)
    assert perfect == {"coi": 1.0, "identity": 1.0, "accuracy": 1.0, "region": 1.0, "background": "grass",
                       "identity_by": {"heart": 1.0}, "other": 1.0}
    # swapped sides: everything present but not in the assigned boxes
    swapped = M.score_image(slots, bg, Judgement("grass", (_det("orange", "heart", "dotted", 44, 22),
                                                           _det("blue", "circle", "plain", 8, 22))), 64)
    assert swapped["region"] == 0.0 and swapped["accuracy"] == 1.0
    # the concept dominates: the circle is gone (CoI 0), wrong background (accuracy 0)
    dominated = M.score_image(slots, bg, Judgement("sand", (heart_left,)), 64)
    assert dominated["coi"] == 0.0 and dominated["identity"] == 1.0 and dominated["accuracy"] == 0.0
    # the concept lost its pattern: identity 0, CoI still 1
    lost = M.score_image(slots, bg, Judgement("grass", (_det("orange", "heart", "plain", 8, 22), circle_right)), 64)
    assert lost["identity"] == 0.0 and lost["coi"] == 1.0 and lost["accuracy"] == 0.0


def test_metrics_inverted_pair_and_one_to_one():
    slots, bg = _slots("a {heart} and a {square} on grass")
    # the square's look leaks onto the heart: both classes there (CoI), identity 1/2
    leak = Judgement("grass", (_det("red", "heart", "striped", 8, 22), _det("red", "square", "striped", 44, 22)))
    s = M.score_image(slots, bg, leak, 64)
    assert s["coi"] == 1.0 and s["identity"] == 0.5 and s["accuracy"] == 0.0 and s["region"] == 0.0
    # per concept: the square is there, the heart is not; no pretrained object in a pair
    assert s["identity_by"] == {"heart": 0.0, "square": 1.0} and s["other"] is None
    assert M.concept_metrics([s], "square")["identity"] == 1.0
    assert M.concept_metrics([s], "heart")["identity"] == 0.0
    # one detection cannot serve two slots
    one = M.score_image(slots, bg, Judgement("grass", (_det("red", "square", "striped", 44, 22),)), 64)
    assert one["coi"] == 0.0


def test_attention_stats():
    maps = torch.zeros(6, 4, 4)
    maps[1] = 1.0  # a token spread evenly: entropy 1
    maps[2, 0, 0] = 3.0  # a token on one pixel: entropy 0
    maps[3] = 0.25
    s = M.attention_stats(maps, [1, 2, 3], [[1]], [[2]])
    assert s["concept_share"] == pytest.approx(16 / (16 + 3 + 4))
    assert s["concept_entropy"] == pytest.approx(1.0)
    assert s["other_share"] == pytest.approx(3 / 23)
    s = M.attention_stats(maps, [1, 2, 3], [[2]], [])
    assert s["concept_entropy"] == pytest.approx(0.0, abs=1e-6) and s["other_share"] is None


def test_aggregate_and_relative():
    agg = M.aggregate([{"coi": 1.0, "identity": 0.5}, {"coi": 0.0, "identity": None}])
    assert agg["images"] == 2 and agg["coi"] == 0.5 and agg["identity"] == 0.5 and agg["region"] is None
    assert M.relative(0.6, 0.3) == 1.0 and M.relative(0.3, 0.0) is None


# --- report ----------------------------------------------------------------------------------


def _fake_results(ti_coi, full_coi, ti_id, full_id):
    def block(coi, ident):
        return {"images": 4, "coi": coi, "identity": ident, "accuracy": 0.5, "region": 0.25,
                "concept_share": 0.1, "concept_entropy": 0.9, "other_share": 0.2,
                "clip_text": None, "clip_image": None, "detr_coi": None}

    methods = {}
    for m in P.METHODS:
        coi, ident = (full_coi, full_id) if m.name == "full" else (ti_coi, ti_id)
        methods[m.name] = {"label": m.label, "pretrained": block(coi, ident),
                           "inverted": block(coi, ident), "all": block(coi, ident),
                           "per_concept": {"heart": block(coi, ident)}}
    return {"config": P.EvalConfig().as_dict(), "model": {"path": "m", "hash": "0" * 64},
            "protocol": {"concepts": [{"name": "heart"}], "prompts": []}, "methods": methods,
            "embeddings": {"heart": {"ti": {"norm": 2.0, "norm_x_median": 5.0, "norm_percentile": 100,
                                            "nearest_word": "sand", "nearest_word_distance": 1.9,
                                            "anchor_distance": 2.1}}},
            "judge": "j", "clip": "skipped (no --clip)", "detector": "skipped (no --detector)",
            "seconds": 60}


def test_report_table_and_targets():
    from compinv_rt.apps.eval.report import markdown, targets

    r = _fake_results(0.2, 0.5, 0.8, 0.76)
    t = targets(r)
    assert t[0]["ratio"] == 2.5 and t[0]["met"] is True
    assert t[2]["drop"] == pytest.approx(0.05) and t[2]["met"] is True
    md = markdown(r)
    assert "| plain TI | 20.0% | 20.0% | 80.0% |" in md
    assert "| semantic + bias (full) | +150% | +150% | -5% |" in md  # relative change vs TI
    assert "CLIP text" not in md.split("## The paper")[0]  # columns without values are left out
    assert "skipped (no --clip)" in md
    bad = targets(_fake_results(0.5, 0.6, 0.8, 0.5))
    assert bad[0]["met"] is False and bad[2]["met"] is False


# --- CLIP / DETR from tiny local models ------------------------------------------------------


def _to_open_clip(sd: dict) -> dict:
    """transformers CLIPModel state dict -> open_clip's layout (inverse of convert_open_clip)."""
    from compinv_rt.apps.eval.clip_metrics import convert_open_clip

    out = {}
    for src, dst in (("text_model.encoder.layers.", "transformer.resblocks."),
                     ("vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        for i in sorted({int(k[len(src):].split(".")[0]) for k in sd if k.startswith(src)}):
            a, b = f"{src}{i}.", f"{dst}{i}."
            out[b + "attn.in_proj_weight"] = torch.cat([sd[f"{a}self_attn.{n}_proj.weight"] for n in "qkv"])
            out[b + "attn.in_proj_bias"] = torch.cat([sd[f"{a}self_attn.{n}_proj.bias"] for n in "qkv"])
            for s, d in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for w in ("weight", "bias"):
                    out[f"{b}{s}.{w}"] = sd[f"{a}{d}.{w}"]
    names = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
             "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "visual.ln_post.weight": "vision_model.post_layernorm.weight",
             "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
    for o, h in names.items():
        out[o] = sd[h]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    assert set(convert_open_clip(out)) <= set(sd)  # the two mappings agree on every key
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised ViT CLIP written in open_clip's checkpoint layout, + its HF twin."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2, hidden_act="gelu",
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
                     vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16,
                                        hidden_act="gelu"), projection_dim=16)
    hf = CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("clip")
    save_file(_to_open_clip(hf.state_dict()), str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                        "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    return d, hf


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                     backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8],
                                                  depths=[1, 1, 1, 1], out_features=["stage4"]),
                     d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=4,
                     id2label={0: "circle", 1: "backpack"}, label2id={"circle": 0, "backpack": 1})
    d = tmp_path_factory.mktemp("detr")
    DetrForObjectDetection(cfg).save_pretrained(str(d))
    return d


@pytest.mark.slow
def test_clip_conversion_matches_the_source_model(tiny_clip):
    from PIL import Image

    from compinv_rt.apps.eval.clip_metrics import ClipScorer

    path, hf = tiny_clip
    scorer = ClipScorer(path)
    ids = scorer.tokenizer(["a heart and a blue circle"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    px = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px)
        img = scorer.model.get_image_features(pixel_values=px)
    assert torch.allclose(scorer.text_features(["a heart and a blue circle"]), ref.text_embeds, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1),
                          ref.image_embeds, atol=1e-5)
    ims = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    s = scorer.score(ims, "a heart", scorer.image_features(ims[:1]))
    assert s[0]["clip_image"] == pytest.approx(1.0, abs=1e-4)  # an image is its own best match
    assert all(0 <= r["clip_text"] <= 2.5 for r in s)


def test_clip_and_detector_bad_folders(tmp_path, tiny_detr):
    from compinv_rt.apps.eval.clip_metrics import ClipScorer, DetrScorer
    from compinv_rt.core.errors import ModelError

    with pytest.raises(ModelError, match="open_clip_config.json not found"):
        ClipScorer(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 4,
                                                    "vision_cfg": {}, "text_cfg": {}}}))
    with pytest.raises(ModelError, match="safetensors"):
        ClipScorer(tmp_path)
    with pytest.raises(ModelError, match="config.json not found"):
        DetrScorer(tmp_path / "nothing")
    d = DetrScorer(tiny_detr)
    assert d.known(["circle", "Backpack", "heart"]) == ["circle", "Backpack"]


# --- end to end on the tiny model ------------------------------------------------------------

EVAL_ARGS = ["--samples", "2", "--steps", "2", "--train-steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def e2e(tiny_model, tiny_clip, tiny_detr, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    concepts = _write(tmp, "concepts.jsonl", CONCEPTS, jsonl=True)
    prompts = _write(tmp, "prompts.json", PROMPTS)
    out = tmp / "run"
    args = ["eval", "--out", str(out), "--model", str(tiny_model), "--concepts", str(concepts),
            "--prompts", str(prompts), "--clip", str(tiny_clip[0]), "--detector", str(tiny_detr),
            *EVAL_ARGS]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"out": out, "args": args, "stdout": res.stdout, "tmp": tmp,
            "concepts": concepts, "prompts": prompts}


@pytest.mark.slow
def test_e2e_outputs(e2e):
    out = e2e["out"]
    r = json.loads((out / "eval.json").read_text())
    assert set(r["methods"]) == {m.name for m in P.METHODS}
    for m in r["methods"].values():
        assert m["pretrained"]["images"] == 2 and m["inverted"]["images"] == 4
        for key in ("coi", "identity", "accuracy", "region", "concept_share", "concept_entropy",
                    "clip_text", "clip_image", "detr_coi"):
            v = m["all"][key]
            assert v is not None and v >= 0, key
        assert 0 <= m["all"]["concept_share"] <= 1 and 0 <= m["all"]["concept_entropy"] <= 1
    assert set(r["embeddings"]) == {"heart", "square"} and set(r["embeddings"]["heart"]) == {"ti", "si"}
    # the si embedding is trained with the anchor, the ti one without
    arts = {k: json.loads((__import__("pathlib").Path(v["folder"]) / "artifact.json").read_text())
            for k, v in r["trained"].items()}
    assert arts["heart-ti"]["config"]["anchor_weight"] == 0 and arts["heart-si"]["config"]["anchor_weight"] == 0.95
    for f in ("eval.md", "eval.png", "protocol.json", *(f"grids/{m.name}.png" for m in P.METHODS)):
        assert (out / f).is_file(), f
    assert "| plain TI |" in e2e["stdout"] and "Relative change vs plain TI" in e2e["stdout"]
    # the spatial methods really were given the fixed boxes; the others none
    cell = json.loads((out / "cells" / "full" / "pair-b.json").read_text())
    assert cell["spatial"]["mode"] == "bias"
    assert [c["boxes"][0] for c in cell["spatial"]["layout"]["concepts"]] == [[0.1, 0.2, 0.5, 0.8],
                                                                              [0.6, 0.2, 0.95, 0.8]]
    assert json.loads((out / "cells" / "ti" / "pair-b.json").read_text())["spatial"]["layout"] is None
    # same seeds in every method
    seeds = {m.name: [s["seed"] for s in json.loads((out / "cells" / m.name / "pair-b.json").read_text())["samples"]]
             for m in P.METHODS}
    assert all(v == [5, 6] for v in seeds.values())


@pytest.mark.slow
def test_rerun_reuses_training_and_cells_and_resumes(e2e, monkeypatch):
    from compinv_rt.apps.eval import runner as R

    out = e2e["out"]
    cells = sorted((out / "cells").rglob("*.json"))
    assert len(cells) == 18  # 6 methods (words included) x 3 prompts
    victim = out / "cells" / "si" / "pair-b.json"
    before = json.loads(victim.read_text())
    stored = out / "cache" / "cells" / f"{before['key']}.json"
    assert json.loads(stored.read_text()) == before  # every cell is also in the shared store
    calls = []
    real = R._run_cell
    monkeypatch.setattr(R, "_run_cell", lambda *a, **k: calls.append(a[1].id) or real(*a, **k))
    victim.unlink()  # lost from this run's folder only: restored from the store, not recomputed
    assert runner.invoke(app, e2e["args"]).exit_code == 0
    assert calls == [] and json.loads(victim.read_text()) == before
    victim.unlink()  # as if the run had been killed before this cell finished
    stored.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in cells if p != victim}
    res = runner.invoke(app, e2e["args"])
    assert res.exit_code == 0, res.output
    assert calls == ["pair-b"]  # only the missing cell ran again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    r = json.loads((out / "eval.json").read_text())
    assert all(v["reused"] for v in r["trained"].values())  # nothing retrained
    after = json.loads(victim.read_text())
    keys = ("seed", "coi", "identity", "accuracy", "region", "concept_share", "clip_text", "detr_coi")
    assert [{k: s[k] for k in keys} for s in after["samples"]] == \
        [{k: s[k] for k in keys} for s in before["samples"]]  # deterministic: same numbers again


@pytest.mark.slow
def test_killed_run_continues(e2e, monkeypatch, tmp_path):
    """A run that dies mid-way keeps its finished cells; the next run does only the rest."""
    from compinv_rt.apps.eval import runner as R

    out = tmp_path / "killed"
    args = [a if a != str(e2e["out"]) else str(out) for a in e2e["args"]]
    args[args.index("--seed") + 1] = "6"  # other images (so no stored cell matches) ...
    args += ["--cache", str(e2e["out"] / "cache")]  # ... from the same trained concepts
    calls = []
    real = R._run_cell

    def dying(*a, **k):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(a[1].id)
        return real(*a, **k)

    monkeypatch.setattr(R, "_run_cell", dying)
    res = runner.invoke(app, args)
    assert res.exit_code == 130 and not (out / "eval.json").exists()
    assert len(list((out / "cells").rglob("*.json"))) == 4
    monkeypatch.setattr(R, "_run_cell", lambda *a, **k: calls.append(a[1].id) or real(*a, **k))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(calls) == 18 and (out / "eval.json").is_file()


@pytest.mark.slow
def test_cache_key_changes_with_the_config(e2e, tiny_model):
    from compinv_rt.apps.eval.training import TrainingSetup, ensure_trained
    from compinv_rt.models.loading import content_hash, inspect_model_dir

    files = inspect_model_dir(tiny_model)
    h = content_hash(files.all_files())
    concept = P.read_concepts(e2e["concepts"])[0]
    setup = TrainingSetup(tiny_model, h, e2e["out"] / "cache", world=False)
    cfg = P.EvalConfig(samples=2, steps=2, train_steps=2, seed=5)
    folder, reused = ensure_trained(concept, "ti", cfg, setup)
    assert reused
    other, reused = ensure_trained(concept, "ti", P.EvalConfig(train_steps=1), setup)
    assert not reused and other != folder
    assert ensure_trained(concept, "ti", P.EvalConfig(train_steps=1), setup) == (other, True)


def test_semantic_inversion_anchor_settings():
    """--si-anchors / --si-anchor-weight reach the SI training config only; TI stays plain."""
    from compinv_rt.apps.eval.training import train_config

    heart = P.EvalConcept("heart", "heart", shape="heart", colour="orange", pattern="dotted",
                      background="sand")
    circle = P.EvalConcept("circle", "circle", shape="circle", colour="red", pattern="plain",
                       background="sand")
    cfg = P.EvalConfig(si_anchors="attributes", si_anchor_weight=0.5)
    si, ti = train_config(heart, "si", cfg, world=True), train_config(heart, "ti", cfg, world=True)
    assert (si.anchors, si.anchor_weight) == ("heart,orange,dotted", 0.5)
    assert (ti.anchors, ti.anchor_weight) == (None, 0.0)
    assert train_config(circle, "si", cfg, world=True).anchors == "circle,red"
    assert train_config(heart, "si", P.EvalConfig(), world=True).anchors is None
    with pytest.raises(ConfigError):
        P.EvalConfig(si_anchors="auto:0")
    with pytest.raises(ConfigError):
        P.EvalConfig(si_anchor_weight=-1)


# --- random concepts, recipes, word parity, cell keys, floors ----------------------------------


def test_random_concepts_cover_the_whole_space_without_filtering():
    from compinv_rt.apps.world.scenes import COLOURS, PATTERNS, SHAPES

    a, b = P.random_concepts(8, seed=3), P.random_concepts(8, seed=3)
    assert a == b and len({c.name for c in a}) == 8  # seeded, no repeats
    assert a != P.random_concepts(8, seed=4)
    every = P.random_concepts(len(COLOURS) * len(PATTERNS) * len(SHAPES), seed=0)
    assert {(c.colour, c.pattern, c.shape) for c in every} == {
        (c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES}  # nothing filtered out
    assert all(c.background != "grass" for c in every)  # the prompts' background
    with pytest.raises(ConfigError, match="--random"):
        P.random_concepts(0)
    protocol = P.build_protocol(False, random=4, random_seed=3, objects=1)
    names = [c.name for c in protocol.concepts]
    assert names[:3] == [c.name for c in P.DEFAULT_CONCEPTS] and len(names) == 7
    kinds = [p.kind for p in protocol.prompts]
    assert kinds.count("single") == 7 and kinds.count("pretrained") == 7
    assert kinds.count("inverted") == 7  # more than 3 concepts: each with the next


def test_class_word_after_a_concept_is_not_doubled(tmp_path):
    concepts = P.read_concepts(_write(tmp_path, "c.json", CONCEPTS))
    prompts = P.read_prompts(_write(tmp_path, "p.json", [
        "a {heart} heart and a blue circle on grass", "a {heart} and a blue circle on grass"]),
        concepts)
    by = {c.name: c for c in concepts}
    assert prompts[0].template == prompts[1].template == "a {heart} and a blue circle on grass"
    assert prompts[0].render(by, "tokens") == "a <heart-ti> heart and a blue circle on grass"


def test_names_are_kept_as_written_and_tokens_are_lower_case(tmp_path):
    c = P.read_concepts(_write(tmp_path, "c.json", [{**CONCEPTS[0], "name": "My-Heart"}]))[0]
    assert c.name == "My-Heart" and c.token("ti") == "<my-heart-ti>"
    assert c.token("cap", seed=2) == "<my-heart-cap-s2>"


def test_prompt_kinds_and_method_names():
    assert P.Prompt("a {x} on grass", ("x",)).kind == "single"
    assert P.Prompt("a {x} and a blue circle on grass", ("x",)).kind == "pretrained"
    assert P.Prompt("a {x} and a dog", ("x",), ("dog",)).kind == "pretrained"
    assert P.Prompt("a {x} and a {y}", ("x", "y")).kind == "inverted"
    m = P.method("cap_ctxreg+bias")
    assert (m.embedding, m.spatial, m.trained) == ("cap_ctxreg", "bias", True)
    assert P.method("full") == P.Method("full", "semantic + bias (full)", "si", "bias")
    assert not P.method("words").trained
    for bad in ("nope", "ti+blur", "ti+", "ti,ti"):
        with pytest.raises(ConfigError):
            P.parse_methods(bad)


def test_recipes_reach_the_training_config(tmp_path):
    from compinv_rt.apps.eval.training import train_config

    heart = P.EvalConcept("heart", "heart", shape="heart", colour="orange", pattern="dotted",
                      background="sand")
    (tmp_path / "masks").mkdir()
    cfg = P.EvalConfig()
    ti = train_config(heart, "ti", cfg, world=True, seed=0, photos=tmp_path)
    assert (ti.captions, ti.masks, ti.context_weight, ti.norm, ti.anchor_weight) == (
        "none", None, 0.0, "none", 0.0)
    cap = train_config(heart, "cap_mask", cfg, world=True, seed=2, photos=tmp_path)
    assert cap.captions == "auto" and cap.masks == str(tmp_path / "masks") and cap.seed == 2
    assert cap.token == "<heart-cap_mask-s2>"
    reg = train_config(heart, "cap_ctxreg", cfg, world=True)
    assert reg.context_weight == P.CONTEXT_WEIGHT and reg.captions == "auto"
    light = train_config(heart, "cap_ctxreg", P.EvalConfig(context_weight=0.01), world=True)
    assert light.context_weight == 0.01
    assert train_config(heart, "cap", P.EvalConfig(context_weight=0.01), world=True).context_weight == 0
    assert train_config(heart, "cap_norm", P.EvalConfig(norm="vocab:2"), world=True).norm == "vocab:2"
    assert train_config(heart, "cap", P.EvalConfig(norm="vocab:2"), world=True).norm == "none"
    for bad in ("none", "vocab:-1"):
        with pytest.raises(ConfigError):
            P.EvalConfig(norm=bad)
    assert train_config(heart, "cap_norm", cfg, world=True).norm == "vocab:2"  # train's NORM_FOR_TI
    sparse = train_config(heart, "cap_sparse", cfg, world=True)
    assert sparse.anchors == "auto:8" and sparse.anchor_weight == cfg.si_anchor_weight


def test_cell_key_depends_only_on_what_decides_the_cell():
    from pathlib import Path

    from compinv_rt.apps.eval.runner import cell_key

    prompt = P.Prompt("a {heart} on grass", ("heart",), id="p")
    folders = {("heart", "ti", 0): Path("heart-ti-aaa"), ("heart", "ti", 1): Path("heart-ti-bbb")}
    ti, bias, words = P.method("ti"), P.method("ti+bias"), P.method("words")
    base = P.EvalConfig()
    key = lambda m, cfg=base, seed=0: cell_key(cfg, m, prompt, "h", folders, seed, None, None)  # noqa: E731
    other_si = P.EvalConfig(si_anchor_weight=0.3, si_anchors="attributes", train_steps=9)
    assert key(ti) == key(ti, other_si)  # TI cells are reused across SI settings
    assert key(ti) == key(ti, P.EvalConfig(bias_strength=5.0))  # no layout: bias irrelevant
    assert key(bias) != key(bias, P.EvalConfig(bias_strength=5.0))
    assert key(ti) != key(ti, P.EvalConfig(samples=3)) and key(ti) != key(ti, seed=1)
    assert key(words) == key(words, seed=1) and key(words) != key(ti)
    adaptive = P.method("ti+adaptive")  # runs on the adaptive bias's own strength and steps
    assert adaptive.spatial == "adaptive" and key(adaptive) not in (key(bias), key(ti))
    assert key(adaptive) == key(adaptive, P.EvalConfig(bias_strength=5.0))


def _block(identity_by_seed, other_by_seed):
    seeds = {str(s): {"single": {"identity": i}, "compositions": {"identity": i},
                      "pretrained": {"other": o}}
             for s, (i, o) in enumerate(zip(identity_by_seed, other_by_seed))}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    pc = {"single": {"identity": mean(identity_by_seed)},
          "compositions": {"identity": mean(identity_by_seed)},
          "pretrained": {"other": mean(other_by_seed)}}
    return {"per_concept": {"a": pc}, "per_concept_seeds": {"a": seeds}}


def test_word_parity_is_per_seed_mean_and_range_against_the_words():
    from compinv_rt.apps.eval.runner import word_parity

    protocol = P.Protocol((P.EvalConcept("a", "heart", None, "heart", "red", "plain", "sand"),), ())
    methods = {"words": _block([0.8], [0.9]), "ti": _block([0.4, 0.8, 0.6], [0.0, 0.9, 0.45])}
    per, summary = word_parity(methods, protocol)
    row = per["a"]["ti"]
    assert row["compositions"]["parity"] == pytest.approx(0.75)
    assert row["compositions"]["parity_range"] == [0.5, 1.0]
    assert row["other"]["vs_words"] == pytest.approx(0.5) and row["other"]["vs_words_range"] == [0, 1]
    assert summary["ti"]["parity_single"] == pytest.approx(0.75) and summary["_below_floor"] == []
    assert summary["ti"]["other_pooled"] == pytest.approx(0.45 / 0.9)
    low = {"words": _block([0.1], [0.9]), "ti": _block([0.1], [0.9])}
    per, summary = word_parity(low, protocol)
    assert per["a"]["below_floor"] and summary["ti"]["parity_compositions"] is None


def test_no_verdict_below_the_floor():
    from compinv_rt.apps.eval.report import markdown, targets

    r = _fake_results(0.1, 0.5, 0.11, 0.1)
    t = targets(r)
    assert t[0]["ratio"] == 5.0 and t[0]["met"] is None  # 5x of 10 % proves nothing
    assert t[2]["drop"] == pytest.approx(0.0909, abs=1e-3) and t[2]["met"] is None
    assert "below the 20% floor" in markdown(r)


def test_e2e_training_seeds_words_and_progress(tiny_model, tmp_path):
    """Two training seeds of two recipes, the words oracle, progress through generation."""
    from compinv_rt.apps.eval.runner import RunOptions, run_eval

    protocol = P.build_protocol(False, _write(tmp_path, "c.json", CONCEPTS[:1]), objects=1,
                                methods=P.parse_methods("words,ti,cap,cap_norm+adaptive"))
    cfg = P.EvalConfig(samples=3, steps=2, train_steps=2, train_seeds=2, batch=2, norm="vocab:2")
    seen = []
    r = run_eval(protocol, cfg, tmp_path / "run", RunOptions(model=str(tiny_model), device="cpu"),
                 on_progress=lambda done, total, what: seen.append((done, total, what)))
    assert set(r["trained"]) == {"heart-ti", "heart-ti-s1", "heart-cap", "heart-cap-s1",
                                 "heart-cap_norm", "heart-cap_norm-s1"}
    assert r["methods"]["cap_norm+adaptive"]["spatial"] == "adaptive"
    cap = json.loads((__import__("pathlib").Path(r["trained"]["heart-cap-s1"]["folder"])
                      / "artifact.json").read_text())
    assert cap["config"]["captions"] == "auto" and cap["config"]["seed"] == 1
    cells = tmp_path / "run" / "cells"
    assert sorted(p.name for p in (cells / "ti").glob("*.json"))[0].endswith(".json")
    assert len(list((cells / "ti").glob("*-s1.json"))) == 2 and len(list((cells / "words").glob("*.json"))) == 2
    words = json.loads(next((cells / "words").glob("*.json")).read_text())
    assert "<" not in words["text"] and "dotted orange heart" in words["text"]
    assert r["methods"]["ti"]["seeds"] == 2 and r["methods"]["words"]["seeds"] == 1
    assert r["methods"]["ti"]["single"]["images"] == 6  # 3 images x 2 seeds
    assert set(r["word_parity"]["heart"]) >= {"words", "ti", "cap"}
    assert any("(2/3 images)" in w for _, _, w in seen)  # progress within a cell
    assert any(d != int(d) for d, _, _ in seen) and seen[-1][0] == seen[-1][1]
    md = (tmp_path / "run" / "eval.md").read_text()
    assert "## Word parity" in md and "## Over training seeds" in md
    assert "norm constraint `vocab:2`" in md and "context weight" not in md
