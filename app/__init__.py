"""The Streamlit dashboard: entry point and shared UI pieces (pages live in ../pages)."""
