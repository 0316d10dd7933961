"""Sphinx configuration: the API reference from the docstrings (autodoc, Google style), the guides
in Markdown (MyST), most of them included from the README so that both say the same."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "jxent"
author = "the jxent developers"
copyright = "2026, the jxent developers"  # noqa: A001

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields (the dataclass fields are documented once)
suppress_warnings = ["myst.header"]
# `ArrayLike` stays `ArrayLike` in signatures (not the Union it stands for)
autodoc_type_aliases = {"ArrayLike": "ArrayLike"}
html_theme = "alabaster"
html_theme_options = {"page_width": "min(1400px, 96%)", "sidebar_width": "220px"}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
