"""What `compinv-rt eval` measures: concepts, prompts and methods, as data.

A concept is a user concept to invert: a name, a class word and either a photos folder or
shapes-world attributes (shape, colour, pattern, photo background; its photos are then made by
`world.photos.make_photos`). World attributes also let the judge score it.

A prompt is a template that names one or two concepts in braces:
    "a {orange-heart} and a blue circle on grass"      -> kind "pretrained" (concept + known objects)
    "a {orange-heart} and a {red-square} on grass"     -> kind "inverted" (two inverted concepts)
`{name}` renders as "<name-METHOD> CLASS" for generation, "CLASS" for CLIP's text alignment and
"PATTERN COLOUR SHAPE" for the judge's reading of the prompt.

Every method shares the sampler, steps, guidance and seeds; a method is a training recipe (how the
token is learned: plain TI = anchor weight 0, semantic inversion = 0.95, captions, masks, the
anti-dominance constraints; see RECIPES) and a generation-time spatial regularization, or "words":
the concept written out in words (no token), the oracle a token should reach. A method name is
`RECIPE`, `RECIPE+bias`, `RECIPE+adaptive`, `RECIPE+guidance` or `words`; `ti_bias`, `ti_guidance` and `full`
(= `si+bias`) are kept as the paper's names. Trained methods run once per training seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compinv_rt.core.errors import ConfigError
from compinv_rt.train.config import NORM_FOR_TI

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,39}$")
REF_RE = re.compile(r"\{([^{}]*)\}")

# Training settings: the reference's semantic-inversion weight; scale augmentation off (on the
# embedded shapes world it cost the red square 72 points of fidelity for TI and 81 for SI, see
# benchmarks/train.md section 2, while on the heart "off" lost 11 (TI) and 25 (SI): off wins on
# average, by a wide margin for semantic inversion).
TI_ANCHOR_WEIGHT = 0.0
SI_ANCHOR_WEIGHT = 0.95
WORLD_TEMPLATES = ("a photo of a {}", "photo of a {}", "an image of a {}", "a picture of a {}",
                   "a {}, simple drawing")


CONTEXT_WEIGHT = 0.05  # the context regularizer's default weight (EvalConfig.context_weight)
SPATIAL = ("bias", "adaptive", "guidance")  # generation-time spatial parts of a method
WORDS = "words"


@dataclass(frozen=True)
class Recipe:
    """How a concept's token is trained (the fields are `train` options)."""

    name: str
    label: str
    semantic: bool = False  # anchor loss with EvalConfig.si_anchor_weight / si_anchors
    captions: bool = False  # name each photo's background in its prompts (world photos' captions)
    masks: str = ""  # loss on the subject: "photos" (the photos folder's masks/), "auto" (the
    # base model's attention to the class word) or "" (whole image)
    context_token: bool = False
    norm: bool = False  # the norm constraint, with EvalConfig.norm
    context_reg: bool = False  # the context regularizer, with EvalConfig.context_weight
    vectors: int = 1
    anchors: str | None = None  # overrides the semantic anchors (e.g. "auto:8": sparse anchors)


RECIPES = {r.name: r for r in (
    Recipe("ti", "plain TI"),
    Recipe("si", "TI + semantic", semantic=True),
    Recipe("cap", "TI + captions", captions=True),
    Recipe("mask", "TI + mask", masks="photos"),
    Recipe("automask", "TI + attention mask", masks="auto"),
    Recipe("cap_mask", "TI + captions + mask", captions=True, masks="photos"),
    Recipe("ctxtok", "TI + context token", context_token=True),
    Recipe("cap_si", "captions + semantic", captions=True, semantic=True),
    Recipe("cap_norm", "captions + norm", captions=True, norm=True),
    Recipe("cap_ctxreg", "captions + context reg.", captions=True, context_reg=True),
    Recipe("cap_sparse", "captions + sparse anchors", captions=True, semantic=True,
           anchors="auto:8"),
    Recipe("cap_vec2", "captions + 2 vectors", captions=True, vectors=2),
)}
EMBEDDINGS = {"ti": TI_ANCHOR_WEIGHT, "si": SI_ANCHOR_WEIGHT}  # the reference recipes' weights


