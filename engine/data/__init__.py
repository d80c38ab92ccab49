"""Data: what a user's files hold, and how it becomes packed token batches.

    files.py           which files a path setting names (globs, lists, folders, save_to_disk) and their raw rows
    layouts.py         what a row means: the layouts practitioners have (openr1/verl, chat, benchmarks, the
                       engine's), or `data.fields` key paths; typed SFTRow / PromptRow
    tokenizer.py       the character tokenizer, local HF tokenizers, chat templates (`model.chat_template`)
    sft_dataset.py     SFT tokenization: chat template, loss mask on every assistant turn, over-long rows
    token_store*.py    SFT data tokenized once into flat memory-read arrays, built by shards
    row_shards.py      contiguous row shards of files, for parallel tokenization
    packing.py         packing samples into micro-batches (C++ with a Python twin)
    synthetic.py       the synthetic math task;  public_layouts.py  it, written as openr1.parquet and MATH-500

Nothing is re-exported here, so importing one module does not pull in the others' dependencies.
"""
