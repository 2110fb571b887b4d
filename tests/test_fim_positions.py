"""UTF-16 LSP positions <-> Python string offsets (fim/positions.py)."""
from __future__ import annotations

import random
import time

import pytest
from lsprotocol import types as lsp
from pygls.workspace import TextDocument

from fim.positions import (
    LineIndex,
    index_to_utf16,
    line_ending,
    normalize_line_endings,
    offset_at,
    position_at,
    utf16_length,
    utf16_to_index,
)

EMOJI = "\U0001F600"  # 😀, two UTF-16 units
ASTRAL_CJK = "\U00020000"  # 𠀀 (CJK Extension B), two UTF-16 units
FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # ZWJ sequence: 3 astral + 2 BMP


def units(s: str) -> int:
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def all_positions(text: str):
    """Every valid (line, character, offset) of `text`, computed independently of fim."""
    import re

    line = 0
    start = 0
    for match in [*re.finditer(r"\r\n|\r|\n", text), None]:
        end = match.start() if match else len(text)
        content = text[start:end]
        for i in range(len(content) + 1):
            yield line, units(content[:i]), start + i
        if match is None:
            return
        line += 1
        start = match.end()


MIXED = (
    f"def greet():  # {EMOJI} hi\r\n"
    f"    return '中文{EMOJI}{ASTRAL_CJK}'\n"
    "\r"
    f"x = '{FAMILY}'\r\n"
    "last line without break"
)


class TestUtf16Length:
    @pytest.mark.parametrize(
        "text, expected",
        [("", 0), ("abc", 3), ("中文", 2), (EMOJI, 2), (ASTRAL_CJK, 2), (FAMILY, 8), ("é", 1), ("a\u0301", 2)],
    )
    def test_known_lengths(self, text, expected):
        assert utf16_length(text) == expected

    def test_matches_utf16_encoding_on_random_text(self):
        rng = random.Random(7)
        alphabet = ["a", " ", "\t", "中", "é", EMOJI, ASTRAL_CJK, "\u200d", "\U0010FFFF", "\uffff"]
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
            assert utf16_length(text) == units(text)

    def test_lone_surrogate_counts_one_unit(self):
        assert utf16_length("a\ud800b") == 3
        assert utf16_length("\udc00") == 1


class TestLineColumn:
    def test_every_position_round_trips(self):
        index = LineIndex.of(MIXED)
        seen = 0
        for line, character, offset in all_positions(MIXED):
            assert index.offset_at(line, character) == offset, (line, character)
            assert index.position_at(offset) == (line, character), offset
            seen += 1
        assert seen > 60

    @pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
    def test_every_position_round_trips_with_one_line_ending(self, eol):
        text = normalize_line_endings(MIXED).replace("\n", eol)
        index = LineIndex.of(text)
        for line, character, offset in all_positions(text):
            assert offset_at(text, line, character) == index.offset_at(line, character) == offset
            assert position_at(text, offset) == index.position_at(offset) == (line, character)

    def test_agrees_with_pygls_document(self):
        # pygls's TextDocument is what the server holds; our conversion must agree
        # with it on every valid position of a document with "\n" and "\r\n".
        text = MIXED.replace("\n\r", "\n\n")
        document = TextDocument("file:///mixed.py", text)
        for line, character, offset in all_positions(text):
            pos = lsp.Position(line=line, character=character)
            assert offset_at(text, line, character) == document.offset_at_position(pos) == offset

    def test_emoji_columns(self):
        text = f"a{EMOJI}b"
        assert offset_at(text, 0, 0) == 0
        assert offset_at(text, 0, 1) == 1  # before the emoji
        assert offset_at(text, 0, 3) == 2  # after the emoji (two units)
        assert offset_at(text, 0, 4) == 3
        assert position_at(text, 2) == (0, 3)
        assert position_at(text, 3) == (0, 4)

    def test_cjk_in_bmp_is_one_unit_each(self):
        text = "x = '中文字'"
        assert offset_at(text, 0, 6) == 6
        assert position_at(text, 8) == (0, 8)

    def test_character_inside_surrogate_pair_snaps_to_pair_start(self):
        text = f"ab{EMOJI}{EMOJI}c"
        assert offset_at(text, 0, 3) == 2  # between the halves of the first emoji
        assert offset_at(text, 0, 5) == 3  # between the halves of the second emoji
        assert utf16_to_index(ASTRAL_CJK, 1) == 0

    def test_zwj_sequence(self):
        text = FAMILY + "!"
        assert offset_at(text, 0, 8) == 5
        assert offset_at(text, 0, 9) == 6
        assert position_at(text, 5) == (0, 8)

    @pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
    def test_each_line_ending_starts_a_line(self, eol):
        text = eol.join(["one", "two", "", "four"])
        assert LineIndex.of(text).line_count == 4
        assert offset_at(text, 1, 0) == 3 + len(eol)
        assert offset_at(text, 3, 2) == len(text) - 2
        assert position_at(text, len(text)) == (3, 4)

    def test_end_of_crlf_line_is_before_the_carriage_return(self):
        text = "ab\r\ncd"
        assert offset_at(text, 0, 99) == 2
        assert text[offset_at(text, 0, 99):].startswith("\r\n")

    def test_offset_between_cr_and_lf_maps_to_end_of_line(self):
        assert position_at("ab\r\ncd", 3) == (0, 2)

    def test_trailing_line_break_makes_an_empty_last_line(self):
        assert LineIndex.of("a\n").line_count == 2
        assert offset_at("a\n", 1, 0) == 2
        assert position_at("a\n", 2) == (1, 0)

    def test_only_lsp_line_endings_split_lines(self):
        # str.splitlines would split at these; LSP does not.
        text = "a\u2028b\x0cc\x85d\ne"
        assert LineIndex.of(text).line_count == 2
        assert offset_at(text, 1, 0) == len(text) - 1
        assert position_at(text, 7) == (0, 7)