@dataclass(frozen=True)
class Method:
    name: str  # short id (file names, JSON keys)
    label: str  # table row
    embedding: str  # a recipe name (which trained embedding), or "words" (no token)
    spatial: str  # "none" or one of SPATIAL

    @property
    def trained(self) -> bool:
        return self.embedding != WORDS


PAPER_NAMES = {"ti_bias": ("ti", "bias", "TI + spatial bias"),
               "ti_guidance": ("ti", "guidance", "TI + spatial guidance"),
               "full": ("si", "bias", "semantic + bias (full)")}


def method(name: str) -> Method:
    """`words`, `RECIPE`, `RECIPE+bias|adaptive|guidance`, or a paper name. Raises ConfigError."""
    name = name.strip()
    if name == WORDS:
        return Method(WORDS, "words (oracle)", WORDS, "none")
    if name in PAPER_NAMES:
        emb, spatial, label = PAPER_NAMES[name]
        return Method(name, label, emb, spatial)
    recipe, plus, spatial = name.partition("+")
    if recipe not in RECIPES or (plus and spatial not in SPATIAL):
        raise ConfigError(f"unknown method {name!r}; expected words, RECIPE or "
                          f"RECIPE+{'|'.join(SPATIAL)} "
                          f"with RECIPE one of {', '.join(RECIPES)} (or ti_bias, ti_guidance, full)")
    label = RECIPES[recipe].label + (f" + spatial {spatial}" if spatial else "")
    return Method(name, label, recipe, spatial or "none")


def parse_methods(spec: str | None) -> tuple[Method, ...]:
    if spec is None or not spec.strip():
        return METHODS
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods {spec!r} names a method twice")
    return tuple(method(n) for n in names)


METHODS = tuple(method(n) for n in (WORDS, "ti", "si", "ti_bias", "ti_guidance", "full"))


@dataclass(frozen=True)
class EvalConcept:
    name: str
    class_word: str
    photos: Path | None = None  # None: made from the world attributes
    shape: str | None = None
    colour: str | None = None
    pattern: str | None = None
    background: str | None = None  # the photos' background

    @property
    def is_world(self) -> bool:
        return self.shape is not None

    def anchors(self, spec: str) -> str | None:
        """Train `--anchors` for semantic inversion (None: the class word)."""
        if spec == "class":
            return None
        if spec == "attributes":
            if not self.is_world:
                return None  # a user concept has no known attribute words
            pat = [] if self.pattern in (None, "plain") else [str(self.pattern)]
            return ",".join([self.class_word, str(self.colour), *pat])
        return spec

    def words(self) -> str:
        """The concept in world words (what the judge should find)."""
        if not self.is_world:
            return self.class_word
        pat = [] if self.pattern in (None, "plain") else [str(self.pattern)]
        return " ".join(pat + [str(self.colour), str(self.shape)])

    def token(self, embedding: str, seed: int = 0) -> str:
        """The placeholder of one training (lower case: the tokenizer's matching is)."""
        return f"<{self.name.lower()}-{embedding}{f'-s{seed}' if seed else ''}>"

    def to_json(self) -> dict:
        d = asdict(self)
        d["photos"] = None if self.photos is None else str(self.photos)
        return d


