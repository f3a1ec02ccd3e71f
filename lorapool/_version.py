"""The version of lorapool, read by the build (pyproject.toml) and by ``lorapool.__version__``."""

__version__ = "0.1.0"
