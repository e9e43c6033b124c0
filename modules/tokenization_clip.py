"""CLIP's byte-level BPE tokenizer (the OpenAI CLIP vocabulary, 49,408 ids).

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace folded, lower-cased), split with CLIP's regex and
byte-pair encoded. `tokenize` gives the 77-token evaluation layout, `tokenize_captions` the training layout with
`max_words` (design.md §6, §7.1).
"""
import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import ftfy
import regex as re
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"


@lru_cache()
def bytes_to_unicode() -> dict:
    """Reversible map byte -> printable unicode char, so BPE never sees whitespace/control bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _pairs(word: Tuple[str, ...]) -> set:
    return set(zip(word[:-1], word[1:]))


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # captions scraped from the web are often double-escaped
    return re.sub(r"\s+", " ", text.strip()).strip()


def normalize_text(text: str) -> str:
    """The text the tokenizer actually encodes: cleaned, whitespace folded, lower-cased (two names with the same
    normalized text get the same embedding)."""
    return _clean(text).lower()


class SimpleTokenizer:
    def __init__(self, bpe_path: Union[str, Path] = VOCAB_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.pattern = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(self.encoder)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Text -> BPE ids, without the start/end tokens."""
        ids = []
        for token in self.pattern.findall(normalize_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def get_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Evaluation layout: [SOT] + BPE + [EOT], zero-padded.  list[str] -> LongTensor [N, context_length].

    Too-long texts keep their first ``context_length - 1`` tokens and end with EOT (``truncate=True``), or raise.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_id] + tok.encode(text) + [tok.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {text[:60]!r}... has {len(ids)} tokens, more than context_length={context_length}")
            ids = ids[:context_length]
            ids[-1] = tok.eot_id
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def tokenize_captions(texts: Union[str, Sequence[str]], max_words: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training layout (design.md §6): [SOT] + BPE[:max_words-2] + [EOT], zero-padded to ``max_words``.

    Returns input_ids [N, max_words] and attention_mask [N, max_words] (1 on real tokens), both int64.
    """
    if isinstance(texts, str):
        texts = [texts]
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2 (room for SOT and EOT), got {max_words}")
    tok = get_tokenizer()
    input_ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    mask = torch.zeros(len(texts), max_words, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_id] + tok.encode(text)[:max_words - 2] + [tok.eot_id]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask
