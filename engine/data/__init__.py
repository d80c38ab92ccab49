"""Data: the synthetic math task (`synthetic`), tokenizers (`tokenizer`), SFT/RL row loading and
tokenization with loss masks (`sft_dataset`), and packing into micro-batches (`packing`).

Nothing is re-exported here, so importing one module does not pull in the others' dependencies.
"""
