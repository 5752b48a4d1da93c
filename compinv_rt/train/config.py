"""`TrainConfig`: every training setting in one frozen dataclass, stored with checkpoints/artifacts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from compinv_rt.core.errors import ConfigError

# Fields that change what a training step computes: a checkpoint may only be resumed under the
# same values (`steps` and `checkpoint_every` may change on resume).
RESUME_KEYS = ("token", "class_word", "init_word", "anchors", "anchor_weight", "recon_weight",
               "anchor_l1", "vectors", "batch", "grad_accum", "lr", "scale_lr", "coef_lr",
               "weight_decay", "resolution", "augment", "variants", "seed", "templates",
               "captions", "masks", "context_token", "norm", "context_weight")

_AUTO = re.compile(r"^auto:(\d+)$")
MAX_AUTO_ANCHORS = 64
#: The highest --lr (before scaling by batch x grad-accum): far above any that trains (the
#: default is 5e-3); 1e6 only diverged after the model had loaded, leaving checkpoints behind.
LR_MAX = 10.0
#: The longest placeholder token: it names files (`<name>.pt`, a1111) and appears in every prompt.
MAX_TOKEN_CHARS = 64
#: Bounds of `--norm X` and of K in `--norm vocab:K`. A vocabulary word's norm is ~0.4 in SD's
#: CLIP and plain TI drives a token to 5-8x that: 1e-3 is already a near-silent token (1e-30 saved
#: an all-zero embedding), 100 one that drowns every other word.
NORM_MIN, NORM_MAX = 1e-3, 100.0


#: The norm constraint `--norm auto` applies to plain TI (no anchor): 2x the vocabulary's median
#: word norm, the measured best on random concepts (benchmarks/train.md section 3).
NORM_FOR_TI = "vocab:2"


@dataclass(frozen=True)
class TrainConfig:
    token: str  # placeholder, e.g. "<my-heart>"
    class_word: str  # e.g. "heart": prompts read "... <my-heart> heart"
    init_word: str | None = None  # None: the class word
    anchors: str | None = None  # "w1,w2" | "auto:K" | None (the class word)
    anchor_weight: float = 0.95
    recon_weight: float = 0.05
    anchor_l1: float = 0.05  # sparsity of the K-anchor coefficients (relative, see anchors.py)
    vectors: int = 1
    steps: int = 1000
    batch: int = 4
    grad_accum: int = 1
    lr: float = 5e-3
    scale_lr: bool = True  # effective lr = lr x batch x grad_accum (the reference's convention)
    coef_lr: float = 1e-2  # Adam lr of the anchor coefficients (K >= 2)
    weight_decay: float = 1e-2  # on the placeholder vectors only
    resolution: int | None = None  # None: the model's native size
    augment: bool = True  # hflip + scale augmentation (shrink/paste with mask, or zoom)
    variants: int = 8  # augmented variants per image, encoded once
    seed: int = 0
    checkpoint_every: int = 100
    templates: tuple[str, ...] | None = None  # None: DEFAULT_TEMPLATES
    # What the photos show besides the concept (train/data.py): per-photo context phrases named in
    # the prompts ("auto": the folder's captions.json or <photo>.txt, "none", or a JSON file),
    # subject masks weighting the loss (a folder, or None), and an auxiliary context token
    # appended to every training prompt, trained jointly and never saved (for photos without
    # captions: it takes up what the photos share besides the concept).
    captions: str = "auto"
    masks: str | None = None
    context_token: bool = False
    # Against dominance (train/regularizers.py): "none" | "vocab" | "vocab:K" | a number (fixed
    # vector norm),
    # and the weight of the context regularizer (0 = off).
    norm: str = "auto"  # auto: NORM_FOR_TI without an anchor (measured: benchmarks/train.md
    # section 3, it keeps the other object), none with semantic inversion (the paper's recipe)
    context_weight: float = 0.0

    def __post_init__(self):
        checks = [
            (self.vectors >= 1, f"--vectors must be >= 1, got {self.vectors}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (0 < self.lr <= LR_MAX, f"--lr must be in (0, {LR_MAX:g}], got {self.lr}"),
            (self.anchor_weight >= 0, f"--anchor-weight must be >= 0, got {self.anchor_weight}"),
            (self.recon_weight > 0, f"--recon-weight must be > 0, got {self.recon_weight}"),
            (self.anchor_l1 >= 0, f"--anchor-l1 must be >= 0, got {self.anchor_l1}"),
            (self.variants >= 1, f"--variants must be >= 1, got {self.variants}"),
            (self.checkpoint_every >= 1,
             f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.context_weight >= 0,
             f"--context-weight must be >= 0, got {self.context_weight}"),
            (self.resolution is None or self.resolution > 0,
             f"--resolution must be > 0, got {self.resolution}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        from compinv_rt.core.schemas import check_option

        check_option("--variants", self.variants, limit="max_variants")
        check_option("--grad-accum", self.grad_accum, limit="max_grad_accum")
        check_token_name(self.token)
        if not self.class_word.strip():
            raise ConfigError("--class-word is empty")
        if self.templates is not None:
            if not self.templates or any(t.count("{}") != 1 for t in self.templates):
                raise ConfigError("every template needs exactly one {} (where the concept goes)")
        parse_anchor_spec(self.anchors)  # raises on a bad spec
        try:
            parse_norm(self.norm_spec)
        except ValueError:
            raise ConfigError(f"bad --norm {self.norm!r}: expected auto, none, vocab, vocab:K (K "
                              "times the vocabulary's norm) or a number X, K and X between "
                              f"{NORM_MIN:g} and {NORM_MAX:g}") from None

    @property
    def init(self) -> str:
        return (self.init_word or self.class_word).strip()

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch * self.grad_accum if self.scale_lr else self.lr

    @property
    def context_token_name(self) -> str:
        return f"{self.token}_ctx"

    @property
    def norm_spec(self) -> str:
        """The norm constraint actually applied (`auto` resolved)."""
        if self.norm.strip().lower() != "auto":
            return self.norm
        return "none" if self.anchor_weight > 0 else NORM_FOR_TI

    def as_dict(self) -> dict:
        d = asdict(self)
        d["templates"] = list(self.templates) if self.templates else None
        return d

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        d = {k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__}
        if d.get("templates"):
            d["templates"] = tuple(d["templates"])
        return TrainConfig(**d)


def parse_anchor_spec(spec: str | None) -> tuple[str, Any]:
    """-> ("default", None) | ("auto", K) | ("words", [w, ...]). Raises ConfigError."""
    if spec is None or not spec.strip():
        return "default", None
    s = spec.strip()
    if s.lower().startswith("auto"):
        m = _AUTO.match(s.lower())
        if not m or not 1 <= int(m.group(1)) <= MAX_AUTO_ANCHORS:
            raise ConfigError(
                f"bad --anchors {spec!r}: expected auto:K with K between 1 and {MAX_AUTO_ANCHORS}")
        return "auto", int(m.group(1))
    words = [w.strip() for w in s.split(",")]
    if any(not w for w in words):
        raise ConfigError(f"bad --anchors {spec!r}: an empty word in the list")
    if len(set(words)) != len(words):
        raise ConfigError(f"bad --anchors {spec!r}: a word is repeated")
    return "words", words


def check_token_name(token: str, option: str = "--token") -> None:
    """One printable word without spaces, at most MAX_TOKEN_CHARS characters."""
    if not token.strip() or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(f"{option} must be one printable word without spaces, got {token!r}")
    if len(token) > MAX_TOKEN_CHARS:
        raise ConfigError(f"{option} must be at most {MAX_TOKEN_CHARS} characters, got "
                          f"{len(token)}: {token[:20]!r}...")


def parse_norm(spec: str | None) -> tuple[str, float | None]:
    """"none" | "vocab" | "vocab:K" | a number X -> ("none", None), ("vocab", K: 1 for "vocab")
    or ("fixed", X), with K and X in [NORM_MIN, NORM_MAX]. Raises ValueError."""
    s = (spec or "none").strip().lower()
    if s in ("none", "vocab"):
        return s, (None if s == "none" else 1.0)
    kind, number = ("vocab", s[len("vocab:"):]) if s.startswith("vocab:") else ("fixed", s)
    value = float(number)
    if not NORM_MIN <= value <= NORM_MAX:  # NaN too
        raise ValueError(s)
    return kind, value
