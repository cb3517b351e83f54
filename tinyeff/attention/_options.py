"""Which of a variant's options go to ``forward`` and which to its helpers (the contract).

A caller holding one flat dict of options (a layer's keyword arguments, a benchmark's
``--opt`` values) routes it with :func:`split_options` instead of inspecting signatures
itself.
"""

from __future__ import annotations

import inspect

#: The leading arguments the contract fixes for each callable (not options).
_POSITIONAL = {"forward": {"q", "k", "v"},
               "draw_random_options": {"rng", "d", "dtype"},
               "init_layer_params": {"rng", "m", "dtype"}}


def keywords(fn) -> tuple[set, bool]:
    """(keyword parameter names of ``fn``, whether ``fn`` also takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def option_names(mod, helper: str) -> tuple[set, bool]:
    """(options ``mod.<helper>`` names, whether it takes any option); ``(set(), False)`` when
    the variant has no such helper.  The contract's leading arguments are not options."""
    fn = getattr(mod, helper, None)
    if fn is None:
        return set(), False
    names, var_kw = keywords(fn)
    return names - _POSITIONAL[helper], var_kw


def split_options(mod, options: dict) -> tuple[dict, dict, dict]:
    """``options`` -> ``(forward options, draw_random_options', init_layer_params')``.

    Each callable gets the options its signature names, or all of them if it takes
    ``**kwargs``; a helper the variant does not have (no ``RANDOM_OPTIONS`` /
    ``LAYER_PARAMS``) gets an empty dict.  Linformer's rank ``k`` goes to
    ``init_layer_params`` only, since ``k`` is also the keys of ``forward``.  An option that
    no callable names (and that no ``**kwargs`` of ``forward`` absorbs) is a TypeError
    naming it and the variant.
    """
    routed, used = [], set()
    for helper, wanted in (("forward", True),
                           ("draw_random_options", bool(getattr(mod, "RANDOM_OPTIONS", ()))),
                           ("init_layer_params", bool(getattr(mod, "LAYER_PARAMS", ())))):
        names, var_kw = option_names(mod, helper) if wanted else (set(), False)
        used |= names
        if helper == "forward" and var_kw:
            used |= set(options)
        routed.append({key: val for key, val in options.items() if key in names or var_kw})
    unknown = sorted(set(options) - used)
    if unknown:
        raise TypeError(f"options {unknown} are taken by neither {mod.NAME}.forward nor its "
                        "helpers")
    forward_opts, random_opts, layer_opts = routed
    return forward_opts, random_opts, layer_opts
