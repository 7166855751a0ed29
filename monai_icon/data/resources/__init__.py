"""Data files shipped with monai-icon (see README.md in this folder for sources and licences)."""
