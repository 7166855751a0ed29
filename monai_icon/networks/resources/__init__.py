"""Reference parameter lists of the published ICON-family models (see README.md in this folder)."""
