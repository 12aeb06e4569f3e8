"""Stable Diffusion 1.5's CLIP tokenizer, rebuilt offline from open-clip-torch's packaged BPE file.

SD1.5 uses OpenAI CLIP's byte-level BPE tokenizer (the ``tokenizer/`` folder of
``openai/clip-vit-large-patch14``). Its vocabulary is not a trained artefact of its own: it is
derived deterministically from the 48,894 BPE merges that OpenAI published
(``bpe_simple_vocab_16e6.txt.gz``), which open-clip-torch ships inside its wheel. Rebuilding it
here lets the toy world carry the *real* tokenizer with no network access, so token ids seen by
tests are the ids a real SD1.5 run sees ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407).

The construction follows OpenAI CLIP's ``SimpleTokenizer.__init__``:
256 byte symbols, the same 256 with the end-of-word marker ``</w>``, one token per merge in file
order, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 tokens.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77  # SD1.5 text encoder positions
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also SD1.5's pad and unk token
# OpenAI's file has a header line, then 49152 - 256 - 2 = 48894 merges are used (the rest unused).
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2's reversible map from bytes to printable unicode characters (same order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def open_clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch package.

    Located with ``find_spec`` so open_clip itself (and torch with it) is not imported.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "open-clip-torch is not installed; it ships the BPE merges file the toy tokenizer is "
            "built from. Install it (`pip install open-clip-torch`) or pass a tokenizer folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open-clip-torch installation; reinstall it.")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """The SD1.5 vocabulary (token -> id) and merges ("a b" strings, in priority order)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : NUM_MERGES + 1])
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"rebuilt CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}; "
                         "the open_clip BPE file is not the one published by OpenAI.")
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write SD1.5's tokenizer folder (vocab.json, merges.txt, configs) to ``out_dir``.

    The files are written by hand rather than by ``save_pretrained`` so the folder has the
    exact layout of ``runwayml/stable-diffusion-v1-5/tokenizer`` (loadable by any transformers
    version) and its bytes do not depend on the installed transformers version.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        **special_tokens,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2, sort_keys=True) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
