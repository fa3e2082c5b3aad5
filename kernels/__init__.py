"""Our own fast ops, each with an eager reference and an ``impl='auto'|'triton'|'torch'`` switch."""
