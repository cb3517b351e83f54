"""Which of a variant's options go to ``forward`` and which to its helpers (the contract).

A caller holding one flat dict of options (a layer's keyword arguments, a benchmark's
``--opt`` values) routes it with :func:`split_options` (or :func:`options_for`, one
callable at a time) and validates it with :func:`unknown_options` instead of inspecting
signatures itself; :func:`required_options` names the options a variant cannot run
without.  Every ``inspect.signature`` of a variant's callables is in this module.
"""

from __future__ import annotations

import inspect

#: The leading arguments the contract fixes for each callable (not options).
_POSITIONAL = {"forward": {"q", "k", "v"},
               "draw_random_options": {"rng", "d", "dtype"},
               "init_layer_params": {"rng", "m", "dtype"}}
#: The helpers, each with the constant that says whether the variant uses it.
_HELPERS = (("draw_random_options", "RANDOM_OPTIONS"), ("init_layer_params", "LAYER_PARAMS"))


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


def required_options(mod) -> set:
    """The keyword-only options with no default of ``mod.forward`` and of the helpers the
    variant uses (such as LSH's ``n_hashes`` or Linformer's rank ``k``)."""
    fns = [("forward", mod.forward)] + [(h, getattr(mod, h)) for h, attr in _HELPERS
                                        if getattr(mod, attr, ())]
    out = set()
    for helper, fn in fns:
        params = inspect.signature(fn).parameters.values()
        out |= {p.name for p in params
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty} - _POSITIONAL[helper]
    return out


def accepted_options(mod, reserved=()) -> tuple[set, bool]:
    """(the options ``forward`` or a helper of ``mod`` names, minus ``reserved``; whether
    ``forward`` also takes ``**kwargs``).  ``reserved``: options the caller sets itself
    (a layer sets ``causal``, the key-padding option and its ``LAYER_PARAMS``).  A helper
    counts only if the variant uses it (non-empty ``RANDOM_OPTIONS`` / ``LAYER_PARAMS``)."""
    names, var_kw = option_names(mod, "forward")
    for helper, attr in _HELPERS:
        if getattr(mod, attr, ()):
            names |= option_names(mod, helper)[0]
    return names - set(reserved), var_kw


def unknown_options(mod, options, reserved=()) -> tuple[list, list]:
    """(the sorted names in ``options`` that no callable of ``mod`` takes, or that are
    ``reserved``; the sorted valid options).  A ``forward`` with ``**kwargs`` takes every
    name except the reserved ones."""
    valid, fwd_var_kw = accepted_options(mod, reserved)
    unknown = set(options) - valid if not fwd_var_kw else set(options) & set(reserved)
    return sorted(unknown), sorted(valid)


def options_for(mod, helper: str, options: dict) -> dict:
    """The entries of ``options`` that ``mod.<helper>`` takes: those its signature names,
    or all of them if it takes ``**kwargs``; ``{}`` when the variant has no such helper.
    ``helper``: "forward", "draw_random_options" or "init_layer_params"."""
    names, var_kw = option_names(mod, helper)
    return {key: val for key, val in options.items() if key in names or var_kw}


def split_options(mod, options: dict, *, reserved=()) -> tuple[dict, dict, dict]:
    """``options`` -> ``(forward options, draw_random_options', init_layer_params')``.

    Each callable gets the options its signature names, or all of them if it takes
    ``**kwargs``; a helper the variant does not have (no ``RANDOM_OPTIONS`` /
    ``LAYER_PARAMS``) gets an empty dict.  Linformer's rank ``k`` goes to
    ``init_layer_params`` only, since ``k`` is also the keys of ``forward``.  An option
    that no callable names (and that no ``**kwargs`` of ``forward`` absorbs), or one in
    ``reserved``, is a TypeError naming it, the variant and the valid options.
    """
    unknown, valid = unknown_options(mod, options, reserved)
    if unknown:
        raise TypeError(f"options {unknown} are taken by neither {mod.NAME}.forward nor its "
                        f"helpers; valid options: {valid}")
    forward_opts = options_for(mod, "forward", options)
    random_opts, layer_opts = (options_for(mod, helper, options) if getattr(mod, attr, ())
                               else {} for helper, attr in _HELPERS)
    return forward_opts, random_opts, layer_opts
