"""Sphinx configuration for ds_trio's documentation.

The build is offline: only Sphinx's own extensions (autodoc, napoleon,
viewcode), the default ``alabaster`` theme and no intersphinx, so nothing is
fetched.  ``.ci/run`` builds it with ``-W``: every warning is an error.

autodoc imports ``ds_trio`` from the environment running Sphinx (the venv,
where it is installed in editable mode); nothing is added to ``sys.path``.
"""

from __future__ import annotations

import re
from typing import Any

import ds_trio
import ds_trio.testing

project = "ds_trio"
author = "ds_trio developers"
project_copyright = "ds_trio developers"
release = ds_trio.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

# -- HTML ---------------------------------------------------------------------

html_theme = "alabaster"
html_theme_options = {
    "description": "PublicInbox::DS on structured concurrency",
    "fixed_sidebar": True,
    "show_relbars": True,
}
html_static_path: list[str] = []
html_title = f"ds_trio {release}"

# -- autodoc / napoleon ---------------------------------------------------------

# Type hints go into the parameter descriptions, not the signatures: the
# library's annotations name private types (``_State``) and aliases that do
# not resolve to documented objects.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True
python_use_unqualified_type_names = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# Unresolvable references in annotations (``anyio.abc.TaskGroup``, ...) would
# otherwise need intersphinx, i.e. the network.
nitpicky = False

# No intersphinx: ``sphinx.ext.intersphinx`` is not loaded, so nothing can be
# fetched even by accident.

# -- API completeness -----------------------------------------------------------

#: Modules whose ``__all__`` must be documented in full by api.rst.
_PUBLIC_MODULES = {"ds_trio": ds_trio, "ds_trio.testing": ds_trio.testing}


def _check_public_names_documented(app: Any, env: Any) -> None:
    """Warn (an error under ``-W``) for any public name api.rst left out."""
    from sphinx.util import logging

    logger = logging.getLogger("ds_trio.docs")
    documented = set(env.get_domain("py").objects)
    for module_name, module in _PUBLIC_MODULES.items():
        for name in module.__all__:
            qualified = f"{module_name}.{name}"
            if qualified not in documented:
                logger.warning(
                    "%s is in %s.__all__ but not documented (add it to api.rst)",
                    qualified,
                    module_name,
                )


def _alias_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Document a snake_case alias as the alias it is, not as a second copy.

    ``ds_trio.event_loop is ds_trio.EventLoop``: the alias's page entry says
    so and points at the original instead of repeating its docstring.
    """
    module, _, short = name.rpartition(".")
    original = getattr(obj, "__name__", short)
    if module != "ds_trio" or original == short:
        return
    if getattr(ds_trio, original, None) is not obj:
        return
    lines[:] = [
        f"Alias of :func:`{original}`: the same object "
        f"(``ds_trio.{short} is ds_trio.{original}``).",
        "",
    ]


#: Classes users never construct themselves: shown without a signature.
_NO_SIGNATURE = {"ds_trio.Timer"}
#: Private constants in defaults, spelled as users would write them.
_PUBLIC_SPELLING = {"_IN_ONESHOT": "EPOLLIN | EPOLLONESHOT"}


def _public_signature(
    app: Any,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Keep private parameters and private constants out of signatures."""
    if name in _NO_SIGNATURE:
        return "", None
    if not signature:
        return None
    cleaned = re.sub(r",\s*_\w+(?::[^,=)]*)?=[^,)]*", "", signature)
    for private, public in _PUBLIC_SPELLING.items():
        cleaned = re.sub(rf"\b{private}\b", public, cleaned)
    return cleaned, return_annotation


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _alias_docstring)
    app.connect("autodoc-process-signature", _public_signature)
    app.connect("env-check-consistency", _check_public_names_documented)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
