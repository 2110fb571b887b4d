"""Drafts from the user's code: what is proposed, from where, re-indented and cut, and the index's bounds."""
from fim.drafts import MIN_EVIDENCE, DraftIndex

OTHER = '''class A:
    def f(self, x):
        if x is None:
            raise ValueError("x must be set")
        return self.g(x, strict=True)
'''


def index(**docs):
    idx = DraftIndex()
    for name, text in docs.items():
        idx.update(name, text)
    return idx


def draft_at(idx, text, marker, mode, name="cur.py"):
    return idx.draft(name, text.replace(marker, ""), text.index(marker), mode)


def test_rest_of_line_is_the_rest_of_a_line_that_starts_alike():
    found = draft_at(index(other=OTHER), "def h(y):\n    if y is None:\n        raise Val|\n", "|", "line")
    assert found.text == 'ueError("x must be set")' and found.source == "other" and found.line == 3


def test_too_little_evidence_proposes_nothing():
    text = "x = 1\nret|\n"
    assert draft_at(index(other="return 5\n"), text, "|", "line") is None
    assert len("ret") < MIN_EVIDENCE


def test_draft_stops_where_the_cursor_line_goes_on():
    found = draft_at(index(other=OTHER), "    return self.g(x|)\n", "|", "line")
    assert found.text == ", strict=True"
    # A draft that would not end where the line already does is not proposed.
    assert draft_at(index(other=OTHER), "    return self.g(x|]\n", "|", "line") is None


def test_block_after_a_matching_line_is_reindented_to_the_cursor():
    found = draft_at(index(other=OTHER), "class B:\n  def f(self, x):\n    |\n", "|", "block")
    assert found.text == 'if x is None:\n        raise ValueError("x must be set")\n    return self.g(x, strict=True)'
    # The block ends where the source's block does (a dedent).
    found = draft_at(index(other=OTHER), "def h(x):\n  if x is None:\n    |\n", "|", "block")
    assert found.text == 'raise ValueError("x must be set")'
    # The cursor at the end of a line that opens a block: the draft starts a new line, indented under it.
    found = draft_at(index(other=OTHER), "def h(x):\n    if x is None:|", "|", "block")
    assert found.text.startswith('\n        raise ValueError("x must be set")')


def test_block_stops_before_the_text_already_after_the_cursor():
    text = "    if x is None:\n        |\n        return self.g(x, strict=True)\n"
    found = draft_at(index(other=OTHER), text, "|", "block")
    assert found.text == 'raise ValueError("x must be set")'


def test_more_matching_context_wins_over_frequency():
    common = "def a():\n    total = 0\n    total += 1\n" * 3
    rare = "def b():\n    start()\n    total = 0\n    total -= 1\n"
    idx = index(common=common, rare=rare)
    text = "def c():\n    start()\n    total = 0\n    tota|\n"
    assert draft_at(idx, text, "|", "line").text == "l -= 1"
    text = "def c():\n    total = 0\n    tota|\n"
    assert draft_at(idx, text, "|", "line").text == "l += 1"


def test_the_cursor_line_never_drafts_itself():
    text = "    raise ValueError('only here')|\n"
    idx = DraftIndex()
    idx.update("cur.py", text.replace("|", ""), pinned=True)
    assert draft_at(idx, "    raise Valu|eError('only here')\n", "|", "line") is None


def test_open_documents_win_over_the_disk_and_updates_replace():
    idx = DraftIndex()
    idx.update("a.py", "value = compute_old(1)\n", pinned=True)
    idx.update("a.py", "value = compute_disk(1)\n")  # the file on disk: ignored while open
    assert draft_at(idx, "value = comp|\n", "|", "line", name="b.py").text == "ute_old(1)"
    idx.update("a.py", "value = compute_new(1)\n", pinned=True)
    assert draft_at(idx, "value = comp|\n", "|", "line", name="b.py").text == "ute_new(1)"
    idx.remove("a.py")
    assert draft_at(idx, "value = comp|\n", "|", "line", name="b.py") is None and len(idx) == 0


