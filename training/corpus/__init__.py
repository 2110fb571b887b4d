"""Training corpus of the default model: permissively licensed real code.

Builds train/valid JSON-lines files from the packages pinned in
``manifest.json`` (PyPI sdists, npm tarballs, or already installed local
sources), with licence checks, filtering of generated/minified/vendored files,
exact and near-duplicate removal, HumanEval decontamination and a split by
package.  Run it as ``python -m training.corpus build``.

Network access lives only in ``fetch.py`` and is used only by the builder's
command line; nothing here is imported by the language server.
"""