class TestClamping:
    TEXT = "first\r\nsecond 中\nthird" + EMOJI

    @pytest.mark.parametrize(
        "line, character, expected",
        [
            (-1, 0, 0),
            (-5, -5, 0),
            (0, -3, 0),
            (0, 999, 5),  # end of "first", before "\r\n"
            (1, 999, 7 + len("second 中")),
            (2, 999, len(TEXT)),
            (3, 0, len(TEXT)),  # line past the end: end of document
            (10**9, 10**9, len(TEXT)),
        ],
    )
    def test_out_of_range_positions_clamp(self, line, character, expected):
        assert offset_at(self.TEXT, line, character) == expected

    def test_out_of_range_offsets_clamp(self):
        assert position_at(self.TEXT, -10) == (0, 0)
        assert position_at(self.TEXT, 10**9) == (2, 7)

    def test_empty_document(self):
        assert offset_at("", 0, 0) == 0
        assert offset_at("", 5, 5) == 0
        assert position_at("", 3) == (0, 0)
        assert LineIndex.of("").line_count == 1

    def test_index_to_utf16_clamps(self):
        assert index_to_utf16("ab", -1) == 0
        assert index_to_utf16(f"a{EMOJI}", 10) == 3


class TestBadText:
    def test_lone_surrogates_do_not_crash(self):
        text = "a\ud83d\nb\udc00c\n\ud800"
        for line in range(4):
            for character in range(5):
                offset = offset_at(text, line, character)
                assert 0 <= offset <= len(text)
        assert offset_at(text, 1, 2) == 5  # "b", lone surrogate: one unit each
        assert position_at(text, len(text)) == (2, 1)

    def test_control_characters_and_nul_are_ordinary_characters(self):
        text = "a\x00b\x1b[0m\x7f\nz"
        assert offset_at(text, 0, 3) == 3
        assert offset_at(text, 1, 1) == len(text)
        assert position_at(text, 2) == (0, 2)

    def test_megabyte_line_is_fast(self):
        line = ("x = 1; " * 150_000) + EMOJI + "end"
        start = time.perf_counter()
        assert offset_at(line, 0, utf16_length(line)) == len(line)
        assert position_at(line, len(line) - 1) == (0, utf16_length(line) - 1)
        assert time.perf_counter() - start < 2.0


def test_line_ending_and_normalisation():
    assert line_ending("a\r\nb\nc") == "\r\n"
    assert line_ending("a\rb") == "\r"
    assert line_ending("abc") == "\n"
    assert normalize_line_endings("a\r\nb\rc\nd\r") == "a\nb\nc\nd\n"
    assert normalize_line_endings("\r\r\n") == "\n\n"