def test_memory_is_bounded_files_go_before_open_documents():
    idx = DraftIndex(max_bytes=6000)  # the open document and two of the files
    idx.update("open.py", "keep_me = 1\n", pinned=True)
    for i in range(40):
        idx.update(f"file{i}.py", f"line_{i} = {i}\n" * 5)
    assert idx.bytes <= 6000
    assert "open.py" in idx and "file39.py" in idx and "file0.py" not in idx
    idx.remove_under("file")
    assert idx.names() == ["open.py"]


def test_rest_of_line_matches_the_text_before_the_cursor_anywhere_in_a_line():
    # "self.g(x, " appears inside another line: its rest is proposed though the lines start differently.
    found = draft_at(index(other=OTHER), "    value = helper(self.g(x, |\n", "|", "line")
    assert found.text == "strict=True)" and found.source == "other" and found.line == 4


def test_a_longer_match_before_the_cursor_wins_over_a_more_frequent_one():
    idx = index(common="a = load(path, mode='r')\n" * 4, rare="b = self.load(path, mode='rb')\n")
    assert draft_at(idx, "c = self.load(path, |\n", "|", "line").text == "mode='rb')"
    assert draft_at(idx, "c = load(path, |\n", "|", "line").text == "mode='r')"


def test_short_evidence_must_match_a_line_from_its_start():
    idx = index(other="x = total(items)\n")
    assert draft_at(idx, "tota|\n", "|", "line") is None  # "tota" only occurs mid-line
    assert draft_at(index(other="total(items)\n"), "tota|\n", "|", "line").text == "l(items)"


def test_the_line_after_the_draft_is_evidence_and_breaks_ties():
    # Two sources continue "value = compute(" alike before the cursor; only one is followed by the
    # line the document has next.
    first = "def a():\n    value = compute(1)\n    log(value)\n"
    second = "def b():\n    value = compute(2)\n    return value\n"
    idx = index(first=first, second=second)
    found = draft_at(idx, "def c():\n    value = compute(|\n    return value\n", "|", "line")
    assert (found.text, found.next_line, found.rivals) == ("2)", True, 1)
    found = draft_at(idx, "def c():\n    value = compute(|\n    log(value)\n", "|", "line")
    assert (found.text, found.next_line, found.rivals) == ("1)", True, 1)
    found = draft_at(idx, "def c():\n    value = compute(|\n    print(value)\n", "|", "line")
    assert found.next_line is False and found.rivals == 1
    # One source only: no rivals.
    found = draft_at(index(first=first), "def c():\n    value = compute(|\n", "|", "line")
    assert (found.text, found.next_line, found.rivals) == ("1)", False, 0)


def test_a_block_draft_cut_at_the_documents_next_line_says_so():
    text = "    if x is None:\n        |\n        return self.g(x, strict=True)\n"
    assert draft_at(index(other=OTHER), text, "|", "block").next_line is True
    # Not cut, but the source's block is followed by the line the document has next.
    text = "def h(x):\n  if x is None:\n    |\n  return self.g(x, strict=True)\n"
    assert draft_at(index(other=OTHER), text, "|", "block").next_line is True
    text = "def h(x):\n  if x is None:\n    |\n  return None\n"
    assert draft_at(index(other=OTHER), text, "|", "block").next_line is False


def test_the_request_carries_the_drafts_evidence():
    from lsp_server.suggest import build_request, with_draft

    text = "def a():\n    value = compute(1)\n    log(value)\n\ndef c():\n    value = compute(\n    log(value)\n"
    line, character = 5, len("    value = compute(")
    request = with_draft(build_request(text, line, character, path="c.py", language_id="python"),
                         DraftIndex(), text, line, character, "file:///c.py")
    assert request.draft == "1)"
    evidence = request.draft_evidence
    assert (evidence.same_document, evidence.next_line, evidence.rivals) == (1, 1, 0)
    other = index(**{"file:///a.py": "def a():\n    value = compute(2)\n    log(value)\n"})
    text = "def c():\n    value = compute(\n    log(value)\n"
    request = with_draft(build_request(text, 1, len("    value = compute("), path="c.py", language_id="python"),
                         other, text, 1, len("    value = compute("), "file:///c.py")
    assert request.draft == "2)" and request.draft_evidence.same_document == 0
