"""Context windows, header, span planning (fim/context.py, fim/languages.py)."""
from __future__ import annotations

import re
import time

import pytest

from fim.context import ContextOptions, build_request, display_path, estimate_tokens
from fim.languages import comment_syntax, language_from_path, resolve_language
from fim.positions import normalize_line_endings, utf16_length

EMOJI = "\U0001F600"


def code_tokens(text: str) -> int:
    """A stand-in tokenizer count: words, single punctuation and whitespace runs."""
    return len(re.findall(r"\w+|\s+|[^\w\s]", text))


def python_module(functions: int) -> str:
    parts = ['"""Generated module."""', "import os", ""]
    for i in range(functions):
        parts += [
            f"def handler_{i}(request, retries={i}):",
            f"    value = request.get('key_{i}', None)",
            "    if value is None:",
            f"        return os.environ.get('DEFAULT_{i}')",
            f"    return value * {i} + retries",
            "",
        ]
    return "\n".join(parts) + "\n"


def cursor_of(text: str, marker: str = "|") -> tuple[str, int, int]:
    """(text without marker, line, UTF-16 character) of the marker."""
    offset = text.index(marker)
    text = text[:offset] + text[offset + 1 :]
    before = text[:offset]
    line = before.count("\n")
    return text, line, utf16_length(before[before.rfind("\n") + 1 :])


def window_start_line(text: str, offset: int, prefix: str) -> int:
    before = normalize_line_endings(text[:offset])
    assert before.endswith(prefix)
    return before[: len(before) - len(prefix)].count("\n")


