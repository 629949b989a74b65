"""The AUTOMATIC1111 WebUI's prompt syntax: attention weights, BREAK, 75-token chunks and "Original" emphasis.

Behaviour follows the WebUI's ``modules/prompt_parser.py`` (``parse_prompt_attention``) and
``modules/sd_hijack_clip.py`` (``tokenize_line``, ``process_tokens``) so a sample image from the trainer sees the same conditioning the WebUI
would build. Out of scope: prompt editing/alternation (``[a:b:0.5]``, ``[a|b]``: handled before this stage in the
WebUI; here they reach the attention parser as plain text), ``AND`` composition and textual-inversion embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0  # the WebUI marks BREAK as ("BREAK", -1)
COMMA_TOKEN = ",</w>"

# One attention token, with the WebUI's precedence: an escape (or a lone backslash), an opening bracket, a ":1.3)"
# weighted close, a closing bracket, a run of plain text, a bare ":".
_ATTENTION = re.compile(r"\\[()\[\]\\]?|[(\[]|:([+-]?[.\d]+)\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


class Tokenizer(Protocol):
    """What prompt chunking needs of a tokenizer (``lora_trainer.models.tokenizer.CLIPTokenizer`` has it)."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def token_to_id(self, token: str) -> int: ...


def _weight(group: str | None) -> float | None:
    """The ``:1.3)`` weight; None when absent or not a float (``1.2.3`` matches the WebUI's regex but crashes it)."""
    if group is None:
        return None
    try:
        return float(group)
    except ValueError:
        return None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs exactly as the WebUI does.

    ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.3)`` ×1.3, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
    literals and a lone ``\\`` is dropped. Unmatched closers stay as text; brackets left open apply to the rest of
    the prompt. ``BREAK`` (a whole word, upper case) gives ``("BREAK", -1.0)``; inside brackets its weight is
    multiplied like any other, which the WebUI then reads as the word "break" (see :func:`prompt_problems`).
    Neighbours with equal weight are merged; an empty prompt gives ``[("", 1.0)]``. The one departure: a weight the
    regex accepts but ``float`` rejects (``(a:1.2.3)``) crashes the WebUI; here it is read as the text ``:1.2.3``.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for m in _ATTENTION.finditer(text):
        token = m.group(0)
        weight = _weight(m.group(1))
        if m.group(1) is not None and weight is None:
            res.append([token[:-1], 1.0])  # unparsable weight: ":1.2.3" is text, then ")" closes as usual
            token = ")"
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), weight)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])

    for start in round_brackets:
        multiply_range(start, ROUND_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _is_break(text: str, weight: float) -> bool:
    return text == "BREAK" and weight == BREAK_WEIGHT


def prompt_problems(text: str) -> list[str]:
    """One sentence per likely mistake in the WebUI syntax of ``text``, for callers to print as warnings.

    The parse itself never fails (as in the WebUI); this says where it will not do what the user probably meant:
    unbalanced or crossed brackets, a ``(x:abc)`` weight that is not a number, ``BREAK`` inside brackets, a lone
    ``\\``, and prompt editing/alternation (not supported here). Positions are 1-based character numbers.
    """
    problems: list[str] = []
    round_open: list[int] = []  # 0-based offsets of the '(' / '[' still open, as the WebUI's two stacks
    square_open: list[int] = []
    previous: list[re.Match[str]] = []

    for m in _ATTENTION.finditer(text):
        token, at = m.group(0), m.start() + 1
        closes_round = token == ")" or m.group(1) is not None
        if token == "\\":
            problems.append(
                f"a lone '\\' at character {at} is dropped; write '\\\\' for a literal backslash "
                f"or '\\(' '\\)' '\\[' '\\]' for literal brackets"
            )
        elif token == "(":
            round_open.append(m.start())
        elif token == "[":
            square_open.append(m.start())
        elif closes_round:
            close_at = m.end()  # the ')' is the token's last character
            if not round_open:
                problems.append(
                    f"unmatched ')' at character {close_at}: no '(' is open, so '{token}' stays in the prompt as "
                    f"text; remove it or write '\\)' for a literal bracket"
                )
            else:
                problems.extend(_crossed(")", close_at, round_open.pop(), square_open, "["))
                if token == ")":
                    problems.extend(_bad_weight(previous))
                elif _weight(m.group(1)) is None:
                    problems.append(
                        f"weight '{m.group(1)}' at character {at + 1} is not a number (the WebUI fails on it); it is "
                        f"kept as text and the bracket uses the default 1.1; write a number such as (x:1.2)"
                    )
        elif token == "]":
            if not square_open:
                problems.append(
                    f"unmatched ']' at character {at}: no '[' is open, so it stays in the prompt as text; "
                    f"remove it or write '\\]' for a literal bracket"
                )
            else:
                opened_at = square_open.pop()
                problems.extend(_crossed("]", at, opened_at, round_open, "("))
                problems.extend(_prompt_editing(text, opened_at, m.start()))
        elif _is_text(m) and (round_open or square_open):
            for found in _BREAK.finditer(token):
                word_at = m.start() + found.start() + found.group(0).index("BREAK") + 1
                problems.append(
                    f"BREAK at character {word_at} is inside brackets, so the WebUI weights it like text and "
                    f"encodes the word 'break' instead of starting a new chunk; move it outside the brackets"
                )
        previous.append(m)

    for opened_at in round_open:
        problems.append(
            f"unbalanced '(' at character {opened_at + 1}: nothing closes it, so everything after it gets "
            f"weight ×1.1; close it with ')' or write '\\(' for a literal bracket"
        )
    for opened_at in square_open:
        problems.append(
            f"unbalanced '[' at character {opened_at + 1}: nothing closes it, so everything after it gets "
            f"weight ÷1.1; close it with ']' or write '\\[' for a literal bracket"
        )
    return problems


def _crossed(closer: str, close_at: int, opened_at: int, other_open: list[int], other: str) -> list[str]:
    """A bracket closed while one of the other kind opened inside it is still open: ``([a)]``."""
    inner = [p for p in other_open if p > opened_at]
    if not inner:
        return []
    return [
        f"'{closer}' at character {close_at} closes the bracket opened at character {opened_at + 1} while the "
        f"'{other}' at character {inner[-1] + 1} inside it is still open; the WebUI accepts crossed brackets but "
        f"they are rarely meant, so close the inner bracket first"
    ]


def _bad_weight(previous: list[re.Match[str]]) -> list[str]:
    """``(x:abc)``, ``(x: 1.2)``, ``(x:)``: a ':' just before a plain ')' whose tail the WebUI can't read as a weight."""
    if previous and previous[-1].group(0) == ":":
        colon, tail = previous[-1], ""
    elif len(previous) >= 2 and previous[-2].group(0) == ":" and _is_text(previous[-1]):
        colon, tail = previous[-2], previous[-1].group(0)
    else:
        return []
    if not _looks_like_weight(tail):
        return []
    what = f"weight '{tail}'" if tail else "an empty weight"
    return [
        f"{what} after the ':' at character {colon.start() + 1} is not a number, so ':{tail}' stays in the prompt "
        f"as text and the bracket uses the default 1.1; write the weight as a number right before ')' with no "
        f"spaces, such as (x:1.2)"
    ]


def _is_text(m: re.Match[str]) -> bool:
    return m.group(0)[0] not in "\\()[]:"


def _looks_like_weight(tail: str) -> bool:
    """Whether the text after ``:`` was probably meant as a weight: empty, one word, or a number with spaces."""
    stripped = tail.strip()
    return not stripped or len(stripped.split()) == 1 or bool(_NUMBER.match(stripped))


def _prompt_editing(text: str, start: int, end: int) -> Iterator[str]:
    """Warn about ``[a:b:0.5]``/``[a|b]`` inside the square brackets ``text[start:end + 1]`` (no nested brackets)."""
    inner = text[start + 1 : end]
    if any(c in inner for c in "()[]\\"):
        return
    if "|" in inner:
        yield (
            f"'[{inner}]' at character {start + 1} looks like the WebUI's alternation, which is not supported here: "
            f"it is read as the text '{inner}' with weight ÷1.1"
        )
    elif ":" in inner and _NUMBER.fullmatch(inner.rsplit(":", 1)[1].strip()):
        yield (
            f"'[{inner}]' at character {start + 1} looks like the WebUI's prompt editing, which is not supported here: "
            f"it is read as the text '{inner}' with weight ÷1.1"
        )


@dataclass
class PromptChunks:
    """A prompt as the text encoder sees it: chunks of BOS + ``chunk_length`` tokens + EOS, each with its weights.

    ``token_count`` is the WebUI's count (what its "75/150" counter shows): full chunks count ``chunk_length``,
    the last counts its real tokens.
    """

    tokens: list[list[int]]
    weights: list[list[float]]
    token_count: int


def tokenize_prompt(
    text: str,
    tokenizer: Tokenizer,
    pad_id: int,
    chunk_length: int = 75,
    comma_padding_backtrack: int = 20,
) -> PromptChunks:
    """The WebUI's ``tokenize_line``: parse the syntax, tokenize each run, cut into chunks of ``chunk_length``.

    Each chunk is ``[BOS] + tokens + [EOS] + [pad_id]*`` (length ``chunk_length + 2``, weight 1.0 outside the
    prompt's tokens). SD1/SDXL pad with EOS (the WebUI's ``id_pad = id_end``), SD2's OpenCLIP with 0, hence
    ``pad_id``. ``BREAK`` starts a new chunk; when a chunk fills up and a comma was within the last
    ``comma_padding_backtrack`` tokens, the tokens after that comma move to the next chunk (0 turns this off).
    An empty prompt gives one chunk. Textual-inversion embeddings are not looked up: their names are just text.
    """
    comma = tokenizer.token_to_id(COMMA_TOKEN)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    chunks_tokens: list[list[int]] = []
    chunks_weights: list[list[float]] = []
    tokens: list[int] = []
    weights: list[float] = []
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal tokens, weights, token_count, last_comma
        token_count += len(tokens) if is_last else chunk_length
        padding = chunk_length - len(tokens)
        chunks_tokens.append([bos, *tokens, eos, *[pad_id] * padding])
        chunks_weights.append([1.0, *weights, 1.0, *[1.0] * padding])
        tokens, weights, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if _is_break(piece, weight):
            next_chunk()
            continue
        for token in tokenizer.encode(piece):
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_padding_backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= comma_padding_backtrack
            ):
                split = last_comma + 1
                moved_tokens, moved_weights = tokens[split:], weights[split:]
                tokens, weights = tokens[:split], weights[:split]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)

    if tokens or not chunks_tokens:
        next_chunk(is_last=True)
    return PromptChunks(chunks_tokens, chunks_weights, token_count)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, chunk_size: int = 77) -> torch.Tensor:
    """The WebUI's "Original" emphasis: scale each token state by its weight, then restore the mean.

    ``z`` is ``[B, chunk_size·n, C]``, ``weights`` ``[B, chunk_size·n]``. The WebUI does this once per 77-token chunk
    (``process_tokens`` runs per chunk, across the batch), so the mean of each chunk's ``[B, 77, C]`` slice is what is
    restored; for one chunk that is the whole tensor. Computed in at least float32, returned in ``z``'s dtype.
    """
    if z.ndim != 3 or weights.shape != z.shape[:2]:
        shapes = f"{tuple(z.shape)} and {tuple(weights.shape)}"
        raise ValueError(f"emphasis needs z [B, T, C] and weights [B, T], got {shapes}")
    batch, length, channels = z.shape
    if length % chunk_size:
        raise ValueError(f"token axis {length} is not a multiple of the chunk size {chunk_size}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    states = z.to(dtype).reshape(batch, length // chunk_size, chunk_size, channels)
    scale = weights.to(device=z.device, dtype=dtype).reshape(batch, length // chunk_size, chunk_size, 1)
    original_mean = states.mean(dim=(0, 2, 3), keepdim=True)
    states = states * scale
    new_mean = states.mean(dim=(0, 2, 3), keepdim=True)
    states = states * (original_mean / new_mean)
    return states.reshape(batch, length, channels).to(z.dtype)


EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def split_extra_networks(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The WebUI's extra-network tags (``<lora:name:0.8>``) out of a prompt: (prompt without them, [(kind, args)])."""
    found = [(m.group(1), m.group(2).split(":")) for m in EXTRA_NETWORK.finditer(text)]
    return EXTRA_NETWORK.sub("", text), found
