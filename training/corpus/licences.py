"""Decide whether a package licence is permissive enough for the corpus.

Policy: keep MIT/BSD/Apache/ISC/PSF-style licences (and public-domain
dedications); reject copyleft (GPL, LGPL, AGPL, MPL, EPL, ...) and anything we
cannot identify.  This module only classifies strings; it never reads files.
"""

from __future__ import annotations

import re

# SPDX identifiers we accept.  "WITH LLVM-exception" only widens Apache-2.0.
PERMISSIVE_SPDX = frozenset(
    s.lower()
    for s in (
        "MIT", "MIT-0", "MIT-CMU", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Apache-2.0",
        "Apache-2.0 WITH LLVM-exception", "ISC", "PSF-2.0", "Python-2.0", "CNRI-Python",
        "Zlib", "CC0-1.0", "BSL-1.0", "Unlicense", "HPND", "BlueOak-1.0.0",
    )
)

# Trove classifiers (last component) and free-text licence fields we accept.
PERMISSIVE_CLASSIFIERS = frozenset(
    s.lower()
    for s in (
        "MIT License", "BSD License", "Apache Software License", "ISC License (ISCL)",
        "Python Software Foundation License", "The Unlicense (Unlicense)",
        "Public Domain", "zlib/libpng License", "MIT No Attribution License (MIT-0)",
    )
)

# Short free-text values seen in old METADATA "License:" fields.
_FREE_TEXT = {
    "mit": "MIT", "mit license": "MIT", "bsd": "BSD-3-Clause", "bsd license": "BSD-3-Clause",
    "new bsd": "BSD-3-Clause", "new bsd license": "BSD-3-Clause", "3-clause bsd": "BSD-3-Clause",
    "bsd-3-clause": "BSD-3-Clause", "bsd 3-clause": "BSD-3-Clause", "bsd-2-clause": "BSD-2-Clause",
    "apache 2.0": "Apache-2.0", "apache-2.0": "Apache-2.0", "apache 2": "Apache-2.0",
    "apache license 2.0": "Apache-2.0", "apache license, version 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0", "apache 2.0 license": "Apache-2.0",
    "isc": "ISC", "isc license": "ISC", "psf": "PSF-2.0", "psf license": "PSF-2.0",
    "python software foundation license": "PSF-2.0",
}

_COPYLEFT = re.compile(r"\b(a?gpl|lgpl|mpl|epl|eupl|cddl|osl|sspl|cc-by-sa|cc-by-nc)", re.I)


def spdx_is_permissive(expression: str) -> bool:
    """True if an SPDX expression grants a permissive licence.

    ``A OR B`` is permissive when any alternative is; ``A AND B`` when all are.
    Parentheses are flattened, which is conservative enough for the package
    metadata seen in practice.
    """
    expr = expression.strip().replace("(", " ").replace(")", " ")
    if not expr:
        return False
    alternatives = re.split(r"\s+OR\s+", expr, flags=re.I)
    for alt in alternatives:
        terms = [t.strip() for t in re.split(r"\s+AND\s+", alt, flags=re.I)]
        if terms and all(" ".join(t.split()).lower() in PERMISSIVE_SPDX for t in terms):
            return True
    return False


def classify(
    license_expression: str | None,
    license_text: str | None,
    classifiers: list[str] | tuple[str, ...] = (),
) -> str | None:
    """Return a licence label if the package is permissive, else None.

    Order of trust: the SPDX ``License-Expression`` field, then the free-text
    ``License`` field when it is a short recognised name, then trove
    classifiers (all of them must be permissive).
    """
    if license_expression and license_expression.strip():
        expr = " ".join(license_expression.split())
        return expr if spdx_is_permissive(expr) else None
    text = " ".join((license_text or "").split())
    if text and _COPYLEFT.search(text[:200]):
        return None
    short = text.lower().rstrip(".")
    if short in _FREE_TEXT:
        return _FREE_TEXT[short]
    if short and spdx_is_permissive(text):
        return text
    lic_classifiers = [
        c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")
    ]
    lic_classifiers = [c for c in lic_classifiers if c.lower() not in ("osi approved", "dfsg approved")]
    if lic_classifiers and all(c.lower() in PERMISSIVE_CLASSIFIERS for c in lic_classifiers):
        return lic_classifiers[0]
    return None
