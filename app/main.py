"""Streamlit entry point: ``streamlit run app/main.py``."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.state import sidebar

PAGES = Path(__file__).resolve().parent.parent / "pages"

st.set_page_config(page_title="RobustKD Studio", page_icon="🛡️", layout="wide")
page = st.navigation([st.Page(PAGES / "teacher.py", title="Teacher", icon="🎓", default=True)])
sidebar()
page.run()
