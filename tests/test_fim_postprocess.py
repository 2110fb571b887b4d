"""Post-processing of the denoiser's fill (fim/postprocess.py).

Requests are built by the real `build_request` from source with a "|" cursor, so
each case reads as the editor buffer it stands for.
"""
from __future__ import annotations

import random

import pytest

from fim.context import build_request
from fim.positions import utf16_length
from fim.postprocess import leaves_a_string_open, postprocess
from fim.request import FimRequest, SpanPlan

LANGUAGE_PATHS = {"python": "app.py", "javascript": "app.js", "typescript": "app.ts", "go": "main.go"}


def request_at(source: str, language: str = "python") -> FimRequest:
    offset = source.index("|")
    text = source[:offset] + source[offset + 1 :]
    before = text[:offset]
    line = before.count("\n")
    character = utf16_length(before[before.rfind("\n") + 1 :])
    return build_request(text, line, character, path=LANGUAGE_PATHS[language], language_id=language)


def fill(source: str, raw: str, language: str = "python") -> str | None:
    return postprocess(raw, request_at(source, language))


def applied(source: str, raw: str, language: str = "python") -> str:
    """The buffer after accepting the suggestion."""
    suggestion = fill(source, raw, language)
    assert suggestion is not None
    return source.replace("|", suggestion, 1)


class TestEndOfSpan:
    def test_line_span_stops_at_first_newline_python(self):
        source = "def area(r):\n    return 3.14 * |\n"
        assert fill(source, "r * r\n\ndef volume(r):\n    pass") == "r * r"

    def test_line_span_stops_at_first_newline_js(self):
        source = "const total = items.|\n"
        assert fill(source, "reduce((a, b) => a + b, 0);\nconsole.log(total);", "javascript") == (
            "reduce((a, b) => a + b, 0);"
        )

    def test_line_span_that_starts_with_a_newline_is_nothing(self):
        assert fill("x = compute(|)\n", "\n    y") is None

    def test_block_span_keeps_whole_lines(self):
        source = "def load(path):\n    |\n"
        raw = "with open(path) as f:\n        data = f.read()\n    return data"
        assert fill(source, raw) == raw


class TestIndentation:
    def test_python_block_stops_at_dedent(self):
        source = "def total(items):\n    |\n"
        raw = "result = sum(items)\n    return result\n\ndef other():\n    pass\n"
        assert fill(source, raw) == "result = sum(items)\n    return result"

    def test_python_nested_blocks_are_kept(self):
        source = "def walk(tree):\n    |\n"
        raw = "for node in tree:\n        if node.leaf:\n            yield node\n    return None\nprint(1)"
        assert fill(source, raw) == (
            "for node in tree:\n        if node.leaf:\n            yield node\n    return None"
        )

    def test_js_block_stops_at_the_enclosing_closing_brace(self):
        source = "function scale(xs, k) {\n  |\n}\n"
        raw = "const out = xs.map((x) => x * k);\n  return out;\n}\n\nfunction next() {"
        assert fill(source, raw, "javascript") == "const out = xs.map((x) => x * k);\n  return out;"

    def test_cursor_in_indentation_adds_the_first_lines_indent(self):
        # Cursor at column 0 of an empty line; the model indents the body itself.
        source = "def f(x):\n|\n"
        raw = "    y = x + 1\n    return y\nz = f(2)"
        assert fill(source, raw) == "    y = x + 1\n    return y"

    def test_block_opened_on_the_cursor_line_python(self):
        source = "def area(r):|\n"
        raw = "\n    return 3.14 * r * r\n\ndef perimeter(r):\n    return 2 * r"
        assert fill(source, raw) == "\n    return 3.14 * r * r"

    def test_block_opened_on_the_cursor_line_js_keeps_its_closing_brace(self):
        source = "function inc(a) {|"
        raw = "\n  return a + 1;\n}\n\nfunction dec(a) {\n  return a - 1;\n}"
        assert fill(source, raw, "javascript") == "\n  return a + 1;\n}"

    def test_block_opened_on_the_cursor_line_with_auto_closed_brace(self):
        # The editor already inserted the "}": the suggestion must not repeat it.
        source = "function inc(a) {|\n}\n"
        raw = "\n  return a + 1;\n}"
        assert fill(source, raw, "javascript") == "\n  return a + 1;"
        assert applied(source, raw, "javascript") == "function inc(a) {\n  return a + 1;\n}\n"

    def test_body_not_indented_under_its_opener_is_nothing(self):
        assert fill("    def area(r):|\n", "\nprint(1)") is None

    def test_block_may_start_with_a_blank_line(self):
        source = "def f(x):\n    y = x\n    |\n"
        assert fill(source, "\n    return y\nprint(f(1))") == "\n    return y"
        assert fill(source, "\nprint(f(1))") is None

    def test_tabs_count_as_indentation(self):
        source = "func main() {\n\t|\n}\n"
        raw = "x := 1\n\tfmt.Println(x)\n}\n"
        assert fill(source, raw, "go") == "x := 1\n\tfmt.Println(x)"