@dataclass(frozen=True)
class Prompt:
    template: str  # "a {heart} and a blue circle on grass"
    concepts: tuple[str, ...]  # names referenced, in order of mention
    detect: tuple[str, ...] = ()  # detector labels of the other objects (DETR CoI)
    id: str = ""

    @property
    def kind(self) -> str:
        """"single" (one concept, nothing else), "pretrained" (one concept + known objects) or
        "inverted" (two concepts)."""
        if len(self.concepts) > 1:
            return "inverted"
        from compinv_rt.apps.world.scenes import parse_prompt

        rest = REF_RE.sub(" ", self.template)
        others = self.detect or parse_prompt(rest).objects or re.search(r"\b(and|with)\b", rest)
        return "pretrained" if others else "single"

    def render(self, concepts: dict[str, EvalConcept], how: str, embedding: str = "ti",
               seed: int = 0) -> str:
        """how: "tokens" (generation), "plain" (CLIP text: class words), "world" (judge and the
        words method: the concept written out)."""
        def sub(m):
            c = concepts[m.group(1)]
            if how == "tokens":
                return f"{c.token(embedding, seed)} {c.class_word}"
            return c.class_word if how == "plain" else c.words()

        return REF_RE.sub(sub, self.template)

    def to_json(self) -> dict:
        return {"id": self.id, "template": self.template, "kind": self.kind,
                "concepts": list(self.concepts), "detect": list(self.detect)}


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the numbers (stored in the results)."""

    quick: bool = False
    samples: int = 32  # images per (method, prompt)
    steps: int = 25  # sampler steps
    guidance: float = 7.5
    seed: int = 8888  # image i of every prompt and method uses seed + i
    train_steps: int = 500
    train_batch: int = 4
    train_lr: float = 5e-3
    train_variants: int = 8
    train_resolution: int | None = None
    augment: bool = False
    bias_strength: float = 2.0
    # Semantic inversion's attractor: weight, and anchors: "class" (the class word, the
    # reference), "attributes" (class + colour + pattern words of a world concept: a sparse
    # combination, so the token keeps its attributes), or any train spec ("w1,w2", "auto:K").
    si_anchor_weight: float = SI_ANCHOR_WEIGHT
    si_anchors: str = "class"
    context_weight: float = CONTEXT_WEIGHT  # the context regularizer's weight (its recipes only)
    norm: str = NORM_FOR_TI  # the norm constraint's train --norm spec (its recipes only)
    spatial_steps: str = "0.2"  # the reference's 10 of 50 steps
    batch: int = 16  # images per pipeline call
    detector_threshold: float = 0.8
    train_seeds: int = 1  # trainings per (concept, recipe): seeds 0..K-1; mean and range reported
    scheduler: str = "ddim"  # the sampler and its guidance interval (runtime.pipeline.SamplingConfig)
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cache_interval: int = 1  # DeepCache (SamplingConfig.cache_interval)

    def __post_init__(self):
        for name in ("samples", "steps", "train_steps", "train_batch", "train_variants", "batch",
                     "train_seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance}")
        if self.si_anchor_weight < 0:
            raise ConfigError(f"--si-anchor-weight must be >= 0, got {self.si_anchor_weight}")
        if not 0 <= self.context_weight <= 100:
            raise ConfigError(f"--context-weight must be in [0, 100], got {self.context_weight}")
        from compinv_rt.train.regularizers import parse_norm

        try:
            if parse_norm(self.norm)[0] == "none":
                raise ValueError(self.norm)
        except ValueError:
            raise ConfigError(f"--norm must be vocab, vocab:K or a positive number, got "
                              f"{self.norm!r}") from None
        if self.si_anchors not in ("class", "attributes"):
            from compinv_rt.train.config import parse_anchor_spec

            parse_anchor_spec(self.si_anchors)

    @staticmethod
    def preset(quick: bool, **overrides) -> "EvalConfig":
        base: dict = (dict(quick=True, samples=8, train_steps=250) if quick else {})
        base.update({k: v for k, v in overrides.items() if v is not None})
        return EvalConfig(**base)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Protocol:
    concepts: tuple[EvalConcept, ...]
    prompts: tuple[Prompt, ...]
    methods: tuple[Method, ...] = METHODS
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def by_name(self) -> dict[str, EvalConcept]:
        return {c.name: c for c in self.concepts}

    def to_json(self) -> dict:
        return {"concepts": [c.to_json() for c in self.concepts],
                "prompts": [p.to_json() for p in self.prompts],
                "methods": [asdict(m) for m in self.methods]}


# ------------------------------------------------------------------------------------------------
# defaults (the embedded shapes world)

# Chosen because the embedded base draws each of them when told in words (judged, 24 samples,
# "photo of a PATTERN COLOUR SHAPE on grass": 79%, 96%, 83% colour+pattern+shape), with three
# different shapes, colours and photo backgrounds.
DEFAULT_CONCEPTS = (
    EvalConcept("orange-heart", "heart", None, "heart", "orange", "dotted", "sand"),
    EvalConcept("red-square", "square", None, "square", "red", "striped", "night"),
    EvalConcept("blue-cross", "cross", None, "cross", "blue", "dotted", "brick"),
)
# Pretrained objects to compose with: plain known colour-shape pairs (none held out of the base).
WORLD_OBJECTS = ("blue circle", "green star", "yellow triangle", "purple square", "red heart",
                 "green circle", "yellow star")
COCO_OBJECTS = ("backpack", "chair", "dog", "cup")
BACKGROUND = "on grass"


def _clash(concept: EvalConcept, obj: str) -> bool:
    colour, shape = obj.split()
    return concept.is_world and (colour == concept.colour or shape == concept.shape)


MAX_ALL_PAIRS = 3  # up to 3 concepts: every ordered pair; more: each with the next (a ring)


def default_prompts(concepts, per_concept: int, world: bool, pairs: bool = True,
                    single: bool = True) -> list[Prompt]:
    """Each concept alone, with `per_concept` pretrained objects, then concept pairs."""
    out = []
    bg = f" {BACKGROUND}" if world else ""
    for c in concepts:
        if single:
            out.append(Prompt(f"a {{{c.name}}}{bg}" if world else f"a photo of a {{{c.name}}}",
                              (c.name,)))
        if world:
            objs = [o for o in WORLD_OBJECTS if not _clash(c, o)][:per_concept]
            out += [Prompt(f"a {{{c.name}}} and a {o} {BACKGROUND}", (c.name,)) for o in objs]
        else:
            out += [Prompt(f"a {{{c.name}}} and a {o}", (c.name,), (o,))
                    for o in COCO_OBJECTS[:per_concept]]
    if pairs and len(concepts) > 1:
        if len(concepts) <= MAX_ALL_PAIRS:
            ordered = [(a, b) for a in concepts for b in concepts if a.name != b.name]
        else:
            ordered = [(a, concepts[(i + 1) % len(concepts)]) for i, a in enumerate(concepts)]
        out += [Prompt(f"a {{{a.name}}} and a {{{b.name}}}{bg}", (a.name, b.name))
                for a, b in ordered]
    return _with_ids(out)


def default_protocol(quick: bool) -> Protocol:
    concepts = DEFAULT_CONCEPTS[:2] if quick else DEFAULT_CONCEPTS
    return Protocol(concepts, tuple(default_prompts(concepts, 2 if quick else 5, world=True)))


def random_concepts(n: int, seed: int = 0) -> list[EvalConcept]:
    """`n` concepts drawn with `seed` from the world's whole colour x pattern x shape space (no
    filtering by what the base draws), without repeats; each photographed on a background drawn
    from every one but grass (the evaluation prompts' background, where leakage would not show)."""
    import numpy as np

    from compinv_rt.apps.world.scenes import BACKGROUNDS, COLOURS, PATTERNS, SHAPES

    space = [(c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES]
    if not 1 <= n <= len(space):
        raise ConfigError(f"--random must be between 1 and {len(space)}, got {n}")
    rng = np.random.default_rng([seed, 1313])
    backgrounds = [b for b in BACKGROUNDS if b != BACKGROUND.split()[-1]]
    out = []
    for i in rng.choice(len(space), n, replace=False):
        c, p, sh = space[int(i)]
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        out.append(EvalConcept(f"{p}-{c}-{sh}", sh, None, sh, c, p, bg))
    return out


def _with_ids(prompts: list[Prompt]) -> list[Prompt]:
    out = []
    for i, p in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "-", p.template.lower()).strip("-")[:40]
        h = hashlib.sha256(p.template.encode()).hexdigest()[:6]
        out.append(Prompt(p.template, p.concepts, p.detect, p.id or f"{i:03d}-{slug}-{h}"))
    return out


# ------------------------------------------------------------------------------------------------
# user files


def _read_items(path: Path, what: str) -> list:
    """A JSON list, or JSONL (one JSON value per line; blank lines and # comments skipped)."""
    if not path.is_file():
        raise ConfigError(f"--{what} file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"--{what} file {path} is empty")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--{what} file {path} is not valid JSON: {exc.msg} "
                              f"(line {exc.lineno})") from None
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--{what} file {path} line {n} is not valid JSON: "
                                  f"{exc.msg}") from None
    if not items:
        raise ConfigError(f"--{what} file {path} has no entries")
    return items


