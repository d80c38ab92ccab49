"""RL building blocks, pure functions over tensors and lists (no rollout, no ranks).

    algorithms   advantages, per-token loss weights of GRPO / DAPO / LUFFY / SRFT / UPT
    normalizers  one normaliser per loss term, token aggregation, the KL term
    sampling     DAPO dynamic sampling (drop all-equal groups, generate until the batch is full)
    update       one micro-batch's loss_fn: weights from the training forward (SRFT entropy, KL), fused loss
Built on them (not re-exported here: they import the rollout and data layers):
    rollouts     the records of a run's sampling: prompts, one step's generation rounds, one evaluation
    trainer      `RLTrainer`: rollout -> rewards -> weights -> packed update -> weight sync, evaluations, export
"""

from engine.rl.algorithms import (
    ALGORITHMS,
    AlgorithmSpec,
    RLBatch,
    SeqWeights,
    TokenWeights,
    WeightParams,
    sequence_weights,
    token_weights,
)
from engine.rl.normalizers import AGGREGATIONS, LossNormalizers, aggregate, loss_normalizers, normalizer_count
from engine.rl.sampling import Group, SamplingResult, UnfilledBatchError, dynamic_sampling
from engine.rl.update import LossSettings, MicroBatchLoss

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "AlgorithmSpec", "Group", "LossNormalizers", "LossSettings", "MicroBatchLoss",
    "RLBatch", "SamplingResult", "SeqWeights", "TokenWeights", "UnfilledBatchError", "WeightParams", "aggregate",
    "dynamic_sampling", "loss_normalizers", "normalizer_count", "sequence_weights", "token_weights",
]
