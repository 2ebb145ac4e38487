"""Presentation: terminal tables, figures and HTML pages. No stage renders; the CLI and reports call these."""