def read_concepts(path: str | Path) -> list[EvalConcept]:
    from compinv_rt.apps.world.scenes import BACKGROUNDS, COLOURS, PATTERNS, SHAPES

    path = Path(path)
    out = []
    for i, item in enumerate(_read_items(path, "concepts"), 1):
        where = f"--concepts {path} entry {i}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object like "
                              '{"name": "my-heart", "shape": "heart", "colour": "orange", '
                              '"pattern": "dotted", "background": "sand"}')
        unknown = set(item) - {"name", "class_word", "photos", "shape", "colour", "pattern",
                               "background"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        name = str(item.get("name", "")).strip()  # kept as written (the token is lower case)
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: name {item.get('name')!r} must be 1-40 characters "
                              "A-Z, a-z, 0-9 or '-' (it becomes the token <name-ti>)")
        world = {k: item.get(k) for k in ("shape", "colour", "pattern", "background")}
        photos = item.get("photos")
        if any(v is not None for v in world.values()):
            for key, allowed in (("shape", SHAPES), ("colour", COLOURS), ("pattern", PATTERNS),
                                 ("background", BACKGROUNDS)):
                v = world[key] if world[key] is not None else {"pattern": "plain"}.get(key)
                if v is None and not (key == "background" and photos):
                    raise ConfigError(f"{where}: a world concept needs shape, colour and "
                                      f"background ({key} missing)")
                if v is not None and v not in allowed:
                    raise ConfigError(f"{where}: {key} {v!r} is not one of {', '.join(allowed)}")
                world[key] = v
        elif not photos:
            raise ConfigError(f"{where}: give either \"photos\" (a folder of images) or the "
                              "world attributes shape/colour/pattern/background")
        if photos:
            p = Path(photos)
            p = p if p.is_absolute() else (path.parent / p)
            if not p.is_dir():
                raise ConfigError(f"{where}: photos folder not found: {p}")
            photos = p.resolve()
        class_word = str(item.get("class_word") or world.get("shape") or "").strip()
        if not class_word or " " in class_word:
            raise ConfigError(f"{where}: class_word must be one word (e.g. \"cat\")")
        out.append(EvalConcept(name, class_word, photos, world["shape"], world["colour"],
                           world["pattern"], world["background"]))
    names = [c.name.lower() for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--concepts {path}: name(s) used twice: {', '.join(dup)}")
    return out


def parse_template(template: str, known: dict, where: str) -> tuple[str, ...]:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where}: the prompt is empty")
    if template.count("{") != template.count("}"):
        raise ConfigError(f"{where}: unbalanced braces in {template!r}")
    refs = tuple(r.strip() for r in REF_RE.findall(template))
    if not 1 <= len(refs) <= 2:
        raise ConfigError(f"{where}: {template!r} names {len(refs)} concepts; name one "
                          "({name} + known objects) or two ({a} and {b}) in braces")
    missing = [r for r in refs if r not in known]
    if missing:
        raise ConfigError(f"{where}: unknown concept {missing[0]!r} in {template!r}; known: "
                          f"{', '.join(known)}")
    if len(set(refs)) != len(refs):
        raise ConfigError(f"{where}: {template!r} names the same concept twice")
    return refs


