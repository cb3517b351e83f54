"""Compatibility names for tinyeff/demo.py; the helpers live in :mod:`tinyeff.cli.report`."""

from .cli.report import THREAD_ENV, int_list, machine_info, parse_variant_opts

__all__ = ["THREAD_ENV", "int_list", "machine_info", "parse_variant_opts"]
