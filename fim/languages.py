"""Which language a document is, and how to write a comment in it.

The language comes from the editor's LSP `languageId` when it names one we know
(including common Neovim/Vim filetype spellings such as "sh" or "cs"), else from
the file extension, else "plaintext". The comment syntax is used to write the
file header and the snippets into the model's context, and to skip comments
when post-processing counts brackets.

This module holds tables only: no I/O, no model knowledge.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass


@dataclass(frozen=True)
class CommentSyntax:
    """How one line of text becomes a comment: `start + text + end`."""

    start: str
    end: str = ""

    def line(self, text: str) -> str:
        """`text` as a one-line comment, without trailing spaces."""
        return (self.start + text + self.end).rstrip()


_HASH = CommentSyntax("# ")
_SLASH = CommentSyntax("// ")
_DASH = CommentSyntax("-- ")
_SEMI = CommentSyntax("; ")
_PERCENT = CommentSyntax("% ")
_QUOTE = CommentSyntax('" ')
_BLOCK_C = CommentSyntax("/* ", " */")
_HTML = CommentSyntax("<!-- ", " -->")

# Canonical id (the LSP languageId) -> (file extensions, comment syntax or None).
_LANGUAGES: dict[str, tuple[tuple[str, ...], CommentSyntax | None]] = {
    "python": ((".py", ".pyi", ".pyw"), _HASH),
    "javascript": ((".js", ".mjs", ".cjs"), _SLASH),
    "javascriptreact": ((".jsx",), _SLASH),
    "typescript": ((".ts", ".mts", ".cts"), _SLASH),
    "typescriptreact": ((".tsx",), _SLASH),
    "go": ((".go",), _SLASH),
    "rust": ((".rs",), _SLASH),
    "java": ((".java",), _SLASH),
    "kotlin": ((".kt", ".kts"), _SLASH),
    "scala": ((".scala", ".sc"), _SLASH),
    "groovy": ((".groovy", ".gradle"), _SLASH),
    "c": ((".c", ".h"), _SLASH),
    "cpp": ((".cc", ".cpp", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp"), _SLASH),
    "objective-c": ((".m",), _SLASH),
    "objective-cpp": ((".mm",), _SLASH),
    "csharp": ((".cs", ".csx"), _SLASH),
    "fsharp": ((".fs", ".fsi", ".fsx"), _SLASH),
    "swift": ((".swift",), _SLASH),
    "dart": ((".dart",), _SLASH),
    "zig": ((".zig",), _SLASH),
    "php": ((".php", ".phtml"), _SLASH),
    "ruby": ((".rb", ".rake", ".gemspec"), _HASH),
    "perl": ((".pl", ".pm"), _HASH),
    "r": ((".r",), _HASH),
    "julia": ((".jl",), _HASH),
    "elixir": ((".ex", ".exs"), _HASH),
    "nim": ((".nim",), _HASH),
    "shellscript": ((".sh", ".bash", ".zsh", ".ksh"), _HASH),
    "powershell": ((".ps1", ".psm1", ".psd1"), _HASH),
    "makefile": ((".mk", ".mak"), _HASH),
    "dockerfile": ((".dockerfile",), _HASH),
    "cmake": ((".cmake",), _HASH),
    "yaml": ((".yaml", ".yml"), _HASH),
    "toml": ((".toml",), _HASH),
    "ini": ((".ini", ".cfg", ".conf"), _SEMI),
    "lua": ((".lua",), _DASH),
    "sql": ((".sql",), _DASH),
    "haskell": ((".hs", ".lhs"), _DASH),
    "elm": ((".elm",), _DASH),
    "erlang": ((".erl", ".hrl"), _PERCENT),
    "latex": ((".tex", ".sty", ".cls"), _PERCENT),
    "matlab": ((),  _PERCENT),
    "clojure": ((".clj", ".cljs", ".cljc", ".edn"), _SEMI),
    "lisp": ((".lisp", ".el", ".scm"), _SEMI),
    "vim": ((".vim",), _QUOTE),
    "css": ((".css",), _BLOCK_C),
    "scss": ((".scss",), _SLASH),
    "less": ((".less",), _SLASH),
    "html": ((".html", ".htm", ".xhtml"), _HTML),
    "xml": ((".xml", ".xsd", ".xsl", ".svg", ".plist"), _HTML),
    "vue": ((".vue",), _HTML),
    "svelte": ((".svelte",), _HTML),
    "markdown": ((".md", ".markdown"), _HTML),
    "json": ((".json",), None),
    "jsonc": ((".jsonc",), _SLASH),
    "plaintext": ((".txt",), None),
}

# Other spellings editors send (Neovim/Vim filetypes, older ids) -> canonical id.
_ALIASES = {
    "py": "python", "python3": "python",
    "js": "javascript", "node": "javascript",
    "jsx": "javascriptreact", "ts": "typescript", "tsx": "typescriptreact",
    "golang": "go", "rs": "rust",
    "cs": "csharp", "c#": "csharp", "c++": "cpp", "cxx": "cpp", "objc": "objective-c",
    "objcpp": "objective-cpp", "fs": "fsharp",
    "rb": "ruby", "perl6": "perl", "raku": "perl",
    "sh": "shellscript", "bash": "shellscript", "zsh": "shellscript", "ksh": "shellscript",
    "shell": "shellscript", "ps1": "powershell", "pwsh": "powershell",
    "make": "makefile", "docker": "dockerfile", "yml": "yaml",
    "tex": "latex", "plaintex": "latex", "text": "plaintext", "txt": "plaintext",
    "md": "markdown", "elisp": "lisp", "scheme": "lisp", "commonlisp": "lisp",
    "html5": "html", "htmldjango": "html",
}

_BY_EXTENSION = {ext: lang for lang, (exts, _) in _LANGUAGES.items() for ext in exts}
_BY_FILENAME = {
    "makefile": "makefile", "gnumakefile": "makefile", "dockerfile": "dockerfile",
    "cmakelists.txt": "cmake", "gemfile": "ruby", "rakefile": "ruby",
    ".bashrc": "shellscript", ".zshrc": "shellscript", ".profile": "shellscript",
}


def code_file_glob() -> str:
    """A glob of the files of every known language but plain text, as editors watch files."""
    extensions = sorted({ext[1:] for lang, (exts, _) in _LANGUAGES.items() if lang != "plaintext" for ext in exts})
    return "**/*.{" + ",".join(extensions) + "}"


def known_languages() -> tuple[str, ...]:
    """Every canonical language id, sorted."""
    return tuple(sorted(_LANGUAGES))


def language_from_id(language_id: str) -> str | None:
    """Canonical id for an editor's languageId / filetype, or None when unknown."""
    key = language_id.strip().lower()
    if key in _LANGUAGES:
        return key
    return _ALIASES.get(key)


def language_from_path(path: str) -> str | None:
    """Canonical id from a file path or URI's file name, or None when unknown."""
    name = posixpath.basename(path.replace("\\", "/")).lower()
    if not name:
        return None
    if name in _BY_FILENAME:
        return _BY_FILENAME[name]
    if name.startswith("dockerfile"):
        return "dockerfile"
    dot = name.rfind(".")
    if dot <= 0 and not name.startswith("."):
        return None
    return _BY_EXTENSION.get(name[dot:])


def resolve_language(language_id: str = "", path: str = "") -> str:
    """The document's language: the editor's id when known, else the path's, else "plaintext"."""
    return language_from_id(language_id) or language_from_path(path) or "plaintext"


def comment_syntax(language: str) -> CommentSyntax | None:
    """Comment syntax of a canonical language id; None when it has no comments."""
    entry = _LANGUAGES.get(language_from_id(language) or "")
    return entry[1] if entry else None


def line_comment_marker(language: str) -> str | None:
    """The token that starts a to-end-of-line comment ("#", "//", "--"), or None."""
    syntax = comment_syntax(language)
    if syntax is None or syntax.end:
        return None
    return syntax.start.strip()
