"""The app's process: `streamlit run` with its arguments, after importing what every page needs.

    python -m backend.serving.streamlit_process app.py [streamlit options]

Streamlit imports a script's modules when its first visitor arrives; the app's (torch and the
model code behind the analysis kinds, altair behind the charts) take several seconds, which the
first visitor would spend waiting for a chart. Imported here, they are ready before the server
answers (Streamlit runs scripts in this same process, so they are not imported again).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from streamlit.web import cli

import app  # noqa: F401  the sidebar and what pages.shared imports
import viz


def _import_charts() -> None:
    for module in pkgutil.iter_modules(viz.__path__):
        if module.ispkg:
            continue
        importlib.import_module(f"viz.{module.name}")


if __name__ == "__main__":
    _import_charts()
    sys.argv = ["streamlit", "run", *sys.argv[1:]]
    sys.exit(cli.main())