class TestTrailingWhitespace:
    def test_each_line_and_the_end_are_trimmed(self):
        source = "def f():\n    |\n"
        assert fill(source, "a = 1   \n    b = 2\t\n\n\n  ") == "a = 1\n    b = 2"

    def test_line_mode_trailing_space_is_trimmed(self):
        assert fill("total = |\n", "price * count   ") == "price * count"

    def test_indentation_for_text_after_the_cursor_is_kept(self):
        # "    |return x": the suggestion ends by indenting the existing "return x".
        source = "def f(a):\n    |return x\n"
        raw = "x = a * 2\n    "
        assert fill(source, raw) == "x = a * 2\n    "
        assert applied(source, raw) == "def f(a):\n    x = a * 2\n    return x\n"


class TestBrackets:
    def test_closer_the_suffix_supplies_is_dropped_python(self):
        source = "print(|)\n"
        assert fill(source, "total)") == "total"
        assert applied(source, "total)") == "print(total)\n"

    def test_text_after_a_duplicate_closer_is_cut(self):
        assert fill("print(|)\n", "total) + 1") == "total"

    def test_closers_of_the_completions_own_openers_are_kept(self):
        source = "print(|)\n"
        assert fill(source, "len(items)") == "len(items)"
        assert applied(source, "len(items))") == "print(len(items))\n"

    def test_closer_kept_when_the_suffix_does_not_supply_it(self):
        assert fill("print(|\n", "total)") == "total)"

    def test_js_array_and_call(self):
        source = "const xs = [|];\n"
        assert fill(source, "1, 2, 3];", "javascript") == "1, 2, 3"
        source = "foo(bar(|));\n"
        assert fill(source, "x));", "javascript") == "x"

    def test_closer_for_an_opener_on_an_earlier_line(self):
        source = "result = foo(\n    a,\n    |\n)\n"
        assert fill(source, "b)") == "b"

    def test_brackets_inside_strings_do_not_count(self):
        source = "print(|)\n"
        assert fill(source, '")"') == '")"'
        source = "log(|);\n"
        assert fill(source, "'(' + x", "javascript") == "'(' + x"

    def test_brackets_inside_comments_do_not_count(self):
        source = "def f():\n    |\n"
        raw = "x = g(1)  # see (2\n    return x"
        assert fill(source, raw) == raw


