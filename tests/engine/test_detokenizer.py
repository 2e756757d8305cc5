"""Incremental detokenization against tokenizer.decode of the whole output (the reference)."""

from __future__ import annotations

import random

import pytest

from compiled_serve.detokenizer import IncrementalDetokenizer, decode_token

ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/\n\t"
ACCENTED = "éèêëàâäôöûüçñÉÀÖßøåæœ" + "e\u0301a\u0308"  # precomposed and combining marks
CJK = "世界你好日本語中文字한국어ひらがなカタカナ"
EMOJI = ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖", "🧪", "𝔘"]
OTHER = "Привет мир مرحبا שלום ∑∫≠≤ €£¥"


def random_text(rng: random.Random, pools: list) -> str:
    pieces = []
    for _ in range(rng.randint(1, 40)):
        pool = rng.choice(pools)
        pieces.append(rng.choice(pool) if isinstance(pool, list) else "".join(rng.choices(pool, k=rng.randint(1, 6))))
        if rng.random() < 0.3:
            pieces.append(" ")
    return "".join(pieces)


def stream(tokenizer, prompt, ids, rng=None, **kwargs):
    """Feeds ids one token (or, with rng, a random chunk) at a time; returns (deltas, detok).

    After every call, output_text must be exactly the deltas so far: a RequestOutput built from
    it never shows text that a stop string later cuts away."""
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    deltas, i = [], 0
    while i < len(ids):
        step = rng.randint(1, 4) if rng else 1
        deltas.append(detok.add_tokens(ids[i : i + step]))
        assert detok.output_text == "".join(deltas)
        i += step
    deltas.append(detok.finish())
    assert detok.output_text == "".join(deltas)
    return deltas, detok


CHAT_PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pools", [[ASCII], [ACCENTED, ASCII], [CJK], [EMOJI], [ASCII, ACCENTED, CJK, EMOJI, OTHER]],
                         ids=["ascii", "accented", "cjk", "emoji", "mixed"])
def test_bpe_deltas_concatenate_to_decode(smollm2_tokenizer, pools):
    tok = smollm2_tokenizer
    rng = random.Random(hash(tuple(map(str, pools))) % 1000)
    prompt = tok.encode(CHAT_PROMPT, add_special_tokens=False)
    for trial in range(25):
        text = random_text(rng, pools)
        ids = tok.encode(text, add_special_tokens=False)
        reference = tok.decode(ids, skip_special_tokens=True)
        deltas, detok = stream(tok, prompt if trial % 2 else [], ids, rng=rng if trial % 3 == 0 else None)
        assert "".join(deltas) == reference == detok.output_text
        assert reference == text  # byte-level BPE round-trips exactly
        assert not any("\ufffd" in d for d in deltas), deltas


def test_emoji_split_into_byte_tokens_never_yield_replacement_char(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Party 🎉🎉 time 👨‍👩‍👧 with 👍🏽 and 🇫🇷!"
    ids = tok.encode(text, add_special_tokens=False)
    # The premise: several tokens hold only part of a character's bytes.
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 4
    deltas, _ = stream(tok, [], ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some steps had to wait for the rest of a character


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_ids_match_decode(smollm2_tokenizer, skip_special_tokens):
    tok = smollm2_tokenizer
    rng = random.Random(5 + skip_special_tokens)
    vocab = len(tok)
    for trial in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        if trial % 4 == 0:  # sprinkle in special tokens
            ids[rng.randrange(len(ids))] = rng.choice(tok.all_special_ids)
        deltas, _ = stream(tok, [], ids, rng=rng if trial % 2 else None, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens), ids
        # A running delta never ends inside a character (only finish() may flush broken bytes).
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])