def drop_repeated_class_words(template: str, known: dict) -> str:
    """Accept both "a {c}" and "a {c} star" (c a star): `{c}` already renders as "<tok> star", so
    a class word written after it would be doubled ("<tok> star star")."""
    def sub(m):
        return "{" + m.group(1) + "}"

    for name, c in known.items():
        pat = re.compile(r"\{(" + re.escape(name) + r")\}\s+" + re.escape(c.class_word) + r"\b",
                         re.IGNORECASE)
        template = pat.sub(sub, template)
    return template


def read_prompts(path: str | Path, concepts: list[EvalConcept]) -> list[Prompt]:
    path = Path(path)
    known = {c.name: c for c in concepts}
    out = []
    for i, item in enumerate(_read_items(path, "prompts"), 1):
        where = f"--prompts {path} entry {i}"
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or "prompt" not in item:
            raise ConfigError(f"{where}: expected a string or an object with \"prompt\" "
                              '(e.g. {"prompt": "a {my-heart} and a blue circle on grass"})')
        unknown = set(item) - {"prompt", "detect", "id"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        template = " ".join(str(item["prompt"]).split())
        refs = parse_template(item["prompt"], known, where)
        template = REF_RE.sub(lambda m: "{" + m.group(1).strip() + "}", template)
        template = drop_repeated_class_words(template, known)
        detect = item.get("detect") or ()
        if isinstance(detect, str):
            detect = (detect,)
        if not all(isinstance(d, str) and d.strip() for d in detect):
            raise ConfigError(f"{where}: \"detect\" must be a label or a list of labels")
        pid = str(item.get("id", "")).strip()
        if pid and not re.match(r"^[A-Za-z0-9_.-]{1,60}$", pid):
            raise ConfigError(f"{where}: id {pid!r} must be 1-60 characters A-Z, a-z, 0-9, _ . -")
        out.append(Prompt(template, refs, tuple(d.strip() for d in detect), pid))
    ids = [p.id for p in out if p.id]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--prompts {path}: an id is used twice")
    return _with_ids(out)


def build_protocol(quick: bool, concepts_file=None, prompts_file=None, world: bool = True,
                   random: int = 0, random_seed: int = 0, objects: int | None = None,
                   methods: tuple[Method, ...] = METHODS) -> Protocol:
    """Defaults, or the user's files (prompts default to each concept alone, with known objects
    and in pairs), plus `random` concepts drawn from the world's attribute space."""
    per_concept = objects if objects is not None else (2 if quick else 5)
    if concepts_file is None and prompts_file is None and not random and objects is None:
        return replace(default_protocol(quick), methods=methods)
    concepts = (read_concepts(concepts_file) if concepts_file is not None
                else list(default_protocol(quick).concepts))
    if random:
        drawn = [c for c in random_concepts(random, random_seed)
                 if c.name.lower() not in {k.name.lower() for k in concepts}]
        concepts = concepts + drawn
    if prompts_file is not None:
        prompts = read_prompts(prompts_file, concepts)
    else:
        prompts = default_prompts(concepts, per_concept, world=world and all(
            c.is_world for c in concepts), pairs=len(concepts) > 1)
    used = {n for p in prompts for n in p.concepts}
    return Protocol(tuple(c for c in concepts if c.name in used), tuple(prompts), methods)
