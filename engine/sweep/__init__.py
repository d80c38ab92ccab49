"""`ceiling sweep`: the paper's study as a graph of items (SFT, evaluations, RL branches, baselines) that one
process or many workers claim and run over a shared run directory, and its report.

items.py            the items of a sweep, their records, and how to run one in this process (`Sweep`)
worker.py           the claim / lock / done protocol that lets any number of workers share `<run>/`
slurm.py            the sbatch array of workers that `--slurm` writes
cli.py              the command line: in-process, `--worker`, `--slurm`, `--plan`, `--run-item`
report.py           `sweep_report.md`: per-scene tables, fits, figures, compute
findings_report.py  the verdict on each of the paper's three findings, with its figure

Nothing is re-exported here: `engine.sweep.cli` imports the trainers only when an item runs.
"""