class TestSuffixOverlap:
    def test_js_string_end_repeated(self):
        source = 'const greeting = "|";\n'
        assert fill(source, 'hello";', "javascript") == "hello"
        assert applied(source, 'hello";', "javascript") == 'const greeting = "hello";\n'

    def test_python_string_end_repeated(self):
        assert fill("name = '|'\n", "alice'") == "alice"

    def test_semicolon_repeated(self):
        assert fill("let n = |;\n", "items.length;", "typescript") == "items.length"

    def test_word_repeated(self):
        source = "value = user.|name\n"
        assert fill(source, "profile.name") == "profile."
        assert applied(source, "profile.name") == "value = user.profile.name\n"

    def test_overlap_kept_when_dropping_it_breaks_brackets(self):
        assert fill("print(|)\n", "f(x)") == "f(x)"

    def test_overlap_kept_when_dropping_it_breaks_quotes(self):
        # The completion's closing quote belongs to its own string.
        assert fill('x = f(|"b")\n', '"a"') == '"a"'

    def test_quote_overlap_dropped_when_it_closes_the_suffix_string(self):
        source = 'say(|"!")\n'
        assert applied(source, "'hi', \"") == "say('hi', \"!\")\n"

    def test_repeated_last_lines_python(self):
        source = "def f(a, b):\n    |\n    return result\n"
        raw = "result = a + b\n    return result"
        assert fill(source, raw) == "result = a + b"

    def test_repeated_last_lines_js(self):
        source = "function f(a, b) {\n  |\n  return total;\n}\n"
        raw = "const total = a + b;\n  return total;\n}"
        assert fill(source, raw, "javascript") == "const total = a + b;"

    def test_repeated_lines_before_text_on_the_cursor_line(self):
        source = "def f(a):\n    |return x\n"
        raw = "x = a * 2\n    return x\n    "
        assert fill(source, raw) == "x = a * 2\n    "

    def test_repeated_several_lines(self):
        source = "def f(a):\n    |\n    b = a + 1\n    return b\n"
        raw = "a = abs(a)\n    b = a + 1\n    return b"
        assert fill(source, raw) == "a = abs(a)"


class TestUseless:
    @pytest.mark.parametrize("raw", ["", " ", "\n", "\t\n  \n", "\x00\x01"])
    def test_empty_or_whitespace_is_nothing(self, raw):
        assert fill("x = |\n", raw) is None
        assert fill("def f():\n    |\n", raw) is None

    def test_exactly_the_suffix_start_is_nothing(self):
        assert fill("print(|)\n", ")") is None
        assert fill("const s = '|';\n", "';", "javascript") is None

    def test_the_next_line_again_is_nothing(self):
        assert fill("def f(a):\n    |\n    return a\n", "return a") is None
        assert fill("def f(a):\n    |\n\n    return a\n", "return") is None

    def test_a_word_that_merely_starts_the_suffix_is_kept(self):
        source = "def f():\n    |\n    password = 1\n"
        assert fill(source, "pass") == "pass"

    def test_control_characters_are_removed(self):
        assert fill("x = |\n", "1\x00 + \x1b2") == "1 + 2"

    def test_crlf_in_raw_is_normalised(self):
        assert fill("def f():\n    |\n", "a = 1\r\n    b = 2\r\n") == "a = 1\n    b = 2"


class TestRobustness:
    def test_random_fills_never_crash_and_come_out_clean(self):
        rng = random.Random(1234)
        pieces = ["x", "foo", " ", "    ", "\t", "\n", "(", ")", "[", "]", "{", "}", '"', "'", "`",
                  "#", "//", ";", ":", "\\", "\r\n", "\U0001F600", "中", "\x00", "return ", "def "]
        sources = [
            ("print(|)\n", "python"), ("def f():\n    |\n", "python"), ("x = [|]\n", "python"),
            ("function f() {|\n}\n", "javascript"), ('s = "|";\n', "javascript"), ("|", "python"),
            ("if (a) {\n  |\n}\n", "typescript"),
        ]
        for _ in range(600):
            source, language = rng.choice(sources)
            raw = "".join(rng.choice(pieces) for _ in range(rng.randrange(25)))
            out = fill(source, raw, language)
            if out is None:
                continue
            assert out.strip()
            assert "\r" not in out and "\x00" not in out
            lines = out.split("\n")
            assert all(line == line.rstrip() for line in lines[:-1])
            if fill(source, raw, language) != out:
                pytest.fail("postprocess is not deterministic")

    def test_bare_request_without_context(self):
        request = FimRequest(preamble="", prefix="", suffix="", span=SpanPlan("block", 16))
        assert postprocess("hello\nworld  ", request) == "hello\nworld"
        assert postprocess("", request) is None

    def test_huge_raw_and_context_are_handled_quickly(self):
        import time

        long_line = "a = [" + "1, " * 200_000 + "|]\n"
        started = time.perf_counter()
        out = fill(long_line, "2, 3]" * 1000)
        assert time.perf_counter() - started < 2.0
        assert out is not None and not out.endswith("]")


