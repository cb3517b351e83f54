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


def accepted_options(mod, reserved=()) -> tuple[set, bool]:
    """(the options ``forward`` or a helper of ``mod`` names, minus ``reserved``; whether
    ``forward`` also takes ``**kwargs``).  ``reserved``: options the caller sets itself
    (a layer sets ``causal``, the key-padding option and its ``LAYER_PARAMS``)."""
    names, var_kw = option_names(mod, "forward")
    for helper, attr in (("draw_random_options", "RANDOM_OPTIONS"),
                         ("init_layer_params", "LAYER_PARAMS")):
        if getattr(mod, attr, ()):
            names |= option_names(mod, helper)[0]
    return names - set(reserved), var_kw


def split_options(mod, options: dict, *, reserved=()) -> tuple[dict, dict, dict]:
    """``options`` -> ``(forward options, draw_random_options', init_layer_params')``.

    Each callable gets the options its signature names, or all of them if it takes
    ``**kwargs``; a helper the variant does not have (no ``RANDOM_OPTIONS`` /
    ``LAYER_PARAMS``) gets an empty dict.  Linformer's rank ``k`` goes to
    ``init_layer_params`` only, since ``k`` is also the keys of ``forward``.  An option
    that no callable names (and that no ``**kwargs`` of ``forward`` absorbs), or one in
    ``reserved``, is a TypeError naming it, the variant and the valid options.
    """
    valid, fwd_var_kw = accepted_options(mod, reserved)
    unknown = sorted(set(options) - valid if not fwd_var_kw else set(options) & set(reserved))
    if unknown:
        raise TypeError(f"options {unknown} are taken by neither {mod.NAME}.forward nor its "
                        f"helpers; valid options: {sorted(valid)}")
    routed = []
    for helper, attr in (("forward", None), ("draw_random_options", "RANDOM_OPTIONS"),
                         ("init_layer_params", "LAYER_PARAMS")):
        if attr is not None and not getattr(mod, attr, ()):
            routed.append({})
            continue
        names, var_kw = option_names(mod, helper)
        routed.append({key: val for key, val in options.items() if key in names or var_kw})
    forward_opts, random_opts, layer_opts = routed
    return forward_opts, random_opts, layer_opts
