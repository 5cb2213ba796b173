"""das-sd node pack for InvokeAI: copy or link this folder into $INVOKEAI_ROOT/nodes/."""

from .das_attribution import DASAttributionInvocation, DASAttributionOutput

__all__ = ["DASAttributionInvocation", "DASAttributionOutput"]