def test_long_completion_before_a_long_suffix_line_is_fast():
    import time

    suffix_line = "b" * 50_000
    source = "x = '|" + suffix_line + "'\n"
    started = time.perf_counter()
    out = fill(source, "a" * 50_000 + "b" * 10)
    assert time.perf_counter() - started < 2.0
    assert out == "a" * 50_000


# --- Python: a completion must not open a string it leaves open ---------------------------

def test_a_lone_triple_quote_that_would_swallow_the_code_after_it_is_caught():
    before = 'def f(xs):\n    """Sum xs."""\n    total = 0\n    for x in xs:\n        '
    after = "\n    return total\n"
    assert leaves_a_string_open(before, '"""', after)
    assert leaves_a_string_open(before, "'''", after)
    assert not leaves_a_string_open(before, '"""Add it."""', after)  # opened and closed
    assert not leaves_a_string_open(before, "total += x", after)
    assert not leaves_a_string_open("def f():\n    ", '"""Sum.\n\n    More.\n    """', "\n")


def test_closing_or_finishing_a_docstring_the_document_has_is_kept():
    inside = 'def f():\n    """Return the answer.\n\n    Always 42.\n    '
    assert not leaves_a_string_open(inside, '"""', "\n    return 42\n")
    assert not leaves_a_string_open('x = """abc', 'def"""', "\n")
    # The cursor after the first quote of a docstring's opener, the suffix holding the rest.
    assert not leaves_a_string_open('def f():\n    "', '""', 'Return one.\n\n    Always.\n    """\n    return 1\n')
    # The cursor after the first quote of a module docstring's closer, far from its opener.
    module = '"""Module.\n' + "prose line\n" * 500 + '"'
    assert not leaves_a_string_open(module, '""', "\nimport os\n")


def test_quotes_in_strings_comments_and_escapes_open_nothing():
    before = "s = \"a '''b\"  # a \"\"\" in a comment\nt = '\\'\"\"\"'\nu = "
    assert not leaves_a_string_open(before, "1", "\n")
    assert leaves_a_string_open(before, '"""', "\n")
    assert not leaves_a_string_open('s = """a \\""" b', '"""', "\n")  # the escaped quote closes nothing


def test_the_server_path_drops_a_completion_that_opens_a_string(tmp_path):
    from lsp_server.suggest import suggest

    class Writes:  # an engine that always writes a lone triple quote
        def complete(self, request, decode, *, document, is_cancelled):
            from denoiser.engine import Completion
            return Completion(text='"""', source="model", tokens=1, steps=1, context_tokens=9,
                              reused_context_tokens=0, elapsed_ms=1.0, confidence=0.9)

    text = 'def f(xs):\n    total = 0\n    \n    return total\n'
    found = suggest(Writes(), text, 2, 4, document="a", path="x.py", language_id="python")
    assert found.text is None and found.dropped == "postprocess" and found.raw == '"""'
    found = suggest(Writes(), text, 2, 4, document="a", path="x.js", language_id="javascript")
    assert found.text == '"""'
