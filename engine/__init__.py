"""ceiling-engine: kernel-level LLM post-training (SFT, RLVR, SFT-then-RL) and the Plasticity-Ceiling analysis."""

__version__ = "0.1.0"
