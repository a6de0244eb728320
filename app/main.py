"""Streamlit entry point: ``streamlit run app/main.py`` (``make run``)."""

from __future__ import annotations

from pathlib import Path

# Imported once, before any session: Plotly reads sys.modules['pandas'] without importing it,
# so a first st.dataframe importing pandas in one session's thread broke other sessions'
# charts with a half-initialised module (seen with 30 sessions at once).
import pandas  # noqa: F401
import streamlit as st

from app.state import sidebar

PAGES = Path(__file__).resolve().parent.parent / "pages"

# title, file, icon — in the order a newcomer meets them
PAGE_LIST = [
    ("Teacher", "teacher.py", ":material/school:"),
    ("Triggers", "triggers.py", ":material/my_location:"),
    ("Feature variance", "variance.py", ":material/grid_on:"),
    ("Attributions", "attributions.py", ":material/visibility:"),
    ("Detox & distil", "distill.py", ":material/science:"),
    ("Compare", "compare.py", ":material/compare_arrows:"),
    ("Teach", "teach.py", ":material/co_present:"),
]

st.set_page_config(page_title="RobustKD Studio", page_icon=":material/shield:", layout="wide")
page = st.navigation(
    [
        st.Page(PAGES / file, title=title, icon=icon, default=(i == 0))
        for i, (title, file, icon) in enumerate(PAGE_LIST)
        if (PAGES / file).exists()
    ]
)
sidebar()
page.run()
