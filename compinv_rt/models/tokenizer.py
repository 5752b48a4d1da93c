"""The real CLIP tokenizer, built offline from the BPE vocabulary that `open_clip_torch` ships.

No hub download is possible here, so the vocabulary is reconstructed exactly as OpenAI's CLIP
builds it (256 byte symbols, the same with `</w>`, 48,894 merges, two special tokens = 49,408 ids)
and saved in the standard `vocab.json` + `merges.txt` layout that `CLIPTokenizer.from_pretrained`
reads. open_clip is installed with --no-deps and never imported (its import needs torchvision):
only its data file is used.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from compinv_rt.core.errors import ModelError

VOCAB_SIZE = 49408
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # = 48,894, as in CLIP's simple_tokenizer


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the CLIP BPE vocabulary is missing: install open-clip-torch with --no-deps "
            "(`make install` does)"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelError(f"the CLIP BPE vocabulary file is missing: {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a diffusers-style `tokenizer/` folder (vocab.json, merges.txt, configs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def clip_tokenizer():
    """A ready CLIPTokenizer (writes its files to a cache folder once)."""
    from transformers import CLIPTokenizer

    cache = Path.home() / ".cache" / "compinv-rt" / "clip-tokenizer"
    if not (cache / "tokenizer_config.json").is_file():
        write_clip_tokenizer(cache)
    return CLIPTokenizer.from_pretrained(str(cache))
