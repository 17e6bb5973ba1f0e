"""Model building blocks: attention, rotary, norms, linear, sampler."""
