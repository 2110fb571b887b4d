"""Reading a file from disk as an editor would: lsp_server.source_file.decode_source."""
from __future__ import annotations

import codecs

import pytest

from lsp_server.source_file import UnreadableSource, coding_declaration, decode_source, read_source


def test_utf8_is_read_as_it_is():
    read = decode_source("naïve = '😀'\n".encode("utf-8"), "a.py")
    assert (read.text, read.encoding, read.warning) == ("naïve = '😀'\n", "utf-8", None)


@pytest.mark.parametrize("encoding, mark", [
    ("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE),
])
def test_a_byte_order_mark_names_the_encoding_and_is_not_text(encoding, mark):
    # UTF-16 and UTF-32 hold NUL bytes: the mark, not the NULs, decides.
    read = decode_source(mark + "x = 'é'\n".encode(encoding), "a.py")
    assert read.text == "x = 'é'\n" and read.warning is None


def test_nul_bytes_mean_a_binary_file():
    with pytest.raises(UnreadableSource, match=r"^blob: this is a binary file \(it contains NUL bytes\)"):
        decode_source(b"ELF\x00\x01\x02", "blob")


@pytest.mark.parametrize("header", [
    "# -*- coding: latin-1 -*-\n",
    "#!/usr/bin/env python\n# coding=latin-1\n",
    "# vim: set fileencoding=latin-1 :\n",
])
def test_a_coding_declaration_on_line_1_or_2_is_followed(header):
    text = header + "name = 'café'\n"
    read = decode_source(text.encode("latin-1"), "a.py")
    assert read.text == text and read.encoding == "iso8859-1" and read.warning is None


def test_a_declaration_wins_over_bytes_that_happen_to_be_utf8():
    text = "# coding: latin-1\nname = 'Ã©'\n"  # C3 A9: "é" in UTF-8, two characters in latin-1
    assert decode_source(text.encode("latin-1"), "a.py").text == text


def test_a_declaration_on_line_3_does_not_count():
    assert coding_declaration(b"x = 1\ny = 2\n# coding: latin-1\n") is None


def test_undecodable_bytes_are_replaced_with_a_warning_that_says_where():
    data = "x = 1\nname = 'café crème'\n".encode("latin-1")
    read = decode_source(data, "cafe.py")
    assert read.text == "x = 1\nname = 'caf\ufffd cr\ufffdme'\n"
    assert read.warning == (
        "cafe.py: not valid UTF-8: 2 undecodable byte sequences read as U+FFFD (the first at line 2, "
        "column 12); save the file as UTF-8, or declare its encoding on line 1 or 2, e.g. `# -*- coding: latin-1 -*-`")


def test_a_replacement_character_already_in_the_file_is_not_counted():
    read = decode_source("ok = '\ufffd'\n".encode("utf-8") + b"bad = '\xff'\n", "a.py")
    assert "1 undecodable byte sequence read" in read.warning and "line 2, column 8" in read.warning


def test_an_unknown_or_wrong_declaration_is_said_and_utf8_used():
    unknown = decode_source(b"# coding: klingon\nx = '\xe9'\n", "a.py")
    assert "names 'klingon', an encoding Python does not know" in unknown.warning
    wrong = decode_source(b"# coding: ascii\nx = '\xe9'\n", "a.py")
    assert "it is not valid ascii as its coding declaration says" in wrong.warning


def test_read_source_reads_the_file(tmp_path):
    path = tmp_path / "a.py"
    path.write_bytes(b"\xef\xbb\xbfx = 1\n")
    assert read_source(path).text == "x = 1\n"
    with pytest.raises(OSError):
        read_source(tmp_path / "absent.py")
