"""Figures (Plotly) for the app and the reports."""