class TestWindows:
    def test_small_document_fits_whole(self):
        text, line, char = cursor_of("import os\n\ndef main():\n    x = os.|path\n    return x\n")
        request = build_request(text, line, char, path="app.py")
        assert request.prefix == "import os\n\ndef main():\n    x = os."
        assert request.suffix == "path\n    return x\n"
        assert request.language == "python"
        assert request.path == "app.py"

    @pytest.mark.parametrize("count", [estimate_tokens, code_tokens], ids=["estimate", "code_tokens"])
    @pytest.mark.parametrize("budget", [64, 300, 1024])
    def test_total_never_exceeds_budget(self, count, budget):
        text = python_module(80)
        others = [("lib/other.py", python_module(5))]
        options = ContextOptions(context_tokens=budget, snippet_tokens=min(100, budget // 4))
        lines = text.split("\n")
        for line in range(0, len(lines), 7):
            for char in (0, 4, 200):
                request = build_request(
                    text, line, char, path="m.py", options=options, other_documents=others, count_tokens=count
                )
                total = count(request.preamble) + count(request.prefix) + count(request.suffix)
                assert total <= budget, (line, char, total)

    def test_windows_are_whole_lines_and_adjacent_to_cursor(self):
        text = python_module(100)
        options = ContextOptions(context_tokens=400)
        offset = text.index("def handler_50")
        before = text[:offset]
        line = before.count("\n")
        request = build_request(text, line, 4, options=options)
        cursor = offset + 4
        assert text[:cursor].endswith(request.prefix)
        assert text[cursor:].startswith(request.suffix)
        start = cursor - len(request.prefix)
        assert text[start - 1] == "\n"  # the prefix window starts at a line start
        assert request.suffix.endswith("\n")  # and the suffix ends at a line end
        assert len(request.prefix) > len(request.suffix)  # 75% / 25% split

    def test_prefix_start_is_a_multiple_of_line_step(self):
        text = python_module(100)
        for step in (1, 4, 16):
            options = ContextOptions(context_tokens=300, line_step=step)
            for line in range(150, 400, 13):
                request = build_request(text, line, 0, options=options)
                offset = sum(len(x) + 1 for x in text.split("\n")[:line])
                assert window_start_line(text, offset, request.prefix) % step == 0

    def test_suffix_fraction_zero_gives_prefix_everything(self):
        text = python_module(30)
        request = build_request(text, 40, 0, options=ContextOptions(suffix_fraction=0.0, context_tokens=200))
        assert request.suffix == ""
        assert request.prefix

    def test_unused_suffix_budget_goes_to_the_prefix(self):
        text = python_module(60)
        end = len(text.split("\n")) - 1
        options = ContextOptions(context_tokens=400, line_step=1)
        at_end = build_request(text, end, 0, options=options)
        assert at_end.suffix == ""
        assert estimate_tokens(at_end.prefix) > 0.9 * 400 - 10

    def test_custom_counter_is_used(self):
        text = python_module(10)
        request = build_request(text, 20, 0, count_tokens=lambda s: 10**6 if s else 0)
        assert request.prefix == "" and request.suffix == "" and request.preamble == ""


class TestStabilityWhileTyping:
    """The context K/V cache hits only if typing extends the prefix and leaves the
    suffix and the prefix window start alone."""

    @pytest.mark.parametrize("count", [estimate_tokens, code_tokens], ids=["estimate", "code_tokens"])
    def test_typing_a_function_extends_the_prefix(self, count):
        base = python_module(60)
        anchor = base.index("def handler_40")
        new_code = (
            "def merge(left, right):\n"
            "    result = []\n"
            "    while left and right:\n"
            "        result.append(left.pop(0) if left[0] < right[0] else right.pop(0))\n"
            "    return result + left + right\n\n"
        )
        options = ContextOptions(context_tokens=512)
        previous = None
        starts = []
        stays = 0
        for typed in range(len(new_code) + 1):
            text = base[:anchor] + new_code[:typed] + base[anchor:]
            offset = anchor + typed
            before = text[:offset]
            line = before.count("\n")
            char = utf16_length(before[before.rfind("\n") + 1 :])
            request = build_request(text, line, char, path="m.py", options=options, count_tokens=count)
            start = window_start_line(text, offset, request.prefix)
            starts.append(start)
            if previous is not None:
                assert request.suffix == previous.suffix
                assert request.preamble == previous.preamble
                if start == starts[-2]:
                    stays += 1
                    assert request.prefix == previous.prefix + new_code[typed - 1]
            previous = request
        # The window start moves by whole steps and rarely: 216 keystrokes of
        # about 60 tokens move it at most a few times.
        changes = sum(1 for a, b in zip(starts, starts[1:]) if a != b)
        assert changes <= 3
        assert stays >= len(new_code) - 3
        assert all(s % options.line_step == 0 for s in starts)
        assert starts == sorted(starts)

    def test_tight_budget_moves_the_start_in_whole_steps_only(self):
        base = python_module(60)
        anchor = base.index("def handler_40")
        new_code = "def merge(left, right):\n    result = []\n    return result + left + right\n" * 3
        options = ContextOptions(context_tokens=160, line_step=4)
        previous_start, previous_prefix, changes = None, None, 0
        for typed in range(len(new_code) + 1):
            text = base[:anchor] + new_code[:typed] + base[anchor:]
            before = text[: anchor + typed]
            line = before.count("\n")
            char = len(before) - before.rfind("\n") - 1
            request = build_request(text, line, char, options=options)
            start = window_start_line(text, anchor + typed, request.prefix)
            assert start % 4 == 0
            if previous_start is not None:
                if start == previous_start:
                    assert request.prefix == previous_prefix + new_code[typed - 1]
                else:
                    assert start > previous_start
                    changes += 1
            previous_start, previous_prefix = start, request.prefix
        # Nine typed lines under a tight budget: the start had to move, a few times.
        assert 1 <= changes <= 9

    def test_window_start_moves_only_when_the_budget_overflows(self):
        base = python_module(60)
        anchor = base.index("def handler_40")
        options = ContextOptions(context_tokens=256, suffix_fraction=0.25)
        line = base[:anchor].count("\n")
        first = build_request(base, line, 0, options=options)
        start0 = window_start_line(base, anchor, first.prefix)
        slack = 256 - estimate_tokens(first.preamble) - estimate_tokens(first.suffix) - estimate_tokens(first.prefix)
        # Typing less than the slack never moves the start.
        typed = "x" * int(max(0, slack - 2) * 3.5)
        text = base[:anchor] + typed + base[anchor:]
        request = build_request(text, line, len(typed), options=options)
        assert window_start_line(text, anchor + len(typed), request.prefix) == start0
        # Typing far more than the slack moves it forward by whole steps.
        typed = "y = 1\n" * 40
        text = base[:anchor] + typed + base[anchor:]
        request = build_request(text, line + 40, 0, options=options)
        moved = window_start_line(text, anchor + len(typed), request.prefix)
        assert moved > start0 and (moved - start0) % options.line_step == 0

    def test_moving_the_cursor_within_a_line_keeps_the_window_start(self):
        text = python_module(60)
        line = 200
        starts = set()
        for char in range(0, 40):
            request = build_request(text, line, char, options=ContextOptions(context_tokens=300))
            offset = sum(len(x) + 1 for x in text.split("\n")[:line]) + min(char, len(text.split("\n")[line]))
            starts.add(window_start_line(text, offset, request.prefix))
        assert len(starts) == 1

    def test_snippets_stay_put_while_typing_on_a_line(self):
        other = ("lib/merge.py", "def merge_sorted(left, right):\n    result = []\n    return result\n")
        base = "def sort_all(items):\n    left, right = split(items)\n    result = merge_sorted(left, right)\n    "
        preambles = set()
        for typed in ["", "r", "re", "ret", "retu", "return", "return res"]:
            text = base + typed
            request = build_request(text, 3, 4 + len(typed), path="app.py", other_documents=[other])
            preambles.add(request.preamble)
        assert len(preambles) == 1
        assert "merge_sorted" in preambles.pop()


class TestGiantAndBadInput:
    def test_megabyte_single_line(self):
        line = "var a=[" + ",".join(str(i % 997) for i in range(270_000)) + "];"
        assert len(line) > 1_000_000
        options = ContextOptions(context_tokens=1024)
        started = time.perf_counter()
        request = build_request(line, 0, 500_000, path="bundle.min.js", options=options)
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0
        assert 0 < len(request.prefix) <= 1024 * 16
        assert 0 < len(request.suffix) <= 1024 * 16
        assert line[:500_000].endswith(request.prefix)
        assert line[500_000:].startswith(request.suffix)
        total = estimate_tokens(request.preamble) + estimate_tokens(request.prefix) + estimate_tokens(request.suffix)
        assert total <= 1024

    def test_typing_on_a_giant_line_keeps_the_cut(self):
        line = "x" * 200_000
        previous = build_request(line, 0, 100_000)
        for extra in range(1, 30):
            text = line[:100_000] + "y" * extra + line[100_000:]
            request = build_request(text, 0, 100_000 + extra)
            assert request.suffix == previous.suffix
            assert request.prefix == previous.prefix + "y"
            previous = request

    def test_giant_line_before_the_cursor_line(self):
        text = "z" * 1_000_000 + "\nprint(1)\nprint(|2)\n"
        text, line, char = cursor_of(text)
        request = build_request(text, line, char)
        assert request.prefix == "print(1)\nprint("
        assert len(request.prefix) < 100

    def test_empty_document(self):
        request = build_request("", 0, 0, path="new.py")
        assert (request.prefix, request.suffix) == ("", "")
        assert request.span.mode == "block"
        assert request.preamble == "# path: new.py\n"

    @pytest.mark.parametrize("line, char", [(-1, -1), (0, 10**6), (10**6, 0), (10**6, 10**6), (-10, 10**6)])
    def test_out_of_range_positions_clamp(self, line, char):
        text = "a = 1\nb = 2\n"
        request = build_request(text, line, char)
        assert request.prefix + request.suffix == text

    def test_position_past_end_of_line_means_end_of_line(self):
        request = build_request("foo(1)\nbar(2)\n", 0, 999)
        assert request.prefix == "foo(1)"
        assert request.suffix == "\nbar(2)\n"

    def test_control_characters_and_nul_are_kept(self):
        text = "s = '\x00\x01\x1b[31m'\x7f\nt = 1\n"
        request = build_request(text, 1, 0)
        assert request.prefix + request.suffix == text

    def test_lone_surrogates_become_replacement_characters(self):
        text = "s = '\ud83d'\nt = '\udc00'"
        request = build_request(text, 1, 3)
        assert "\ud83d" not in request.prefix and "\ufffd" in request.prefix
        assert request.prefix + request.suffix == "s = '\ufffd'\nt = '\ufffd'"
        (request.prefix + request.suffix).encode("utf-8")  # a tokenizer can take it

    def test_crlf_document_is_normalised(self):
        text = "a = 1\r\nb = 2\r\nc = 3\r\n"
        request = build_request(text, 1, 3)
        assert request.prefix == "a = 1\nb ="
        assert request.suffix == " 2\nc = 3\n"

    def test_utf16_cursor_after_emoji(self):
        text = f"msg = '{EMOJI}' + name\n"
        request = build_request(text, 0, 10)  # 7 + 2 units for the emoji + 1 for the quote
        assert request.prefix == f"msg = '{EMOJI}'"

    def test_bad_options_are_refused_with_a_reason(self):
        with pytest.raises(ValueError, match="suffix_fraction"):
            ContextOptions(suffix_fraction=1.5)
        with pytest.raises(ValueError, match="context_tokens"):
            ContextOptions(context_tokens=0)
        with pytest.raises(ValueError, match="line_step"):
            ContextOptions(line_step=0)
        with pytest.raises(ValueError, match="max_snippets"):
            ContextOptions(max_snippets=-1)


class TestSpanPlan:
    @pytest.mark.parametrize(
        "source, language, mode",
        [
            ("x = foo(|)\n", "python", "line"),
            ("x = foo(|\n", "python", "line"),
            ("return valu|e\n", "python", "line"),
            ("result = compute()|\n", "python", "line"),
            ("def f():\n    |\n", "python", "block"),
            ("def f():\n|\n", "python", "block"),
            ("def f():\n    |return 1\n", "python", "block"),
            ("def f(x):|\n", "python", "block"),
            ("    for item in items:|\n", "python", "block"),
            ("x = {|\n", "python", "line"),
            ("d = a[1:|\n", "python", "line"),
            ("function f() {|\n}\n", "javascript", "block"),
            ("function f() {|}\n", "javascript", "line"),
            ("const x = foo(|);\n", "javascript", "line"),
            ("if (ok) {\n  |\n}\n", "typescript", "block"),
            ("", "python", "block"),
        ],
    )
    def test_mode(self, source, language, mode):
        if "|" not in source:
            source += "|"
        text, line, char = cursor_of(source)
        options = ContextOptions(max_span_tokens_line=20, max_span_tokens_block=70)
        request = build_request(text, line, char, language_id=language, options=options)
        assert request.span.mode == mode
        assert request.span.max_tokens == (20 if mode == "line" else 70)


class TestPreamble:
    @pytest.mark.parametrize(
        "path, language_id, header",
        [
            ("src/app.py", "", "# path: src/app.py\n"),
            ("src/app.ts", "", "// path: src/app.ts\n"),
            ("web/App.tsx", "typescriptreact", "// path: web/App.tsx\n"),
            ("init.lua", "", "-- path: init.lua\n"),
            ("style.css", "", "/* path: style.css */\n"),
            ("index.html", "", "<!-- path: index.html -->\n"),
            ("deploy.sh", "sh", "# path: deploy.sh\n"),
            ("Makefile", "", "# path: Makefile\n"),
            ("data.json", "", ""),
            ("notes.txt", "", ""),
            ("", "python", ""),
            ("file:///home/me/proj/src/app.py", "python", "# path: proj/src/app.py\n"),
            ("file:///C:/Users/me/My%20Proj/a.go", "go", "// path: me/My Proj/a.go\n"),
        ],
    )
    def test_header(self, path, language_id, header):
        request = build_request("x", 0, 1, path=path, language_id=language_id)
        assert request.preamble == header

    def test_path_with_line_break_cannot_escape_the_comment(self):
        request = build_request("x", 0, 1, path="evil\nimport os.py")
        assert request.preamble.count("\n") == 1
        assert request.preamble.startswith("# path: ")

    def test_snippets_are_comments_from_similar_documents(self):
        util = (
            "import json\n\n"
            "def load_config(path):\n"
            "    with open(path) as handle:\n"
            "        config = json.load(handle)\n"
            "    return validate_config(config)\n\n"
            "def unrelated_helper():\n    pass\n"
        )
        noise = ("notes.py", "\n".join(f"alpha_{i} = beta_{i}" for i in range(40)))
        text, line, char = cursor_of(
            "def main():\n    with open(config_path) as handle:\n        config = json.load(handle)\n    |\n"
        )
        request = build_request(
            text, line, char, path="app.py", other_documents=[noise, ("lib/util.py", util), ("app.py", text)]
        )
        assert request.preamble.startswith("# path: app.py\n# snippet from lib/util.py:\n")
        assert "#         config = json.load(handle)\n" in request.preamble
        for body in request.preamble.splitlines():
            assert body.startswith("#")
        assert [s.path for s in request.snippets] == ["lib/util.py"]
        assert "alpha_" not in request.preamble

    def test_snippets_respect_their_token_budget(self):
        big = "\n".join(f"value_{i} = compute(config, handle, path_{i})" for i in range(200))
        text, line, char = cursor_of("config = load(path)\nhandle = open(path)\nvalue_3 = compute(config, handle, path_3)\n|")
        options = ContextOptions(snippet_tokens=60, max_snippets=2)
        request = build_request(text, line, char, path="a.py", options=options, other_documents=[("big.py", big)])
        header = "# path: a.py\n"
        assert request.preamble.startswith(header)
        assert request.snippets
        assert estimate_tokens(request.preamble[len(header):]) <= 60
        # Cut by whole lines from the end: each kept snippet is the start of a window.
        for snippet in request.snippets:
            assert snippet.text in big

    def test_no_snippets_when_disabled_or_no_comment_syntax(self):
        other = [("b.py", "def load_config(path):\n    return path\n")]
        text = "def load_config(path):\n    return path\nx = 1\n"
        none = build_request(text, 2, 0, path="a.py", other_documents=other, options=ContextOptions(max_snippets=0))
        assert "snippet" not in none.preamble
        json_doc = build_request(text, 2, 0, path="a.json", other_documents=other)
        assert json_doc.preamble == ""

    def test_display_path(self):
        assert display_path("") == ""
        assert display_path("src/app.py") == "src/app.py"
        assert display_path("C:\\work\\proj\\src\\app.py") == "proj/src/app.py"
        assert display_path("untitled:Untitled-1") == "Untitled-1"
        assert len(display_path("a/" * 10 + "b" * 1000 + ".py")) <= 160


class TestLanguages:
    @pytest.mark.parametrize(
        "language_id, path, expected",
        [
            ("python", "", "python"),
            ("", "pkg/mod.py", "python"),
            ("", "a.pyi", "python"),
            ("javascript", "x.txt", "javascript"),
            ("", "x.mjs", "javascript"),
            ("", "App.jsx", "javascriptreact"),
            ("", "App.tsx", "typescriptreact"),
            ("", "main.go", "go"),
            ("", "lib.rs", "rust"),
            ("", "Main.java", "java"),
            ("", "a.c", "c"),
            ("", "a.hpp", "cpp"),
            ("cs", "", "csharp"),
            ("", "Program.cs", "csharp"),
            ("", "app.rb", "ruby"),
            ("", "index.php", "php"),
            ("", "init.lua", "lua"),
            ("sh", "", "shellscript"),
            ("bash", "", "shellscript"),
            ("", "run.sh", "shellscript"),
            ("", "Dockerfile", "dockerfile"),
            ("", "Makefile", "makefile"),
            ("PYTHON", "", "python"),
            ("klingon", "a.py", "python"),
            ("klingon", "a.unknown", "plaintext"),
            ("", "", "plaintext"),
            ("", "file:///x/y/z.ts", "typescript"),
            ("", ".bashrc", "shellscript"),
            ("", "noext", "plaintext"),
        ],
    )
    def test_resolve(self, language_id, path, expected):
        assert resolve_language(language_id, path) == expected

    def test_comment_syntax(self):
        assert comment_syntax("python").line("path: a.py") == "# path: a.py"
        assert comment_syntax("typescript").line("") == "//"
        assert comment_syntax("css").line("x") == "/* x */"
        assert comment_syntax("json") is None
        assert comment_syntax("unknown-language") is None
        assert language_from_path("") is None


def test_fim_imports_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, fim, fim.context, fim.postprocess, fim.snippets, fim.languages, fim.positions\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'tokenizers', 'pygls') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(fim.build_request) and callable(fim.postprocess)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
