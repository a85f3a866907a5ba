"""Per-layer rules, registered by module type. Importing this package registers all of them."""

from fastdp.rules import conv, embedding, gain, linear, norm, recurrent, ws_conv  # noqa: F401  (registration side effects)
from fastdp.rules.base import Cost, LayerCall, Rule, known_strategies, register_rule, rule_for
from fastdp.rules.fallback import fallback_rule

__all__ = ["Cost", "LayerCall", "Rule", "fallback_rule", "known_strategies", "register_rule", "rule_for"]
