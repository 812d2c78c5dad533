"""Inside mixture-of-experts layers through transformers' experts interface: `routed` is the mechanism
(a registered experts implementation that recomputes each routed expert's taps), `capture` feeds them to
the profile's sink, `edit` is the massive intervention on one expert's y6 / y7."""

from outlier_study.measure.experts.capture import MOE_TAPS, ROUTER_TAPS, capture_experts, expert_taps
from outlier_study.measure.experts.edit import EDITABLE, edit_experts

__all__ = ["EDITABLE", "MOE_TAPS", "ROUTER_TAPS", "capture_experts", "edit_experts", "expert_taps"]