def test_special_tokens_skipped_or_kept(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hi<|im_end|> there<|im_start|>", add_special_tokens=False)
    for skip in (True, False):
        deltas, _ = stream(tok, [], ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(tok, [], ids, skip_special_tokens=False)[0]) == "Hi<|im_end|> there<|im_start|>"
    assert "".join(stream(tok, [], ids, skip_special_tokens=True)[0]) == "Hi there"


def test_decodes_a_small_window_not_the_whole_sequence(smollm2_tokenizer):
    lengths = []

    class Recording:
        def decode(self, ids, skip_special_tokens=False):
            lengths.append(len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "The quick brown fox jumps over the lazy dog. " * 30
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    deltas, _ = stream(Recording(), [1, 2, 3, 4, 5, 6, 7], ids)
    assert "".join(deltas) == text
    assert len(ids) > 300 and max(lengths) <= 8


def test_wordpiece_deltas_concatenate_to_decode(minilm_tokenizer):
    tok = minilm_tokenizer
    rng = random.Random(11)
    words = ["hello", "world", "unaffable", "tokenization", "running", "the", "a", "##", "straße", "naïve",
             "世界", "42", "3.14", ",", ".", "!", "?", "(", ")", "don't", "it's", "e-mail"]
    for trial in range(40):
        text = " ".join(rng.choices(words, k=rng.randint(1, 15)))
        ids = tok.encode(text, add_special_tokens=bool(trial % 2))
        for skip in (True, False):
            prompt = [tok.cls_token_id] if trial % 3 == 0 else []
            deltas, _ = stream(tok, prompt, ids, skip_special_tokens=skip)
            # The output continues the prompt's text (a shown [CLS] is followed by a space).
            full = tok.decode(prompt + ids, skip_special_tokens=skip)
            head = tok.decode(prompt, skip_special_tokens=skip)
            assert full.startswith(head)
            assert "".join(deltas) == full[len(head) :], (text, skip)
            if not prompt:
                assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_output_continues_the_prompt_text(minilm_tokenizer):
    # With a real prompt, the output text is what decoding prompt+output adds after the prompt:
    # WordPiece inserts the word-separating space that decode(output) alone would not have.
    tok = minilm_tokenizer
    prompt = tok.encode("the answer is", add_special_tokens=False)
    ids = tok.encode("unaffable , truly", add_special_tokens=False)
    deltas, _ = stream(tok, prompt, ids)
    full, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert full.startswith(head)
    assert "".join(deltas) == full[len(head) :] == " unaffable, truly"


# ---------------------------------------------------------------- stop strings


def char_by_char_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: scan the text one character at a time; the first stop to complete wins."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def test_stop_string_split_across_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Hello world, the answer is 42. After that more text follows."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "answer is 4"
    # The premise: no single token contains the whole stop string.
    assert not any(stop in tok.decode([i]) for i in ids)
    for include in (False, True):
        deltas, detok = stream(tok, [], ids, stop=[stop], include_stop_str_in_output=include)
        expected = "Hello world, the answer is 4" if include else "Hello world, the "
        assert "".join(deltas) == expected == detok.output_text
        assert detok.stop_hit == stop


def test_random_stops_match_char_by_char_reference(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rng = random.Random(3)
    for trial in range(60):
        text = random_text(rng, [ASCII, ACCENTED, CJK, EMOJI])
        ids = tok.encode(text, add_special_tokens=False)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7 and len(text) > 2:
                start = rng.randrange(len(text) - 1)
                stops.append(text[start : start + rng.randint(1, 6)])
            else:
                stops.append("".join(rng.choices("xyz🎉", k=rng.randint(1, 3))))
        include = bool(trial % 2)
        expected, expected_stop = char_by_char_stop(text, stops, include)
        deltas, detok = stream(tok, [], ids, rng=rng if trial % 3 == 0 else None, stop=stops,
                               include_stop_str_in_output=include)
        assert "".join(deltas) == expected, (text, stops)
        assert detok.stop_hit == expected_stop
        assert not any("\ufffd" in d for d in deltas)


def test_partial_stop_prefix_is_held_back_then_released(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stop = "STOP!"
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    pieces = ["Wait", " ST", "OP", " no", " more", " STOP", "!", " tail"]
    emitted = ""
    for i, piece in enumerate(pieces):
        ids = tok.encode(piece, add_special_tokens=False)
        emitted += detok.add_tokens(ids)
        if i == 2:  # "Wait STOP": every suffix that may begin "STOP!" is held, from output_text too
            assert emitted == "Wait " == detok.output_text
        if i == 3:  # " no" shows it was not the stop string
            assert emitted == "Wait STOP no"
    assert detok.stop_hit == stop
    assert emitted == "Wait STOP no more "
    assert detok.add_tokens(tok.encode(" ignored", add_special_tokens=False)) == ""
    assert detok.finish() == ""
    assert detok.output_text == "Wait STOP no more "


def test_finish_flushes_held_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    detok = IncrementalDetokenizer(tok, [], stop=["<END>"])
    emitted = detok.add_tokens(tok.encode("almost <EN", add_special_tokens=False))
    assert emitted == "almost " == detok.output_text
    assert detok.finish() == "<EN"
    assert detok.output_text == "almost <EN"
    assert detok.stop_hit is None


def test_earliest_completing_stop_wins(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("one two three four", add_special_tokens=False)
    # "one two three" starts first but "two" completes first; "hree" later still.
    stops = ["one two three", "hree", "two"]
    deltas, detok = stream(tok, [], ids, stop=stops)
    assert "".join(deltas) == "one " and detok.stop_hit == "two"
    # Arriving in one chunk must not change the winner.
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    assert detok.add_tokens(ids) == "one " and detok.stop_hit == "two"


def test_stop_in_first_token_and_no_stop():
    class CharTokenizer:  # one character per token id: makes the stop arithmetic exact
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    text = "abcabcXYZabc"
    ids = [ord(c) for c in text]
    assert "".join(stream(CharTokenizer(), [], ids, stop=["a"])[0]) == ""
    assert "".join(stream(CharTokenizer(), [], ids, stop=["a"], include_stop_str_in_output=True)[0]) == "a"
    assert "".join(stream(CharTokenizer(), [], ids, stop=["XYZ"])[0]) == "abcabc"
    deltas, detok = stream(CharTokenizer(), [], ids, stop=["abd", "ZZ"])
    assert "".join(deltas) == text and detok.stop_hit is None
    # Held back while it could still be "abd": after "ab", nothing of it is streamed.
    assert deltas[:3] == ["", "", "abc"]


def test_decode_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    hello = tok.encode(" hello", add_special_tokens=False)
    assert len(hello) == 1 and decode_token(tok, hello[0]) == " hello"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert decode_token(tok, eos) == "<|im_end|>"
