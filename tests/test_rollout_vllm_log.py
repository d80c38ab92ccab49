"""engine.rollout.vllm.KnownNoise drops exactly the vLLM messages that look like failures and are not (KNOWN_NOISE
says why each is harmless), on LogRecords: no vLLM engine is needed. The real engine's side (the filters in place
after start, the trainer's thread count kept) is tests/test_rollout_vllm.py."""

import logging

import pytest

from engine.rollout.vllm import KNOWN_NOISE, KnownNoise

LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"


@pytest.fixture
def loggers():
    yield
    for name in KNOWN_NOISE:  # leave no filter behind for the tests after this one
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, KnownNoise)]:
            logger.removeFilter(f)


def passes(logger_name: str, msg: str, *args, level=logging.WARNING) -> bool:
    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logger.makeRecord(logger_name, level, __file__, 1, msg, args, None)))


def test_known_messages_are_dropped_and_nothing_else(loggers):
    KnownNoise.install()
    assert not passes("vllm.renderers.base", "Chat template warmup failed")
    assert not passes("vllm.engine.arg_utils", next(iter(KNOWN_NOISE["vllm.engine.arg_utils"])))
    assert not passes(LAYERWISE, "%s: Failed to load weights", "RotaryEmbedding")  # matched as formatted
    assert not passes(LAYERWISE, "%s: Failed to load weights", "Llama3RotaryEmbedding")
    # a layer that should have received weights, other text on the same loggers, the same text elsewhere: kept
    assert passes(LAYERWISE, "%s: Failed to load weights", "QKVParallelLinear")
    assert passes(LAYERWISE, "%s: Failed to load weights", "ParallelLMHead")  # not tied: a real failure
    assert passes("vllm.renderers.base", "Chat template warmup failed: something else")
    assert passes("vllm.engine.arg_utils", "Some other warning")
    assert passes("vllm.v1.engine.core", "Chat template warmup failed")
    assert passes("ceiling", "RotaryEmbedding: Failed to load weights")


def test_tied_head_message_only_while_tied_and_one_filter_per_logger(loggers):
    KnownNoise.install(tied_head=True)
    KnownNoise.install(tied_head=True)
    assert not passes(LAYERWISE, "%s: Failed to load weights", "ParallelLMHead")
    KnownNoise.install(tied_head=False)  # the next engine's head is not tied
    assert passes(LAYERWISE, "%s: Failed to load weights", "ParallelLMHead")
    for name in KNOWN_NOISE:
        assert sum(isinstance(f, KnownNoise) for f in logging.getLogger(name).filters) == 1
