"""The WebUI prompt syntax: attention parsing, chunking with BREAK and comma backtracking, "Original" emphasis.

Expected weights are the WebUI's documented semantics written out; token ids come from transformers' CLIPTokenizer
(test-only) plus a few literal ids.
"""

from __future__ import annotations

import pytest
import torch

from lora_trainer.models.prompt import (
    PromptChunks,
    apply_emphasis,
    parse_prompt_attention,
    prompt_problems,
    tokenize_prompt,
)
from lora_trainer.models.tokenizer import CLIPTokenizer
from test_tokenizer import reference_ids

BOS, EOS, COMMA = 49406, 49407, 267
D = 1 / 1.1  # one [ ]

PARSES = [
    ("a photo of a cat", [("a photo of a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("masterpiece, best quality", [("masterpiece, best quality", 1.0)]),
    ("(masterpiece)", [("masterpiece", 1.1)]),
    ("((masterpiece))", [("masterpiece", 1.21)]),
    ("(((masterpiece)))", [("masterpiece", 1.331)]),
    ("[blurry]", [("blurry", D)]),
    ("[[blurry]]", [("blurry", D * D)]),
    ("(masterpiece:1.3)", [("masterpiece", 1.3)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("((a:1.5))", [("a", 1.65)]),
    ("[(a:1.5)]", [("a", 1.5 * D)]),
    ("(a:+.5) (b:-1) (c:2.)", [("a", 0.5), (" ", 1.0), ("b", -1.0), (" ", 1.0), ("c", 2.0)]),
    (
        "(masterpiece),(best quality),(ultra-detailed), (full body:1.2), 1boy,chibi,cute, smile, flower, outdoors, "
        "playing guitar, jacket, blush, shirt",
        [
            ("masterpiece", 1.1),
            (",", 1.0),
            ("best quality", 1.1),
            (",", 1.0),
            ("ultra-detailed", 1.1),
            (", ", 1.0),
            ("full body", 1.2),
            (", 1boy,chibi,cute, smile, flower, outdoors, playing guitar, jacket, blush, shirt", 1.0),
        ],
    ),
    (
        "EasyNegative, (worst quality, low quality:1.4), (lip, nose, rouge, lipstick:1.4), (jpeg artifacts:1.4), "
        "(1boy, abs, muscular:1.0), greyscale, monochrome",
        [
            ("EasyNegative, ", 1.0),
            ("worst quality, low quality", 1.4),
            (", ", 1.0),
            ("lip, nose, rouge, lipstick", 1.4),
            (", ", 1.0),
            ("jpeg artifacts", 1.4),
            (", 1boy, abs, muscular, greyscale, monochrome", 1.0),  # weight 1.0 merges with its neighbours
        ],
    ),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # the WebUI's own doctest
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    ("a (b [c] (d:1.5)) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.0), (" ", 1.1), ("d", 1.65), (" e", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("\\(escaped\\)", [("(escaped)", 1.0)]),
    ("\\[x\\] \\\\ y", [("[x] \\ y", 1.0)]),
    ("(a\\)b)", [("a)b", 1.1)]),
    ("\\(a:1.2\\)", [("(a:1.2)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("[a:b:0.5]", [("a:b:0.5", D)]),  # prompt editing is plain text to the attention parser
    ("a [cat:dog:0.5] in a field", [("a ", 1.0), ("cat:dog:0.5", D), (" in a field", 1.0)]),
    ("[a|b]", [("a|b", D)]),
    ("(a:b:0.5)", [("a:b", 0.5)]),
    ("(x:abc)", [("x:abc", 1.1)]),
    ("(x: 1.2)", [("x: 1.2", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK\nBREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKfast BREAK", [("BREAKfast", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("break time", [("break time", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("a [b", [("a ", 1.0), ("b", D)]),
    ("((a) b", [("a", 1.21), (" b", 1.1)]),
    (":1.2) x", [(":1.2) x", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # crashes the WebUI; text here
    ("中文提示词，(一个女孩:1.2)，樱花", [("中文提示词，", 1.0), ("一个女孩", 1.2), ("，樱花", 1.0)]),
    ("少女、(桜:1.1)、[夜]", [("少女、", 1.0), ("桜", 1.1), ("、", 1.0), ("夜", D)]),
    ("café (naïve:0.8) résumé", [("café ", 1.0), ("naïve", 0.8), (" résumé", 1.0)]),
    ("a   lot    of   (spaces)", [("a   lot    of   ", 1.0), ("spaces", 1.1)]),
    ("emoji 🐱 (🔥:1.5)", [("emoji 🐱 ", 1.0), ("🔥", 1.5)]),
    ("Tom &amp; (Jerry)", [("Tom &amp; ", 1.0), ("Jerry", 1.1)]),
    ("score_9, score_8_up, (rating_safe)", [("score_9, score_8_up, ", 1.0), ("rating_safe", 1.1)]),
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


def assert_parse(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    assert [w for _, w in actual] == pytest.approx([w for _, w in expected], abs=1e-12)


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[p[0][:40] for p in PARSES])
def test_parse_prompt_attention(text, expected):
    assert_parse(parse_prompt_attention(text), expected)


def content(chunks: PromptChunks, chunk_length: int = 75) -> tuple[list[int], list[float]]:
    """The prompt's own tokens and weights across chunks (tokenized with pad_id=0, so the EOS ends each chunk)."""
    ids, weights = [], []
    for chunk, chunk_weights in zip(chunks.tokens, chunks.weights):
        assert len(chunk) == len(chunk_weights) == chunk_length + 2
        assert chunk[0] == BOS and chunk_weights[0] == 1.0
        end = chunk.index(EOS)
        assert all(t == 0 for t in chunk[end + 1 :]) and all(w == 1.0 for w in chunk_weights[end:])
        ids += chunk[1:end]
        weights += chunk_weights[1:end]
    return ids, weights


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[p[0][:40] for p in PARSES])
def test_tokenize_prompt_ids_and_weights(tok, text, expected):
    """Each run tokenized on its own (as the WebUI does) and every token carries its run's weight."""
    chunks = tokenize_prompt(text, tok, pad_id=0)
    want_ids, want_weights = [], []
    for piece, weight in expected:
        if piece == "BREAK" and weight == -1.0:
            continue
        piece_ids = reference_ids(piece.replace("&amp;", "&"))  # CLIP unescapes HTML; transformers does not
        want_ids += piece_ids
        want_weights += [weight] * len(piece_ids)
    ids, weights = content(chunks)
    assert ids == want_ids
    assert weights == pytest.approx(want_weights, abs=1e-12)


def test_literal_chunk(tok):
    chunks = tokenize_prompt("a (photo:1.2) of a [cat]", tok, pad_id=EOS)
    assert chunks.tokens == [[BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71]
    assert chunks.weights == [[1.0, 1.0, 1.2, 1.0, 1.0, D] + [1.0] * 71]
    assert chunks.token_count == 5


def test_empty_prompt_is_one_padded_chunk(tok):
    sd1 = tokenize_prompt("", tok, pad_id=EOS)
    assert sd1.tokens == [[BOS] + [EOS] * 76] and sd1.weights == [[1.0] * 77] and sd1.token_count == 0
    sd2 = tokenize_prompt("", tok, pad_id=0)
    assert sd2.tokens == [[BOS, EOS] + [0] * 75]


def test_users_prompt_literal(tok):
    text = "(masterpiece),(best quality), (full body:1.2), 1boy"
    chunks = tokenize_prompt(text, tok, pad_id=EOS)
    body = [12066, 267, 949, 3027, 267, 1476, 1774, 267, 272, 1876]
    assert chunks.tokens[0][: len(body) + 2] == [BOS, *body, EOS]
    assert chunks.weights[0][1 : len(body) + 1] == pytest.approx([1.1, 1.0, 1.1, 1.1, 1.0, 1.2, 1.2, 1.0, 1.0, 1.0])


def test_exactly_75_tokens_is_one_chunk(tok):
    chunks = tokenize_prompt(" ".join(["cat"] * 75), tok, pad_id=EOS)
    assert chunks.tokens == [[BOS] + [2368] * 75 + [EOS]] and chunks.token_count == 75
    longer = tokenize_prompt(" ".join(["cat"] * 76), tok, pad_id=EOS)
    assert longer.tokens == [[BOS] + [2368] * 75 + [EOS], [BOS, 2368] + [EOS] * 75]
    assert longer.token_count == 76


def test_comma_backtracking_moves_the_tail_to_the_next_chunk(tok):
    text = "cat " * 70 + ", " + "dog " * 10  # comma at position 70: the four dogs after it fill the chunk
    chunks = tokenize_prompt(text, tok, pad_id=0, comma_padding_backtrack=20)
    assert chunks.tokens[0] == [BOS] + [2368] * 70 + [COMMA, EOS] + [0] * 4
    assert chunks.tokens[1] == [BOS] + [1929] * 10 + [EOS] + [0] * 65
    assert chunks.token_count == 85
    off = tokenize_prompt(text, tok, pad_id=0, comma_padding_backtrack=0)
    assert off.tokens[0] == [BOS] + [2368] * 70 + [COMMA] + [1929] * 4 + [EOS]
    assert off.tokens[1] == [BOS] + [1929] * 6 + [EOS] + [0] * 69


def test_comma_backtracking_limit(tok):
    at_limit = tokenize_prompt("cat " * 55 + "," + " dog" * 25, tok, pad_id=0)  # 75 - 55 = 20: moved
    assert at_limit.tokens[0][1:58] == [2368] * 55 + [COMMA, EOS]
    too_far = tokenize_prompt("cat " * 54 + "," + " dog" * 25, tok, pad_id=0)  # 21 back: not moved
    assert too_far.tokens[0] == [BOS] + [2368] * 54 + [COMMA] + [1929] * 20 + [EOS]


def test_comma_at_chunk_end_starts_next_chunk(tok):
    chunks = tokenize_prompt("cat " * 75 + ", dog", tok, pad_id=0)
    assert chunks.tokens[0] == [BOS] + [2368] * 75 + [EOS]
    assert chunks.tokens[1][:4] == [BOS, COMMA, 1929, EOS]


def test_long_user_prompt_chunks_at_commas(tok):
    text = ", ".join(
        ["(masterpiece), (best quality), (ultra-detailed), (full body:1.2), 1boy, chibi, cute, smile, flower"] * 4
    )
    chunks = tokenize_prompt(text, tok, pad_id=0)
    ids, weights = content(chunks)
    expected = [t for piece, _ in parse_prompt_attention(text) for t in reference_ids(piece)]
    assert ids == expected  # backtracking moves tokens, never drops or adds them
    assert len(chunks.tokens) == 2
    first = chunks.tokens[0]
    assert first[first.index(EOS) - 1] == COMMA  # the first chunk was cut right after a comma
    assert chunks.token_count == 75 + chunks.tokens[1].index(EOS) - 1


def test_break_forces_a_new_chunk(tok):
    chunks = tokenize_prompt("a cat BREAK a dog", tok, pad_id=EOS)
    assert chunks.tokens == [[BOS, 320, 2368] + [EOS] * 74, [BOS, 320, 1929] + [EOS] * 74]
    assert chunks.token_count == 77  # the WebUI counts a broken chunk as 75


def test_break_edge_cases_as_the_webui(tok):
    assert len(tokenize_prompt("a BREAK", tok, pad_id=0).tokens) == 1  # trailing BREAK: nothing left to chunk
    leading = tokenize_prompt("BREAK a", tok, pad_id=0)  # leading BREAK closes an empty first chunk
    assert leading.tokens[0] == [BOS, EOS] + [0] * 75 and leading.tokens[1][:3] == [BOS, 320, EOS]
    inside = tokenize_prompt("(a BREAK b)", tok, pad_id=0)  # the WebUI encodes "break" with weight -1.1
    assert inside.tokens == [[BOS, 320, 2568, 321, EOS] + [0] * 72]
    assert inside.weights[0][1:4] == pytest.approx([1.1, -1.1, 1.1])


def test_chunk_length_parameter(tok):
    chunks = tokenize_prompt("a b c d e", tok, pad_id=0, chunk_length=3)
    assert chunks.tokens == [[BOS, 320, 321, 322, EOS], [BOS, 323, 324, EOS, 0]]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a (cat", ["unbalanced '(' at character 3", "close it with ')'", "'\\('"]),
        ("a [cat", ["unbalanced '[' at character 3", "close it with ']'", "'\\['"]),
        ("a cat)", ["unmatched ')' at character 6", "'\\)'"]),
        ("a cat]", ["unmatched ']' at character 6", "'\\]'"]),
        ("x :1.2)", ["unmatched ')' at character 7", "':1.2)' stays in the prompt as text"]),
        ("(cat:abc)", ["weight 'abc' after the ':' at character 5 is not a number", "(x:1.2)"]),
        ("(cat: 1.2)", ["weight ' 1.2' after the ':' at character 5", "no spaces"]),
        ("(cat:)", ["an empty weight after the ':' at character 5"]),
        ("(cat:1.2.3)", ["weight '1.2.3' at character 6 is not a number"]),
        ("(a BREAK b)", ["BREAK at character 4 is inside brackets", "move it outside"]),
        ("a\\b", ["a lone '\\' at character 2 is dropped", "'\\\\'"]),
        ("([a)]", ["')' at character 4 closes the bracket opened at character 1", "'[' at character 2"]),
        ("a [cat:dog:0.5]", ["'[cat:dog:0.5]' at character 3 looks like the WebUI's prompt editing"]),
        ("a [cat|dog]", ["'[cat|dog]' at character 3 looks like the WebUI's alternation"]),
    ],
)
def test_prompt_problems(text, fragments):
    problems = prompt_problems(text)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0]


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "",
        "(masterpiece), ((best quality)), [blurry], (full body:1.2), (a:b:0.5)",
        "\\(literal\\) \\[x\\] \\\\",
        "a BREAK b",
        "(style: long flowing hair)",  # a colon inside brackets with words after it is left alone
        "EasyNegative, (worst quality, low quality:1.4), (1boy, abs, muscular:1.0), greyscale",
    ],
)
def test_no_problems_in_well_formed_prompts(text):
    assert prompt_problems(text) == []


def test_problems_are_listed_in_order_with_unclosed_last():
    problems = prompt_problems("a) (b [c")
    assert [p.split(" at ")[0] for p in problems] == ["unmatched ')'", "unbalanced '('", "unbalanced '['"]


def test_apply_emphasis_restores_the_mean():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 154, 8, generator=generator) + 0.5
    weights = torch.ones(2, 154)
    weights[0, 3:6] = 1.4
    weights[1, 80:90] = 0.7
    out = apply_emphasis(z, weights)
    for chunk in (slice(0, 77), slice(77, 154)):  # the WebUI restores each chunk's mean across the batch
        assert out[:, chunk].mean().item() == pytest.approx(z[:, chunk].mean().item(), rel=1e-5)
    ratio = out / z
    chunk0 = ratio[0, :77]
    assert torch.allclose(chunk0[3:6], chunk0[:1].expand(3, 8) * 1.4, rtol=1e-4)  # relative weights preserved


def test_apply_emphasis_matches_the_webui_formula_for_one_chunk():
    z = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(1)) + 1.0
    weights = torch.ones(1, 77)
    weights[0, 1:4] = torch.tensor([1.1, 1.21, 0.9])
    scaled = z * weights[..., None]
    expected = scaled * (z.mean() / scaled.mean())
    assert torch.allclose(apply_emphasis(z, weights), expected, rtol=0, atol=1e-6)


def test_apply_emphasis_identity_and_dtype():
    z = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(apply_emphasis(z, torch.ones(1, 77)), z)
    half = apply_emphasis(z.half(), torch.full((1, 77), 1.1))
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        apply_emphasis(torch.zeros(1, 70, 4), torch.ones(1, 70))
    with pytest.raises(ValueError, match="weights"):
        apply_emphasis(torch.zeros(1, 77, 4), torch.ones(2, 77))


def test_extra_network_tags_are_taken_out_of_the_prompt_like_the_webui_does():
    from lora_trainer.models.prompt import split_extra_networks

    text, found = split_extra_networks("a cat <lora:style-000004:0.8:0.5>, (smile:1.2) <hypernet:x:1>")
    assert text == "a cat , (smile:1.2) "
    assert found == [("lora", ["style-000004", "0.8", "0.5"]), ("hypernet", ["x", "1"])]
