"""The version of tinyeff (one place; setup.cfg and the golden manifests read it)."""

__version__ = "0.1.0"
