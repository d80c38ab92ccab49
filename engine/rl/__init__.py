"""RL building blocks, pure functions over tensors and lists (no rollout, no ranks).

    algorithms   advantages, per-token loss weights of GRPO / DAPO / LUFFY / SRFT / UPT, aggregation, KL
    sampling     DAPO dynamic sampling (drop all-equal groups, generate until the batch is full)
"""

from engine.rl.algorithms import (
    AGGREGATIONS,
    ALGORITHMS,
    AlgorithmSpec,
    RLBatch,
    SeqWeights,
    TokenWeights,
    WeightParams,
    aggregate,
    normalizer_count,
    sequence_weights,
    token_weights,
)
from engine.rl.sampling import Group, SamplingResult, dynamic_sampling

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "AlgorithmSpec", "Group", "RLBatch", "SamplingResult", "SeqWeights",
    "TokenWeights", "WeightParams", "aggregate", "dynamic_sampling", "normalizer_count", "sequence_weights",
    "token_weights",
]
