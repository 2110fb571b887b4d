"""The index of the user's code: workspace folders read in the background by the walk's
rules, open documents winning over the disk, refreshed on save, dropped with a folder."""
from fim.repo_files import read_repo_file
from lsp_server.workspace_drafts import WorkspaceDrafts, file_uri


# Enough code around the lines under test that the walk does not skip a file as too small.
FILLER = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(8))


def make_repo(root):
    (root / "pkg").mkdir()
    (root / "pkg" / "a.py").write_text("result = compute_total(items, strict=True)\n" + FILLER)
    (root / "secret.py").write_text("token = load_private_token()\n" + FILLER)
    (root / ".gitignore").write_text("secret.py\n")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "lib.js").write_text("var vendored_line = 1;\n")
    return root


def draft(index, text):
    return index.draft("untitled:new", text, len(text), "line")


def test_folder_is_indexed_by_the_walks_rules(tmp_path):
    root = make_repo(tmp_path)
    drafts = WorkspaceDrafts()
    drafts.add_folder(file_uri(root))
    assert drafts.wait_idle()
    assert drafts.index.names() == [file_uri(root / "pkg" / "a.py")]
    assert draft(drafts.index, "result = compute_").text == "total(items, strict=True)"
    assert draft(drafts.index, "token = load_") is None  # ignored by .gitignore
    drafts.remove_folder(file_uri(root))
    assert drafts.wait_idle() and len(drafts.index) == 0
    drafts.close()


def test_open_text_wins_and_saves_refresh(tmp_path):
    root = make_repo(tmp_path)
    uri = file_uri(root / "pkg" / "a.py")
    drafts = WorkspaceDrafts()
    drafts.add_folder(file_uri(root))
    drafts.opened(uri, "result = compute_open(1)\n")
    assert drafts.wait_idle()
    assert draft(drafts.index, "result = compute_").text == "open(1)"
    drafts.file_changed(uri)  # the disk's text does not replace the editor's
    assert drafts.wait_idle() and draft(drafts.index, "result = compute_").text == "open(1)"
    (root / "pkg" / "a.py").write_text("result = compute_saved(2)\n" + FILLER)
    drafts.closed(uri)  # closed: the file on disk takes over
    assert drafts.wait_idle() and draft(drafts.index, "result = compute_").text == "saved(2)"
    drafts.file_changed(uri, deleted=True)
    assert drafts.wait_idle() and len(drafts.index) == 0
    drafts.close()


def test_turned_off_it_reads_nothing_and_forgets(tmp_path):
    root = make_repo(tmp_path)
    drafts = WorkspaceDrafts()
    drafts.set_enabled(False)
    drafts.add_folder(file_uri(root))
    drafts.opened("untitled:x", "value = something_long()\n")
    assert drafts.wait_idle() and len(drafts.index) == 0 and drafts.files_read == 0
    drafts.set_enabled(True)
    assert drafts.wait_idle() and len(drafts.index) == 1
    drafts.set_enabled(False)
    assert drafts.wait_idle() and len(drafts.index) == 0
    # Closing or changing a workspace file while off reads nothing either.
    drafts.closed(file_uri(root / "pkg" / "a.py"))
    drafts.file_changed(file_uri(root / "pkg" / "a.py"))
    assert drafts.wait_idle() and len(drafts.index) == 0
    drafts.close()


def test_one_file_is_read_by_the_same_rules_as_the_walk(tmp_path):
    root = make_repo(tmp_path)
    assert read_repo_file(root, "pkg/a.py").text.startswith("result")
    assert read_repo_file(root, "secret.py") is None
    assert read_repo_file(root, "node_modules/lib.js") is None
    assert read_repo_file(root, "../outside.py") is None
    assert read_repo_file(root, "pkg/missing.py") is None
