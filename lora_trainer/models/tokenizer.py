"""Offline CLIP byte-level BPE tokenizer (the one SD1's CLIP ViT-L, SD2's OpenCLIP ViT-H and SDXL's two encoders share).

Built from the merges file OpenAI published with CLIP (shipped in ``lora_trainer/assets/clip``) so the WebUI extension
needs neither ``transformers`` nor ``regex``/``ftfy`` and no download. Ids equal transformers' ``CLIPTokenizer`` on
ordinary text; the few places where they cannot (all exotic) are listed in :func:`clean_text` and
:meth:`CLIPTokenizer.encode`.
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the 262144 in the file
END_OF_WORD = "</w>"
ASSET = "assets/clip/bpe_simple_vocab_16e6.txt.gz"  # inside the lora_trainer package

# Unicode's White_Space property: what `regex`'s and Oniguruma's \s match. Python's own \s also takes \x1c-\x1f,
# which CLIP (via `regex`) and transformers keep as punctuation tokens, so the set is spelled out.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{re.escape(WHITESPACE)}]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map, so BPE runs on ``str`` free of whitespace/controls.

    Bytes that are already printable Latin-1 map to themselves; the other 68 get the characters from U+0100 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def _unicode_classes() -> tuple[str, str]:
    """Regex class bodies for ``\\p{L}`` and ``\\p{N}``, built from ``unicodedata`` once per process (~0.1 s).

    The stdlib ``re`` has no ``\\p{..}``; ``[^\\W\\d_]`` is close to ``\\p{L}`` but also takes ~1100 numeric characters
    (``²``, ``½``, ``Ⅷ``, ...) that CLIP's pattern treats as ``\\p{N}``, so exact ranges are generated instead.
    """
    letters: list[tuple[int, int]] = []
    numbers: list[tuple[int, int]] = []

    def add(ranges: list[tuple[int, int]], code: int) -> None:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))

    category = unicodedata.category
    for code in range(0x110000):
        major = category(chr(code))[0]
        if major == "L":
            add(letters, code)
        elif major == "N":
            add(numbers, code)

    def body(ranges: list[tuple[int, int]]) -> str:
        return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)

    return body(letters), body(numbers)


@cache
def pretokenize_pattern(ascii_only: bool = False) -> re.Pattern[str]:
    """CLIP's word-splitting pattern, with ``\\p{L}``/``\\p{N}``/``\\s`` spelled out for the stdlib ``re``.

    ``ascii_only``: the same pattern for text without non-ASCII characters, where ``\\p{L}`` is ``A-Za-z`` and
    ``\\p{N}`` is ``0-9``; it spares most captions (and a trainer's start-up) building the full classes.

    CLIP: ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``.
    Its IGNORECASE flag is dropped: the text is lowercased first, as transformers' version also relies on.
    """
    letter, number = ("A-Za-z", "0-9") if ascii_only else _unicode_classes()
    space = re.escape(WHITESPACE)
    return re.compile(
        rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{letter}]+|[{number}]|[^{space}{letter}{number}]+"
    )


def clean_text(text: str) -> str:
    """CLIP's text cleaning: HTML-unescape twice, NFC, collapse whitespace, strip, lowercase.

    CLIP also runs ``ftfy.fix_text`` (mojibake repair, curly -> straight quotes, full-width -> ASCII); that is not
    reproduced (no ftfy at runtime) and transformers' tokenizers-backed ``CLIPTokenizer`` does not do it either, only
    its NFC step, which is kept. Lowercasing is Python's ``str.lower`` as in CLIP (final sigma becomes ``ς``), where
    transformers lowercases character by character (``σ``).
    """
    text = _LONE_SURROGATE.sub("\ufffd", text)  # not UTF-8 encodable: CLIP would crash, Rust strings can't hold them
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text).strip(WHITESPACE)
    return text.lower()


def read_merges(path: Path | str | None = None) -> list[tuple[str, str]]:
    """The first 48894 merges of CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (the shipped asset when ``path`` is None)."""
    if path is None:
        with resources.files("lora_trainer").joinpath(ASSET).open("rb") as raw:
            return _parse_merges(raw)
    with open(path, "rb") as raw:
        return _parse_merges(raw)


def _parse_merges(raw) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with gzip.open(raw, "rt", encoding="utf-8") as lines:
        next(lines)  # "#version: 0.2" header
        for line in lines:
            if len(merges) == MERGE_COUNT:
                break
            first, second = line.rstrip("\n").split(" ")
            merges.append((first, second))
    if len(merges) != MERGE_COUNT:
        raise ValueError(f"CLIP merges file has {len(merges)} merges, expected at least {MERGE_COUNT}")
    return merges


class CLIPTokenizer:
    """CLIP's BPE tokenizer: 256 byte tokens, 256 byte+``</w>`` tokens, 48894 merges, then BOS 49406 and EOS 49407.

    ``encode`` adds no BOS/EOS and never truncates: chunking into 77-token windows is the prompt code's business.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], bpe_cache_size: int = 65536):
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        byte_tokens = list(self._byte_encoder.values())
        words = [t + END_OF_WORD for t in byte_tokens]
        vocab = byte_tokens + words + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
        self._id_to_token = vocab
        self._token_to_id = {token: i for i, token in enumerate(vocab)}
        if len(self._token_to_id) != len(vocab):
            raise ValueError("merges produce duplicate tokens; is this a CLIP merges file?")
        # A merge's rank is its token's id - 512 (merged tokens are unique, checked above), so instead of a dict of
        # 48894 string pairs (~10 MB) one byte per merge records where its token splits.
        self._merge_split = bytes(len(first) for first, _ in merges)
        self._special = {BOS_TOKEN: self._token_to_id[BOS_TOKEN], EOS_TOKEN: self._token_to_id[EOS_TOKEN]}
        self._ascii_pattern = pretokenize_pattern(ascii_only=True)
        self._bpe_cached = lru_cache(maxsize=bpe_cache_size)(self._bpe)

    @classmethod
    def default(cls) -> CLIPTokenizer:
        """The tokenizer from the shipped merges file, built once per process."""
        return _default_tokenizer()

    @classmethod
    def from_merges_file(cls, path: Path | str) -> CLIPTokenizer:
        return cls(read_merges(path))

    @property
    def bos_id(self) -> int:
        return self._special[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._special[EOS_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry such as ``",</w>"``; KeyError if absent."""
        try:
            return self._token_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the CLIP vocabulary") from None

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._id_to_token):
            raise IndexError(f"token id {token_id} is outside the CLIP vocabulary (0..{len(self._id_to_token) - 1})")
        return self._id_to_token[token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS.

        Literal ``<|startoftext|>``/``<|endoftext|>`` (any case, as CLIP lowercases first) become the special ids.
        Where transformers' tokenizers-backed ``CLIPTokenizer`` differs we follow OpenAI's CLIP (and the WebUI's
        ftfy-equipped slow tokenizer): HTML entities are unescaped, a final capital sigma lowercases to ``ς``, and
        upper-case special-token text is still special. Beyond that, characters newer than Python's Unicode
        database and odd runs of bare combining marks (NFC order) may split differently.
        """
        ids: list[int] = []
        text = clean_text(text)
        pattern = self._ascii_pattern if text.isascii() else pretokenize_pattern()
        for word in pattern.findall(text):
            special = self._special.get(word)
            if special is not None:
                ids.append(special)
                continue
            ids.extend(self._bpe_cached("".join(self._byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: each ``</w>`` becomes one space and the result is stripped, as transformers decodes.

        Lossy by nature: case, runs of whitespace and spaces before punctuation are not recorded by CLIP's tokens.
        """
        out = bytearray()
        for token_id in ids:
            token = self.id_to_token(int(token_id))
            if token in self._special:
                out += token.encode("utf-8")
                continue
            word_end = token.endswith(END_OF_WORD)
            body = token[: -len(END_OF_WORD)] if word_end else token
            out += bytes(self._byte_decoder[c] for c in body)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def _rank(self, first: str, second: str) -> int | None:
        """The merge rank of (first, second), or None when CLIP has no such merge."""
        rank = self._token_to_id.get(first + second, -1) - 2 * len(self._byte_encoder)
        if 0 <= rank < len(self._merge_split) and self._merge_split[rank] == len(first):
            return rank
        return None

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge one byte-encoded word by merge rank (lowest first, all occurrences left to right), as CLIP does."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self._rank(*pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._token_to_id[p] for p in parts)


@cache
def _default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(read_merges())
