"""The durable state of a run directory: what a run leaves on disk for a resume, another worker or a report.

    files.py     atomic, fsynced JSON (write once or replace) and its one reader: sweep records, pipeline.json,
                 switch.json, reports' JSON
    lock.py      the one O_EXCL lock file (holder JSON, guarded stale takeover, pid liveness)
    run_lock.py  `<run>/run.lock`: one process per run directory
    metrics.py   the run directory itself (`make_run_dir`), metrics.jsonl, progress bars
    loggers.py   the mirrors of metrics.jsonl that `run.loggers` names: TensorBoard, Weights & Biases, MLflow
    generations.py  what the model generated: one JSON line per sample with its score (capped per file)
    checkpoint.py  verified torch.distributed.checkpoint steps: the largest part of a run's durable state,
                 written by the same rules (temp folder, fsync, rename, fsync the folder), with a manifest of
                 checksums that resume verifies

Nothing is re-exported: `files` and `lock` need only the standard library, and importing them must not pull
in torch (`checkpoint` does).
"""
