"""Per-layer rules, registered by module type. Importing this package registers all of them."""

from fastdp.rules import (  # noqa: F401  (registration side effects)
    attention,
    bilinear,
    conv,
    embedding,
    gain,
    hf_conv1d,
    linear,
    norm,
    recurrent,
    ws_conv,
)
from fastdp.rules.base import Cost, LayerCall, Rule, known_strategies, register_rule, rule_for
from fastdp.rules.fallback import fallback_rule

__all__ = ["Cost", "LayerCall", "Rule", "fallback_rule", "known_strategies", "register_rule", "rule_for"]
